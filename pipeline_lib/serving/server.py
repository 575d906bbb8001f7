"""Stage 6 -- ensemble -> served: run a real Triton Inference Server over the model repository.

On CPU machines the ``tritonserver`` binary comes from the ``nvidia-pytriton`` wheel (Triton
2.51 with the python backend). On GPU/production, the same repository is served by NVIDIA's
Triton/Merlin container (``docker/``); :func:`find_tritonserver` prefers a ``tritonserver`` on
PATH only when ``TRITONSERVER_BIN`` points at it.
"""
from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Optional

from pipeline_lib.quiet import CHILD_WARNINGS
from pipeline_lib.serving import admin_key as keys
from pipeline_lib.serving.repository import LiveServer

log = logging.getLogger(__name__)


class ServerError(RuntimeError):
    pass


class PortClash(ServerError):
    """Triton could not bind one of its ports (taken by another process since it was picked)."""


# What Triton 2.51 prints when it cannot bind a port. A failed gRPC bind exits; a failed HTTP or
# metrics bind is logged ("failed to start HTTP service: ... already in use") and the process keeps
# running without that endpoint, so the log is watched during start-up as well.
_PORT_CLASH = re.compile(r"already in use|cannot listen to .* at the same address", re.IGNORECASE)
_SERVICE_FAILED = re.compile(r"failed to start (\w+) service: ([^\n\"]*)", re.IGNORECASE)


PROGRESS_EVERY_S = 15.0  # a progress line while Triton starts (python-backend models load in ~1-50 s on CPU)
READY_POLL_S = 0.1  # how often start() asks whether the server and its models are ready


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """``n`` distinct free TCP ports on ``host``. All the sockets stay bound until every port is
    picked, so the same port is never handed out twice in one call (which separate bind-to-0 calls
    can do: the kernel may return a just-released port)."""
    socks: list[socket.socket] = []
    try:
        for _ in range(n):
            s = socket.socket()
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


def free_port(host: str = "127.0.0.1") -> int:
    return free_ports(1, host)[0]


@dataclass
class TritonPaths:
    binary: Path
    backend_dir: Path
    lib_dirs: list[Path]


def find_tritonserver(cache_dir: Optional[Path] = None) -> TritonPaths:
    """Locate tritonserver + python backend; prepare a backend dir holding the stub for this Python."""
    override = os.environ.get("TRITONSERVER_BIN")
    if override:
        binary = Path(override)
        backend_dir = Path(os.environ.get("TRITON_BACKEND_DIR", "/opt/tritonserver/backends"))
        return TritonPaths(binary, backend_dir, [])

    try:
        import pytriton
    except ImportError as exc:  # pragma: no cover - dependency of the project
        raise ServerError("nvidia-pytriton is not installed: it provides the tritonserver binary") from exc
    root = Path(pytriton.__file__).parent / "tritonserver"
    binary = root / "bin" / "tritonserver"
    libs = Path(pytriton.__file__).parent.parent / "nvidia_pytriton.libs"
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / ver / "triton_python_backend_stub"
    if not binary.exists() or not stub.exists():
        raise ServerError(f"tritonserver or the Python {ver} backend stub is missing under {root}")

    # A private backend directory (never mutate site-packages): python backend + this Python's stub.
    cache_dir = cache_dir or Path(os.environ.get("RECSYS_CACHE_DIR", Path.home() / ".cache" / "recsys-pipeline"))
    backend_dir = cache_dir / f"triton-backends-py{ver}"
    py_backend = backend_dir / "python"
    py_backend.mkdir(parents=True, exist_ok=True)
    for src in [*(root / "backends" / "python").iterdir(), stub]:
        dst = py_backend / src.name
        if not dst.exists() or dst.stat().st_size != src.stat().st_size:
            tmp = dst.with_name(f"{dst.name}.{os.getpid()}.tmp")  # unique: parallel test workers copy at once
            shutil.copy2(src, tmp)
            os.replace(tmp, dst)
    return TritonPaths(binary, backend_dir, [libs, Path(sysconfig.get_config_var("LIBDIR"))])


