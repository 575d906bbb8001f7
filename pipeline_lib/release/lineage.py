"""Lineage: what a served version came from (data fingerprint, config, workflow, model, code)."""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Optional

from pipeline_lib.paths import file_fingerprint  # also re-exported: lineage.file_fingerprint


def config_fingerprint(obj: dict) -> str:
    return "sha256:" + hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def code_version() -> Optional[str]:
    """The git commit of the project checkout, when there is one."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent)
        return out.stdout.strip() or None if out.returncode == 0 else None
    except (OSError, subprocess.SubprocessError):
        return None


def files_fingerprints(root: Path) -> dict[str, str]:
    """``relative path -> sha256`` of every file under ``root`` (sorted): what a family actually saved."""
    root = Path(root)
    return {str(f.relative_to(root)): file_fingerprint(f) for f in sorted(root.rglob("*")) if f.is_file()}


# the code whose edits change ETL output (split, validation, the fitted workflow and its transform), relative
# to the pipeline_lib package, and the packages that compute it: together they key the ETL cache
ETL_CODE = ("etl", "data", "validate")
ETL_PACKAGES = ("nvtabular", "merlin-core", "pandas", "pyarrow", "numpy", "dask")


def etl_code_fingerprint(package_root: Optional[Path] = None) -> str:
    """sha256 of the ETL's source files (every ``*.py`` under ``pipeline_lib/{etl,data,validate}``, by relative
    path and content) and the versions of the packages that produce its output. Unlike a git commit it
    changes with an uncommitted edit and works without ``.git`` (a Docker image)."""
    from importlib import metadata

    root = Path(package_root) if package_root is not None else Path(__file__).resolve().parents[1]
    h = hashlib.sha256()
    for sub in ETL_CODE:
        for f in sorted((root / sub).rglob("*.py")):
            h.update(str(f.relative_to(root)).encode() + b"\0" + f.read_bytes() + b"\0")
    for name in ETL_PACKAGES:
        try:
            version = metadata.version(name)
        except metadata.PackageNotFoundError:
            version = "absent"
        h.update(f"{name}=={version}\n".encode())
    return "sha256:" + h.hexdigest()


def model_fingerprint(model_dir: Path) -> str:
    """A SavedModel's ``saved_model.pb``; any other model folder (ease / item_knn weights) whole. A folder
    with no file raises: a fingerprint of nothing would match every model."""
    model_dir = Path(model_dir)
    if (model_dir / "saved_model.pb").is_file():
        return file_fingerprint(model_dir / "saved_model.pb")
    if not model_dir.is_dir() or not any(p.is_file() for p in model_dir.rglob("*")):
        raise FileNotFoundError(f"model folder {model_dir} holds no file to fingerprint")
    return file_fingerprint(model_dir)


def build_lineage(run_dir: Path, raw_path: Path, config: dict, workflow_dir: Path, model_dir: Path,
                  metrics: dict, extra_models: Optional[dict[str, Path]] = None) -> dict:
    """Lineage record of a version (``publish`` adds the version number it allocates and the sha256 of
    every file of the version, ``files``). ``model``: the fingerprint of every file the family saved in
    ``model_dir`` (a ranking SavedModel, the retrieval encoders, a session model), not of one file name;
    ``extra_models``: other trained models the version holds (a two-stage version's re-ranker), each
    fingerprinted the same way."""
    out = {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "run_dir": str(run_dir),
        "code_version": code_version(),
        "etl_code": etl_code_fingerprint(),
        "data": {"path": str(raw_path), "fingerprint": file_fingerprint(raw_path)},
        "config": config,
        "config_fingerprint": config_fingerprint(config),
        "workflow": {"path": str(workflow_dir), "fingerprint": file_fingerprint(workflow_dir / "workflow.pkl")},
        "model": {"path": str(model_dir), "fingerprint": model_fingerprint(model_dir),
                  "files": files_fingerprints(model_dir)},
        "metrics": metrics,
    }
    for name, path in (extra_models or {}).items():
        out[name] = {"path": str(path), "fingerprint": file_fingerprint(path), "files": files_fingerprints(path)}
    return out
