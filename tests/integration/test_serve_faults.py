"""`recsys serve` under attack and faults, as a real subprocess with a real tritonserver.

A tiny python-backend model (version N answers x * N) keeps it fast: the supervisor and the admin
key do not depend on what the model computes. Checked here:
- the model-repository API refuses load/unload without the admin key over HTTP (403) and gRPC
  (Triton 2.51: UNAVAILABLE, "This protocol is restricted"), and works with it; the key is neither in
  tritonserver's command line nor its environment, and its file is 0600; the project's promote path
  finds it;
- a failed promotion leaves /v2/health/ready at 200 (the served version keeps serving);
- SIGKILL of the python stub -> decided a death from /proc and Triton's index without waiting for a probe:
  the model's ready endpoint says "not ready" within READY_BOUND_S (target 0.5 s; the probe path took
  ~1.1 s idle, 2-4 s loaded) and correct answers come back within 10 s (model reload);
- promotions and rollbacks under load, whose replaced stubs exit while nothing else changes, are never
  taken for a death: no failed request, the ready endpoint 200 throughout, no unload/reload;
- SIGKILL of tritonserver -> restarted within 10 s, its orphaned stub killed, its /dev/shm region removed;
- both are seen by the supervisor's /proc watch, not its probe: the module's server probes every 30 s;
- a model that cannot come back -> `recsys serve` gives up with a non-zero exit, nothing left behind.
"""
from __future__ import annotations

import os
import signal
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import requests
import tritonclient.grpc as grpcclient
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from benchmarks.robustness import alive, children, cmdline  # /proc helpers shared with make robustness

from pipeline_lib.config import load_config
from pipeline_lib.serving import admin_key, repository
from pipeline_lib.serving.server import free_ports, live_server, shm_regions_of
from tests.support import ROOT

pytestmark = pytest.mark.integration
MODEL = "tiny"
X = np.array([1.0, 2.0, 3.0], dtype=np.float32)
RECOVER_S = 10.0
# the model's ready endpoint must say "not ready" this soon after its stub died: documented target 0.5 s
# (measured ~0.1 s idle); generous here for a loaded 2-core machine, and still below the ~1.1 s an idle
# machine took while the supervisor waited for its probe (Triton's own "not healthy" verdict)
READY_BOUND_S = 1.0

CONFIG = """name: "tiny"
backend: "python"
max_batch_size: 0
input [ { name: "x" data_type: TYPE_FP32 dims: [ -1 ] } ]
output [ { name: "y" data_type: TYPE_FP32 dims: [ -1 ] } ]
instance_group [ { count: 1 kind: KIND_CPU } ]
"""
MODEL_PY = """import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        return [pb_utils.InferenceResponse([pb_utils.Tensor(
            "y", (pb_utils.get_input_tensor_by_name(r, "x").as_numpy() * {v}).astype(np.float32))]) for r in requests]
"""
BROKEN_PY = "raise RuntimeError('this version cannot load')\n"


def write_repo(root: Path) -> Path:
    repo = root / "model_repository"
    for v, code in ((1, MODEL_PY.format(v=1)), (2, MODEL_PY.format(v=2)), (3, BROKEN_PY)):
        (repo / MODEL / str(v)).mkdir(parents=True)
        (repo / MODEL / str(v) / "model.py").write_text(code)
        (repo / MODEL / str(v) / repository.VERSION_CONFIG).write_text(CONFIG)
    repository.write_served_config(repo, MODEL, 1)
    return repo


class Serve:
    """`python -m flows.cli serve` on free ports over ``repo``."""

    def __init__(self, repo: Path, tmp: Path, **supervisor):
        self.http, self.grpc, self.metrics = free_ports(3)
        sets = {"export.model_repository": repo, "export.model_name": MODEL, "serving.http_port": self.http,
                "serving.grpc_port": self.grpc, "serving.metrics_port": self.metrics,
                "serving.supervisor.probe_interval_s": 0.5, "serving.supervisor.backoff_initial_s": 0.2,
                **{f"serving.supervisor.{k}": v for k, v in supervisor.items()}}
        self.sets = sets
        args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
        self.log_path = tmp / f"serve-{self.http}.log"
        self.out = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", *args], cwd=ROOT,
                                     stdout=self.out, stderr=subprocess.STDOUT)
        self.url = f"127.0.0.1:{self.http}"
        assert self.answers(1, within_s=120), self.log()

    def log(self) -> str:
        return self.log_path.read_text()

    def triton(self) -> int:
        pids = [p for p in children(self.proc.pid) if "tritonserver" in cmdline(p)]
        assert len(pids) == 1, (pids, self.log())
        return pids[0]

    def answers(self, factor: int, within_s: float) -> bool:
        deadline = time.monotonic() + within_s
        while time.monotonic() < deadline:
            try:
                with httpclient.InferenceServerClient(self.url, connection_timeout=2, network_timeout=5) as c:
                    inp = httpclient.InferInput("x", [3], "FP32")
                    inp.set_data_from_numpy(X)
                    if np.array_equal(c.infer(MODEL, [inp]).as_numpy("y"), X * factor):
                        return True
            except Exception:  # noqa: BLE001 - not back yet
                pass
            if self.proc.poll() is not None:
                return False
            time.sleep(0.1)
        return False

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(timeout=60)
        self.out.close()
        return self.proc.returncode