def _die_with_parent() -> None:
    """In the child before exec: Linux sends it SIGTERM when the starting process dies, so a killed
    `recsys serve` or test run never leaves an orphan tritonserver holding the ports."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def server_env(paths: TritonPaths) -> dict:
    env = dict(os.environ)
    # The stub's embedded interpreter finds its prefix from the first python3 on PATH.
    env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
    ld = [str(p) for p in paths.lib_dirs] + ([env["LD_LIBRARY_PATH"]] if env.get("LD_LIBRARY_PATH") else [])
    if ld:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(ld)
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    if env.get("PYTHONWARNINGS", "") in ("", CHILD_WARNINGS):  # unless the user set their own: none in triton.log
        env["PYTHONWARNINGS"] = "ignore"
    return env


@dataclass
class ServerOptions:
    """How :class:`TritonServer` runs tritonserver. ``auto_ports=True`` ignores the three ports and
    picks free ones at start(); if another process takes one of them before Triton binds it,
    start() picks again. ``model_control``: none | poll | explicit (``load_models`` at start;
    ``repository_poll_secs`` for poll). The model-repository API (load, unload, upload) answers only
    requests carrying the admin key (:mod:`pipeline_lib.serving.admin_key`): ``admin_api_key``, or
    a fresh key per server when None; ``restrict_repository_api=False`` leaves it open.
    ``auto_complete_config``: let Triton and its backends complete model configs. Off by default: every
    config this project writes is complete, and for a python-backend model the completion step starts one
    more stub process that imports model.py (and what it imports) before the model's own instance does."""

    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    log_file: Optional[Path] = None
    extra_args: Optional[list[str]] = None
    model_control: str = "none"
    load_models: Optional[list[str]] = None
    repository_poll_secs: int = 5
    admin_api_key: Optional[str] = None
    restrict_repository_api: bool = True
    auto_ports: bool = False
    auto_complete_config: bool = False
    env: Optional[dict] = None  # extra environment of the server (and its python stubs): the impression log's


