"""The live Triton model repository: numbered versions, which one is served, promotion without
restart, rollback, retention, and per-version lineage.

Layout (see model_repository/README.md)::

    <repo>/<model>/config.pbtxt          the served version's config + version_policy pinning it
    <repo>/<model>/<N>/                  one published version (self-contained ensemble)
    <repo>/<model>/<N>/model_config.pbtxt  the config this version was exported with
    <repo>/<model>/<N>/lineage.json      data fingerprint, config, workflow, model, metrics, and
                                         ``files``: the sha256 of every file of the version
    <repo>/<model>/history.jsonl         every promotion / rollback, appended

Integrity: ``publish`` records the sha256 of every file of the version (``lineage.json``'s ``files``) and
checks the copy against it; ``promote`` and ``rollback`` check the version against it again before
serving it (:func:`verify_version`): a changed, truncated, missing or added file refuses the switch with
an :class:`IntegrityError` naming the file (``__pycache__`` folders, which the python backend may write,
are ignored). A version published before the manifest existed is served with a warning.

All or nothing: a promotion or rollback either pins the version and appends its line to history.jsonl,
or changes neither -- history.jsonl is opened before the switch and, if the line cannot be written after
it, the previous pin is put back (and a live server reloaded to it); the error says which version is served.

Every change is made with renames (``os.replace``), so Triton -- polling or told to reload --
never reads a half-written version or config. The served version is pinned through Triton's own
``version_policy { specific { versions: N } }``; a running server in explicit model-control mode
switches with ``load_model`` (the old version keeps serving until the new one is ready).
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shutil
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from google.protobuf import text_format

from pipeline_lib.paths import file_fingerprint
from pipeline_lib.serving.admin_key import ADMIN_HEADER  # one header name, HTTP and gRPC

CONFIG = "config.pbtxt"
VERSION_CONFIG = "model_config.pbtxt"
LINEAGE = "lineage.json"
HISTORY = "history.jsonl"
LOCK = ".lock"

log = logging.getLogger(__name__)


class RepositoryError(RuntimeError):
    pass


class IntegrityError(RepositoryError):
    """A version's files differ from the fingerprints recorded when it was published."""


IGNORED_DIRS = ("__pycache__",)  # written by the python backend when it imports model.py


def version_manifest(vdir: Path) -> dict[str, str]:
    """``relative path -> "sha256:..."`` of every file of a version folder except its lineage.json (which
    holds the manifest) and ``__pycache__`` folders."""
    vdir = Path(vdir)
    out = {}
    for f in sorted(vdir.rglob("*")):
        rel = f.relative_to(vdir)
        if f.is_file() and str(rel) != LINEAGE and not any(part in IGNORED_DIRS for part in rel.parts):
            out[str(rel)] = file_fingerprint(f)
    return out


def verify_version(repo: Path, model: str, version: int) -> bool:
    """Check every file of a published version against lineage.json's ``files``; an
    :class:`IntegrityError` names the first file that changed, is missing or was added. Returns False
    (nothing to check against) for a version published before the manifest existed."""
    vdir = Path(repo) / model / str(version)
    lin_path = vdir / LINEAGE
    try:
        recorded = json.loads(lin_path.read_text()).get("files") if lin_path.exists() else None
    except (OSError, ValueError) as exc:
        raise IntegrityError(f"version {version} of model '{model}': {lin_path} is unreadable ({exc}); "
                             f"its files cannot be verified") from exc
    if recorded is None:
        log.warning("version %s of model '%s' has no file fingerprints (published before they were recorded): "
                    "not verified", version, model)
        return False
    _compare(recorded, version_manifest(vdir), f"version {version} of model '{model}' ({vdir})")
    return True


def _compare(recorded: dict[str, str], actual: dict[str, str], what: str) -> None:
    for name, digest in recorded.items():
        if name not in actual:
            raise IntegrityError(f"{what}: file '{name}' is missing (recorded in {LINEAGE} at publish); "
                                 f"the version is not served")
        if actual[name] != digest:
            raise IntegrityError(f"{what}: file '{name}' does not match its fingerprint in {LINEAGE} "
                                 f"(recorded {digest[:19]}..., now {actual[name][:19]}...): the file changed "
                                 f"since publish; the version is not served -- publish it again")
    added = sorted(set(actual) - set(recorded))
    if added:
        raise IntegrityError(f"{what}: file '{added[0]}' was added after publish ({len(added)} file(s) not in "
                             f"{LINEAGE}); the version is not served")


def list_versions(repo: Path, model: str) -> list[int]:
    d = Path(repo) / model
    return sorted(int(p.name) for p in d.iterdir() if p.is_dir() and p.name.isdigit()) if d.is_dir() else []