@pytest.fixture(scope="module")
def serve(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("serve_faults")
    s = Serve(write_repo(tmp), tmp, probe_interval_s=30)  # faults must be seen by the /proc watch
    s.repo = tmp / "model_repository"
    yield s
    s.stop()


def test_repository_api_needs_the_admin_key_over_http_and_grpc(serve):
    pid = serve.triton()
    key_file = admin_key.key_path("127.0.0.1", serve.http)
    key = key_file.read_text()
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600 and len(key) >= 32
    assert key.encode() not in Path(f"/proc/{pid}/cmdline").read_bytes()
    assert key.encode() not in Path(f"/proc/{pid}/environ").read_bytes()
    with httpclient.InferenceServerClient(serve.url) as h:
        with pytest.raises(InferenceServerException) as refused:
            h.unload_model(MODEL)
        assert refused.value.status() == "403" and admin_key.ADMIN_HEADER in refused.value.message()
        with pytest.raises(InferenceServerException):
            h.load_model(MODEL, headers={admin_key.ADMIN_HEADER: "wrong"})
        h.load_model(MODEL, headers={admin_key.ADMIN_HEADER: key})
    with grpcclient.InferenceServerClient(f"127.0.0.1:{serve.grpc}") as g:
        with pytest.raises(InferenceServerException) as refused:
            g.unload_model(MODEL)
        # Triton 2.51's own status for a restricted gRPC call; the message says why
        assert refused.value.status() == "StatusCode.UNAVAILABLE" and "restricted" in refused.value.message()
        g.load_model(MODEL, headers={admin_key.ADMIN_HEADER: key})
        assert g.is_model_ready(MODEL)
    assert serve.answers(1, within_s=5)


def test_promote_uses_the_key_file_and_a_failed_promotion_leaves_ready_true(serve):
    cfg = load_config(None, {"serving": {"http_port": serve.http}})
    live = live_server(cfg.serving)
    assert live is not None and live.api_key
    with pytest.raises(Exception):
        repository.promote(serve.repo, MODEL, 3, live)  # version 3 cannot load: the served one stays
    assert repository.served_version(serve.repo, MODEL) == 1 and serve.answers(1, within_s=5)
    ready = f"http://{serve.url}/v2/health/ready"
    assert requests.get(ready, timeout=5).status_code == 200
    repository.promote(serve.repo, MODEL, 2, live)
    assert serve.answers(2, within_s=5) and requests.get(ready, timeout=5).status_code == 200
    repository.promote(serve.repo, MODEL, 1, live)
    assert serve.answers(1, within_s=5)


def _status(url: str) -> int:
    try:
        return requests.get(url, timeout=5).status_code
    except requests.ConnectionError:
        return 0  # not answering: not ready either


def test_promote_and_rollback_under_load_are_never_taken_for_a_dead_stub(serve):
    """Each switch replaces the stub (Triton loads the new version, then unloads the old one, whose stub
    exits ~1 s after the switch returned, with the repository lock free): the supervisor's watch sees
    every such exit and must leave the served version alone."""
    cfg = load_config(None, {"serving": {"http_port": serve.http}})
    live = live_server(cfg.serving)
    outcomes: dict[str, int] = {"ok": 0, "error": 0}
    errors: list[str] = []
    not_ready: list[int] = []
    stop = False

    def client() -> None:
        with httpclient.InferenceServerClient(serve.url, connection_timeout=5, network_timeout=10) as c:
            while not stop:
                inp = httpclient.InferInput("x", [3], "FP32")
                inp.set_data_from_numpy(X)
                try:
                    y = c.infer(MODEL, [inp]).as_numpy("y")
                    ok = np.array_equal(y, X) or np.array_equal(y, X * 2)
                    outcomes["ok" if ok else "error"] += 1
                except InferenceServerException as exc:
                    outcomes["error"] += 1
                    errors.append(str(exc)[:200])

    def ready() -> None:
        with requests.Session() as session:
            while not stop:
                code = session.get(f"http://{serve.url}/v2/models/{MODEL}/ready", timeout=5).status_code
                if code != 200:
                    not_ready.append(code)
                time.sleep(0.02)

    log_before = len(serve.log())
    threads = [threading.Thread(target=client), threading.Thread(target=ready)]
    for t in threads:
        t.start()
    try:
        for dwell in (1.5, 0.0, 1.5):  # 0: switch back at once, while the replaced stub still exits
            repository.promote(serve.repo, MODEL, 2, live)
            time.sleep(dwell)
            repository.rollback(serve.repo, MODEL, live)
            time.sleep(dwell)
        time.sleep(1.5)  # the last replaced stub exits
    finally:
        stop = True
        for t in threads:
            t.join(timeout=30)
    log = serve.log()[log_before:]
    print(f"promote/rollback under load: {outcomes['ok']} answers, {outcomes['error']} errors; "
          f"{log.count('exited')} stub exits judged by the supervisor")
    assert outcomes["ok"] > 0 and outcomes["error"] == 0, (errors[:3], log)
    assert not not_ready, f"the model's ready endpoint said {sorted(set(not_ready))} during the switches\n{log}"
    assert repository.served_version(serve.repo, MODEL) == 1 and serve.answers(1, within_s=5)
    assert "exited" in log, f"the supervisor saw no replaced stub exit\n{log}"  # the watch was exercised
    assert "unload" not in log and "reload" not in log and "restart" not in log, log


def test_a_killed_stub_is_seen_dead_at_once_and_replaced_within_10_s(serve):
    triton = serve.triton()
    stubs = [p for p in children(triton) if alive(p) and "stub" in cmdline(p)]
    assert stubs  # (a just-unloaded version's stub may still be exiting: kill them all)
    log_before = len(serve.log())
    t0 = time.monotonic()
    for pid in stubs:
        os.kill(pid, signal.SIGKILL)
    while any(alive(p) for p in stubs):
        time.sleep(0.005)
    dead_s = time.monotonic() - t0
    ready = f"http://{serve.url}/v2/models/{MODEL}/ready"
    with requests.Session() as session:
        while session.get(ready, timeout=5).status_code == 200 and time.monotonic() - t0 < RECOVER_S:
            time.sleep(0.01)
    lied_s = time.monotonic() - t0
    assert serve.answers(1, within_s=RECOVER_S), serve.log()
    print(f"stub kill: dead after {dead_s:.3f} s, not ready after {lied_s:.3f} s (bound {READY_BOUND_S} s), "
          f"answers again after {time.monotonic() - t0:.2f} s")
    assert lied_s < READY_BOUND_S, f"the model's ready endpoint said 200 for {lied_s:.2f} s after its stub died\n{serve.log()}"
    deadline = time.monotonic() + RECOVER_S
    while "answers again" not in serve.log()[log_before:] and time.monotonic() < deadline:
        time.sleep(0.05)  # the supervisor's own check of the reload may finish after ours
    log = serve.log()[log_before:]
    # decided from /proc and Triton's index, not by a probe waiting for Triton's "not healthy"
    assert "exited while version 1 is READY" in log and "unloaded; reload" in log, log
    assert "probe inference failed" not in log and "answers again" in log, log


def test_a_killed_tritonserver_is_restarted_within_10_s(serve):
    old = serve.triton()
    old_stubs = children(old)
    regions = shm_regions_of(old)
    assert regions and old_stubs
    t0 = time.monotonic()
    os.kill(old, signal.SIGKILL)
    assert serve.answers(1, within_s=RECOVER_S), serve.log()
    print(f"tritonserver kill: answers again after {time.monotonic() - t0:.1f} s")
    assert serve.triton() != old and "tritonserver is not running" in serve.log()
    assert not [p for p in old_stubs if alive(p)], "orphaned stub of the killed server"
    assert not [r for r in regions if os.path.exists(r)], "leaked /dev/shm region"


def test_serve_gives_up_with_a_non_zero_exit_and_leaves_nothing_behind(tmp_path):
    repo = write_repo(tmp_path)
    s = Serve(repo, tmp_path, max_failures=2, window_s=60)
    triton = s.triton()
    stubs, regions, key_file = children(triton), shm_regions_of(triton), admin_key.key_path("127.0.0.1", s.http)
    (repo / MODEL / "1" / "model.py").write_text(BROKEN_PY)  # neither a reload nor a restart can bring it back
    os.kill(stubs[0], signal.SIGKILL)
    try:
        code = s.proc.wait(timeout=60)
    finally:
        s.stop()
    out = s.log()
    assert code == 3, out
    assert "giving up" in out and "Traceback" not in out
    assert not [p for p in [triton, *stubs] if alive(p)]
    assert not [r for r in regions if os.path.exists(r)] and not key_file.exists()