class TritonServer:
    """A tritonserver child process; use as a context manager or call start()/stop()."""

    def __init__(self, model_repository: Path, options: Optional[ServerOptions] = None, **overrides: Any):
        """``options`` (default :class:`ServerOptions`), each field also settable by keyword
        (``TritonServer(repo, log_file=..., model_control="explicit")``)."""
        o = replace(options or ServerOptions(), **overrides)
        self.options = o
        self.model_repository = Path(model_repository).resolve()
        self.host = o.host
        self.http_port, self.grpc_port, self.metrics_port = o.http_port, o.grpc_port, o.metrics_port
        self.log_file = Path(o.log_file) if o.log_file else self.model_repository.parent / "triton.log"
        self.extra_args = list(o.extra_args or [])
        self.model_control = o.model_control
        self.load_models = list(o.load_models or [])
        self.repository_poll_secs = o.repository_poll_secs
        self.admin_api_key = o.admin_api_key  # None: generated at start() (then kept across restarts)
        self.restrict_repository_api = o.restrict_repository_api
        self.key_file: Optional[Path] = None
        self._key_in_argv: Optional[str] = None  # only without the shim (no C compiler), scrubbed after start
        self._pgid: Optional[int] = None
        self._shm_regions: set[str] = set()
        self.process: Optional[subprocess.Popen] = None
        self.auto_ports = o.auto_ports

    @classmethod
    def on_free_ports(cls, model_repository: Path, **kwargs) -> "TritonServer":
        """A local server on three free ports (tests, smoke checks, benchmarks)."""
        return cls(model_repository, auto_ports=True, **kwargs)

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    def command(self, paths: TritonPaths) -> list[str]:
        return [
            str(paths.binary),
            f"--model-repository={self.model_repository}",
            f"--backend-directory={paths.backend_dir}",
            f"--http-address={self.host}",
            f"--grpc-address={self.host}",
            f"--metrics-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-port={self.grpc_port}",
            f"--metrics-port={self.metrics_port}",
            "--exit-on-error=true",
            # not strict: Triton keeps a version whose load failed as UNAVAILABLE for the process lifetime
            # (no reload/unload clears it) and strict readiness then answers 400 forever, although the
            # served version is READY; /v2/models/<name>/ready says whether the model is ready
            "--strict-readiness=false",
            "--exit-timeout-secs=10",
            *([] if self.options.auto_complete_config else ["--disable-auto-complete-config"]),
            f"--model-control-mode={self.model_control}",
            *(f"--load-model={m}" for m in (self.load_models if self.model_control == "explicit" else [])),
            *([f"--repository-poll-secs={self.repository_poll_secs}"] if self.model_control == "poll" else []),
            *self._restricted_api_args(),
            *self.extra_args,
        ]

    def _restricted_api_args(self) -> list[str]:
        """Load/unload (model-repository API) only with the admin key; inference stays open. The key
        itself is never in argv when the shim is used (a placeholder is; see admin_key)."""
        if not self.restrict_repository_api:
            return []
        return keys.restricted_api_args(self._key_in_argv)

    def _prepare_key(self, env: dict) -> None:
        """Generate (once) and store the admin key; hand it to tritonserver without argv."""
        if not self.restrict_repository_api:
            return
        self.admin_api_key = self.admin_api_key or keys.new_key()
        self.key_file = keys.key_path(self.host, self.http_port)
        keys.write_key(self.key_file, self.admin_api_key)
        shim = keys.shim_library()
        if shim is None:
            log.warning("no C compiler for the admin-key shim: the key is in tritonserver's argv until it is "
                        "scrubbed right after start")
            self._key_in_argv = self.admin_api_key
            return
        self._key_in_argv = None
        env["LD_PRELOAD"] = os.pathsep.join([str(shim), *([env["LD_PRELOAD"]] if env.get("LD_PRELOAD") else [])])
        env[keys.KEY_ENV] = self.admin_api_key

    def start(self, timeout_s: float = 180.0, models: Optional[list[str]] = None,
              attempts: int = 3) -> "TritonServer":
        """Start and wait until the server and ``models`` are ready. With auto ports, a start that
        fails only because a port was taken in the meantime is retried on fresh ports."""
        if not self.model_repository.is_dir():
            raise ServerError(f"model repository not found: {self.model_repository}")
        paths = find_tritonserver()
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        for attempt in range(1, max(attempts, 1) + 1):
            if self.auto_ports:
                self.http_port, self.grpc_port, self.metrics_port = free_ports(3, self.host)
            t0 = time.monotonic()
            try:
                self._start_once(paths, timeout_s, models or [])
                log.info("Triton ready in %.1f s", time.monotonic() - t0)
                return self
            except PortClash as exc:
                if not self.auto_ports or attempt >= attempts:
                    raise
                log.warning("tritonserver could not bind its ports (attempt %d): %s; retrying on new ports",
                            attempt, str(exc).splitlines()[-1])
        raise AssertionError("unreachable")

    def _start_once(self, paths: TritonPaths, timeout_s: float, models: list[str]) -> "TritonServer":
        self._log_offset = self.log_file.stat().st_size if self.log_file.exists() else 0
        self._log: Any = open(self.log_file, "ab")
        what = f" and loading model {', '.join(repr(m) for m in models)}" if models else ""
        log.info("starting Triton (HTTP :%d, gRPC :%d)%s ... (log: %s)", self.http_port, self.grpc_port, what,
                 self.log_file)
        env = server_env(paths)
        env.update(self.options.env or {})
        self._prepare_key(env)
        self.process = subprocess.Popen(
            self.command(paths), env=env, stdout=self._log, stderr=subprocess.STDOUT,
            start_new_session=True, preexec_fn=_die_with_parent,
        )
        self._pgid = self.process.pid  # start_new_session: its own process group, which its python stubs join
        try:
            self.wait_ready(timeout_s, models)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout_s: float, models: list[str]) -> None:
        import tritonclient.http as httpclient

        start = time.monotonic()
        deadline, next_note = start + timeout_s, start + PROGRESS_EVERY_S
        # Short timeouts: a foreign process listening on the port must not stall the readiness loop.
        with httpclient.InferenceServerClient(self.http_url, connection_timeout=2.0, network_timeout=2.0) as client:
            while time.monotonic() < deadline:
                this_start = self._log_since_start()
                if self._key_in_argv and this_start.strip() and self.process is not None:
                    # Triton logs only after parsing its options: overwrite the key in its argv now
                    keys.scrub_argv(self.process.pid, self._key_in_argv)
                    self._key_in_argv = None
                exited = self.process is not None and self.process.poll() is not None
                failed = _SERVICE_FAILED.search(this_start)
                if exited or failed:
                    kind = PortClash if _PORT_CLASH.search(this_start) else ServerError
                    what = (f"exited with code {self.process.returncode}" if exited  # type: ignore[union-attr]
                            else f"could not start its {failed.group(1)} endpoint ({failed.group(2).strip()})")  # type: ignore[union-attr]
                    hint = (f"\na port is taken by another process (http {self.http_port}, grpc {self.grpc_port}, "
                            f"metrics {self.metrics_port}); pick others with serving.http_port/grpc_port/metrics_port"
                            if kind is PortClash else "")
                    raise kind(f"tritonserver {what} during start-up{hint}:\n{self.log_tail()}")
                try:
                    if client.is_server_ready() and all(client.is_model_ready(m) for m in models):
                        self.remember_shm_regions()
                        return
                except Exception:
                    pass
                if time.monotonic() >= next_note:
                    next_note += PROGRESS_EVERY_S
                    log.info("still waiting for Triton to load %s (%.0f s of at most %.0f s)",
                             ", ".join(models) or "its models", time.monotonic() - start, timeout_s)
                time.sleep(READY_POLL_S)
        raise ServerError(f"tritonserver not ready after {timeout_s:.0f} s:\n{self.log_tail()}")

    def _log_since_start(self) -> str:
        try:
            with open(self.log_file, "rb") as f:
                f.seek(getattr(self, "_log_offset", 0))
                return f.read().decode(errors="replace")
        except OSError:
            return ""

    def log_tail(self, n: int = 40) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def remember_shm_regions(self) -> None:
        """Note the python backend's shared-memory regions this server maps (read from
        /proc/PID/maps while it runs), so :meth:`stop` can remove them after a crash too."""
        if self.process is not None:
            self._shm_regions |= shm_regions_of(self.process.pid)

    def stub_pids(self) -> set[int]:
        """The live python-backend stubs of this server (its process group, less tritonserver itself)."""
        if self.process is None or self._pgid is None:
            return set()
        return group_pids(self._pgid) - {self.process.pid}

    def stubs(self) -> dict[int, "Stub"]:
        """The live python-backend stubs of this server by pid, each with the model version it runs."""
        return {pid: s for pid in self.stub_pids() if (s := stub_of(pid)) is not None}

    def stop(self, timeout_s: float = 30.0, keep_key: bool = False) -> None:
        """Stop tritonserver and clean up after it on every path: its python stubs (killed with the
        process group, also when Triton itself was killed and left them orphaned), the shared-memory
        regions it mapped, and -- unless ``keep_key`` (a restart) -- its admin key file."""
        proc, self.process = self.process, None
        if proc is not None and proc.poll() is None:
            self.remember_shm_regions()
            # Triton shuts down gracefully on SIGINT and SIGTERM alike. SIGTERM, because a process started
            # with SIGINT ignored (a background job of a script, nohup; Triton inherits that) would lose a
            # SIGINT sent before Triton installs its own handler, and a failed start then waited 30 s here.
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if self._pgid is not None:
            try:
                os.killpg(self._pgid, signal.SIGKILL)  # orphaned stubs of a killed server
            except (ProcessLookupError, PermissionError):
                pass
            self._pgid = None
        leaked = [r for r in sorted(self._shm_regions) if Path(r).exists()]
        for region in leaked:
            with contextlib.suppress(OSError):
                os.unlink(region)
        if leaked:
            log.info("removed %d shared-memory region(s) left by tritonserver", len(leaked))
        self._shm_regions = set()
        if not keep_key and self.key_file is not None:
            with contextlib.suppress(OSError):
                self.key_file.unlink()
            self.key_file = None
        if getattr(self, "_log", None):
            self._log.close()
            self._log = None

    def __enter__(self) -> "TritonServer":
        if self.process is None:
            self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()