def next_version(repo: Path, model: str) -> int:
    return max(list_versions(repo, model), default=0) + 1


def served_version(repo: Path, model: str) -> Optional[int]:
    """The version pinned in the model's config.pbtxt (None when nothing is published)."""
    cfg = Path(repo) / model / CONFIG
    if not cfg.exists():
        return None
    m = _read_config(cfg)
    if m.version_policy.HasField("specific") and m.version_policy.specific.versions:
        return int(max(m.version_policy.specific.versions))
    versions = list_versions(repo, model)
    return versions[-1] if versions else None


def _read_config(path: Path):
    import tritonclient.grpc.model_config_pb2 as mc

    return text_format.Parse(path.read_text(), mc.ModelConfig())


def _atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


@contextlib.contextmanager
def locked(repo: Path, model: str, wait: bool = True):
    """Serialise changes to one model's repository folder across processes (concurrent runs).
    Yields True with the lock held; with ``wait=False``, False at once when another holder has it."""
    d = Path(repo) / model
    d.mkdir(parents=True, exist_ok=True)
    with open(d / LOCK, "w") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
        except BlockingIOError:
            yield False
            return
        try:
            yield True
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def publish(version_dir: Path, version_config: Path, repo: Path, model: str,
            lineage: Optional[dict] = None) -> tuple[int, Path]:
    """Copy a staged, verified version into the repository as the next free version number.

    The copy is made under a hidden name (``.incoming-*`` is not a numeric version, so Triton never
    considers it) and appears by a single rename. The number is allocated under the repository
    lock, so concurrent runs get distinct versions. Publishing does not change what is served
    (see :func:`promote`). The sha256 of every file of the staged version is recorded in lineage.json
    (``files``) and the copy is checked against it. Returns (version, path).
    """
    target = Path(repo) / model
    target.mkdir(parents=True, exist_ok=True)
    staged = version_manifest(version_dir)
    staged.pop(VERSION_CONFIG, None)
    staged[VERSION_CONFIG] = file_fingerprint(version_config)
    incoming = target / f".incoming-{os.getpid()}-{time.monotonic_ns()}"
    shutil.copytree(version_dir, incoming)
    shutil.copyfile(version_config, incoming / VERSION_CONFIG)
    try:
        _compare(staged, version_manifest(incoming), f"the copy of {version_dir} being published")
        with locked(repo, model):
            version = next_version(repo, model)
            (incoming / LINEAGE).write_text(json.dumps({**(lineage or {}), "version": version, "files": staged},
                                                       indent=2, default=str))
            final = target / str(version)
            os.rename(incoming, final)
    except BaseException:
        shutil.rmtree(incoming, ignore_errors=True)
        raise
    return version, final


def write_served_config(repo: Path, model: str, version: int, instance_count: int = 1) -> None:
    """Make ``version`` the served one: its own config + a version_policy pinning it."""
    vdir = Path(repo) / model / str(version)
    if not vdir.is_dir():
        raise RepositoryError(f"version {version} of model '{model}' not found in {repo}")
    m = _read_config(vdir / VERSION_CONFIG)
    m.version_policy.Clear()
    m.version_policy.specific.versions.append(version)
    del m.instance_group[:]
    group = m.instance_group.add()
    group.count = instance_count
    _atomic_write(Path(repo) / model / CONFIG, text_format.MessageToString(m))


@dataclass
class LiveServer:
    """A running Triton to switch (explicit model-control mode). ``api_key`` for the restricted API."""

    url: str
    api_key: Optional[str] = None
    timeout_s: float = 300.0

    @property
    def headers(self) -> Optional[dict]:
        return {ADMIN_HEADER: self.api_key} if self.api_key else None




def _reload(live: LiveServer, model: str, version: int) -> None:
    import tritonclient.http as httpclient

    with httpclient.InferenceServerClient(live.url, network_timeout=live.timeout_s, connection_timeout=live.timeout_s) as c:
        c.load_model(model, headers=live.headers)  # blocks until loaded; old version serves meanwhile
        deadline = time.monotonic() + live.timeout_s
        while not c.is_model_ready(model, str(version)):
            if time.monotonic() > deadline:
                raise RepositoryError(f"Triton at {live.url} did not make {model} v{version} ready")
            time.sleep(0.2)


def promote(repo: Path, model: str, version: int, live: Optional[LiveServer] = None,
            instance_count: int = 1, reason: str = "promote") -> dict:
    """Serve ``version``: pin it in config.pbtxt and, if a live server is given, reload it there."""
    with locked(repo, model):
        return _promote(repo, model, version, live, instance_count, reason)


