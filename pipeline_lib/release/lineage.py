"""Lineage: what a served version came from (data fingerprint, config, workflow, model, code)."""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
import subprocess
from pathlib import Path
from typing import Optional


def file_fingerprint(path: Path, chunk: int = 1 << 20) -> str:
    """sha256 of a file, or of every file under a directory (sorted by relative path)."""
    path = Path(path)
    h = hashlib.sha256()
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    for f in files:
        if path.is_dir():
            h.update(str(f.relative_to(path)).encode())
        with open(f, "rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return "sha256:" + h.hexdigest()


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
                  metrics: dict) -> dict:
    """Lineage record of a version (``publish`` adds the version number it allocates)."""
    return {
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "run_dir": str(run_dir),
        "code_version": code_version(),
        "data": {"path": str(raw_path), "fingerprint": file_fingerprint(raw_path)},
        "config": config,
        "config_fingerprint": config_fingerprint(config),
        "workflow": {"path": str(workflow_dir), "fingerprint": file_fingerprint(workflow_dir / "workflow.pkl")},
        "model": {"path": str(model_dir), "fingerprint": model_fingerprint(model_dir)},
        "metrics": metrics,
    }