SHM_PREFIX = "/dev/shm/triton_python_backend_shm"


def group_pids(pgid: int) -> set[int]:
    """The live (not zombie) processes of process group ``pgid``, read from /proc."""
    pids: set[int] = set()
    with contextlib.suppress(OSError):
        for p in Path("/proc").iterdir():
            if p.name.isdigit():
                with contextlib.suppress(OSError, ValueError, IndexError):
                    fields = p.joinpath("stat").read_text().rsplit(")", 1)[1].split()
                    if int(fields[2]) == pgid and fields[0] != "Z":  # pgid; state
                        pids.add(int(p.name))
    return pids


@dataclass(frozen=True)
class Stub:
    """A python-backend stub process: the model version whose instance it runs."""

    pid: int
    model: str
    version: Optional[int]
    instance: str  # Triton's instance name, e.g. "recsys_0_0"


def stub_of(pid: int) -> Optional[Stub]:
    """``pid`` as a python-backend stub, from its command line (None: not a stub, or gone). The python
    backend starts each instance's stub as ``triton_python_backend_stub <repo>/<model>/<version>/model.py
    <shm region> <sizes> <parent pid> <backend dir> <ipc handle> <instance name> ...`` (Triton 2.51,
    python_backend src/stub_launcher.cc)."""
    try:
        argv = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
    except OSError:
        return None
    if len(argv) < 2 or not argv[0].endswith(b"triton_python_backend_stub"):
        return None
    path = Path(os.fsdecode(argv[1]))
    version = path.parent.name
    instance = os.fsdecode(argv[8]) if len(argv) > 8 else ""
    return Stub(pid, path.parent.parent.name, int(version) if version.isdigit() else None, instance)


