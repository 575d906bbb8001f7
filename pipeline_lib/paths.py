"""Where a run's outputs land: ``runs/<run_name>/`` (one folder per stage) and ``model_repository/``."""
from __future__ import annotations

import datetime as _dt
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

import yaml

from pipeline_lib.config import RunConfig

# The python-backend model.py files export installs into a version (they run inside Triton).
TRITON_MODELS = Path(__file__).resolve().parent / "serving" / "triton_models"


@dataclass(frozen=True)
class RunPaths:
    root: Path

    @property
    def raw(self) -> Path:  # raw/interactions.parquet
        return self.root / "raw"

    @property
    def validated(self) -> Path:  # validated/stats.json
        return self.root / "validated"

    @property
    def split(self) -> Path:  # split/{train,valid}.parquet (raw columns)
        return self.root / "split"

    @property
    def transformed(self) -> Path:  # transformed/{train,valid}/ parquet + schema.pbtxt, workflow/
        return self.root / "transformed"

    @property
    def model(self) -> Path:  # model/model (SavedModel), model/metrics.json
        return self.root / "model"

    @property
    def ensemble(self) -> Path:  # ensemble/<model_name>/<version>: the staged Triton model
        return self.root / "ensemble"

    @property
    def serving(self) -> Path:  # serving/smoke.json, triton.log
        return self.root / "serving"


def check_writable(key: str, path: Path) -> None:
    """Create ``path`` if needed and write a probe file in it; raise :class:`OutputPathError` naming
    ``key`` (the config key) and why when that fails (a parent that is a file, a read-only mount, no
    permission). Writing, not ``os.access``: root ignores permission bits but not read-only mounts."""
    import os
    import tempfile

    from pipeline_lib.errors import OutputPathError

    path = Path(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".write-check-", dir=path)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        blocker = next((p for p in [path, *path.parents] if p.exists()), None)
        why = (f"{blocker} is a file, not a folder" if blocker is not None and not blocker.is_dir()
               else exc.strerror or str(exc))
        raise OutputPathError(f"{key} {path} is not writable ({why}); nothing was run. Point {key} at a "
                              f"writable folder (--set {key}=PATH) or fix its permissions.") from None


def new_run(cfg: RunConfig) -> RunPaths:
    """Check that the run's output folders are writable, then create the run folder and save the
    validated config in it."""
    check_writable("runs_dir", Path(cfg.runs_dir))
    check_writable("export.model_repository", Path(cfg.export.model_repository))
    name = cfg.run_name or _dt.datetime.now().strftime("%Y%m%d-%H%M%S-%f")
    root = Path(cfg.runs_dir) / name
    root.mkdir(parents=True, exist_ok=False)
    (root / "config.yaml").write_text(yaml.safe_dump(json.loads(cfg.model_dump_json()), sort_keys=False))
    return RunPaths(root.resolve())


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