def _promote(repo: Path, model: str, version: int, live: Optional[LiveServer], instance_count: int,
             reason: str) -> dict:
    previous = served_version(repo, model)
    served_now = f"version {previous} is served" if previous is not None else "nothing is served"
    if not (Path(repo) / model / str(version)).is_dir():
        raise RepositoryError(f"version {version} of model '{model}' not found in {repo}")
    try:
        verify_version(repo, model, version)  # every file as published, before anything switches
    except IntegrityError as exc:
        raise IntegrityError(f"{reason} refused: {exc}; nothing changed: {served_now}") from exc
    cfg_path = Path(repo) / model / CONFIG
    hist_path = Path(repo) / model / HISTORY
    backup = cfg_path.read_text() if cfg_path.exists() else None
    try:  # history.jsonl must be writable before the pin switches: both change, or neither
        history = open(hist_path, "ab", buffering=0)  # unbuffered: a failed write fails here, not at close
    except OSError as exc:
        raise RepositoryError(f"{reason} of version {version} refused: cannot write {hist_path} ({exc}); "
                              f"nothing changed: {served_now}") from exc
    with history:
        write_served_config(repo, model, version, instance_count)
        if live is not None:
            try:
                _reload(live, model, version)
            except Exception:
                # the server kept serving the previous version; put the config back to match it
                _restore_config(cfg_path, backup)
                raise
        event = {"time": time.time(), "action": reason, "version": version, "previous": previous,
                 "live_server": live.url if live else None}
        try:
            line = (json.dumps(event) + "\n").encode()
            if history.write(line) != len(line):
                raise OSError(f"short write to {hist_path}")
            _fsync(history)
        except OSError as exc:
            _restore_config(cfg_path, backup)
            restored = served_now
            if live is not None and previous is not None:
                try:
                    _reload(live, model, previous)
                except Exception as reload_exc:  # noqa: BLE001 - said in the message
                    restored = (f"the pin is back on version {previous} but the live server could not be "
                                f"switched back ({reload_exc}): it may still serve version {version}")
            raise RepositoryError(f"{reason} of version {version} undone: writing {hist_path} failed after the "
                                  f"switch ({exc}); the previous pin was put back: {restored}") from exc
    return event


def _fsync(fh) -> None:
    """Flush the history line to disk (a file that cannot be fsynced, e.g. a pipe, is left as written)."""
    import errno

    try:
        os.fsync(fh.fileno())
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.EROFS, errno.ENOTSUP):
            raise


def _restore_config(cfg_path: Path, backup: Optional[str]) -> None:
    """Put the served config back as it was before a switch (none: remove the one written)."""
    if backup is not None:
        _atomic_write(cfg_path, backup)
    else:
        cfg_path.unlink(missing_ok=True)


def rollback(repo: Path, model: str, live: Optional[LiveServer] = None, instance_count: int = 1) -> dict:
    """Serve the newest version older than the one served now."""
    with locked(repo, model):
        return _promote(repo, model, rollback_target(repo, model), live, instance_count, reason="rollback")


def rollback_target(repo: Path, model: str) -> int:
    """The version a rollback would serve: the newest older than the one served now."""
    current = served_version(repo, model)
    older = [v for v in list_versions(repo, model) if current is None or v < current]
    if not older:
        raise RepositoryError(f"no version older than {current} to roll back to for model '{model}'")
    return older[-1]


def prune(repo: Path, model: str, keep: int) -> list[int]:
    """Delete all but the newest ``keep`` versions; never the served one. Returns removed versions."""
    if keep < 1:
        raise ValueError("keep must be >= 1")
    with locked(repo, model):
        return _prune(repo, model, keep)


def _prune(repo: Path, model: str, keep: int) -> list[int]:
    served = served_version(repo, model)
    versions = list_versions(repo, model)
    doomed = [v for v in versions[:-keep] if v != served]
    for v in doomed:
        src = Path(repo) / model / str(v)
        trash = src.with_name(f".deleted-{v}-{os.getpid()}")
        os.rename(src, trash)  # disappears from Triton's view at once
        shutil.rmtree(trash, ignore_errors=True)
    return doomed


def describe(repo: Path, model: str) -> list[dict]:
    """One row per version: lineage summary and whether it is served."""
    served = served_version(repo, model)
    rows = []
    for v in list_versions(repo, model):
        lin_path = Path(repo) / model / str(v) / LINEAGE
        lin = json.loads(lin_path.read_text()) if lin_path.exists() else {}
        rows.append({
            "version": v,
            "served": v == served,
            "created": lin.get("created"),
            "run_dir": lin.get("run_dir"),
            "data_fingerprint": (lin.get("data") or {}).get("fingerprint"),
            "metrics": lin.get("metrics"),
        })
    return rows