def is_alive(pid: int) -> bool:
    """``pid`` runs (exists and is not a zombie waiting for its parent)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def shm_regions_of(pid: int) -> set[str]:
    """The python backend's shared-memory files mapped by ``pid`` and the processes of its group."""
    pids = {pid} | group_pids(pid)
    regions: set[str] = set()
    for q in pids:
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{q}/maps").read_text().splitlines():
                path = line.split(maxsplit=5)[-1] if line.count(" ") >= 5 else ""
                if path.startswith(SHM_PREFIX):
                    regions.add(path.replace(" (deleted)", ""))
    return regions


def admin_key(cfg) -> Optional[str]:
    """The admin key set by config or environment (None: each server generates its own)."""
    return cfg.admin_api_key or os.environ.get("RECSYS_ADMIN_KEY") or None


def server_from_config(serving_cfg, repository: Path, model_name: str, log_file: Optional[Path] = None,
                       env: Optional[dict] = None) -> TritonServer:
    """The long-running server of `recsys serve`: explicit model control by default, so a
    promotion switches versions through the (optionally key-restricted) model-repository API.
    ``env``: extra environment (the impression log's, :func:`pipeline_lib.online.settings.server_env`)."""
    s = serving_cfg
    return TritonServer(repository, ServerOptions(
        s.host, s.http_port, s.grpc_port, s.metrics_port,
        log_file=log_file or Path(repository).resolve().parent / "triton.log",
        model_control=s.model_control, load_models=[model_name],
        repository_poll_secs=s.repository_poll_secs, admin_api_key=admin_key(s),
        restrict_repository_api=s.restrict_repository_api, env=env,
    ))


def live_server(serving_cfg):
    """The running Triton to switch after a promotion, or None (nothing running / not explicit mode)."""
    import tritonclient.http as httpclient

    if serving_cfg.model_control != "explicit":
        return None  # poll: Triton picks the new config up itself; none: served at next start
    url = f"{serving_cfg.host}:{serving_cfg.http_port}"
    try:
        with httpclient.InferenceServerClient(url, connection_timeout=2.0, network_timeout=2.0) as c:
            if not c.is_server_live():
                return None
    except Exception:
        return None
    return LiveServer(url, admin_key(serving_cfg) or keys.read_key(serving_cfg.host, serving_cfg.http_port))
