"""`recsys serve` under attack and faults, as a real subprocess with a real tritonserver.

A tiny python-backend model (version N answers x * N) keeps it fast: the supervisor and the admin
key do not depend on what the model computes. Checked here:
- the model-repository API refuses load/unload without the admin key over HTTP (403) and gRPC
  (Triton 2.51: UNAVAILABLE, "This protocol is restricted"), and works with it; the key is neither in
  tritonserver's command line nor its environment, and its file is 0600; the project's promote path
  finds it;
- a failed promotion leaves /v2/health/ready at 200 (the served version keeps serving);
- SIGKILL of the python stub -> the model's ready endpoint says "not ready" within 2 s and correct answers
  come back within 10 s (model reload);
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


def test_a_killed_stub_is_replaced_within_10_s(serve):
    triton = serve.triton()
    stubs = [p for p in children(triton) if alive(p) and "stub" in cmdline(p)]
    assert stubs  # (a just-unloaded version's stub may still be exiting: kill them all)
    t0 = time.monotonic()
    for pid in stubs:
        os.kill(pid, signal.SIGKILL)
    while any(alive(p) for p in stubs):
        time.sleep(0.01)
    ready = f"http://{serve.url}/v2/models/{MODEL}/ready"
    while _status(ready) == 200 and time.monotonic() - t0 < RECOVER_S:
        time.sleep(0.02)
    lied_s = time.monotonic() - t0
    assert lied_s < 2.0, f"the model's ready endpoint said 200 for {lied_s:.1f} s after its stub died\n{serve.log()}"
    assert serve.answers(1, within_s=RECOVER_S), serve.log()
    print(f"stub kill: not ready after {lied_s:.2f} s, answers again after {time.monotonic() - t0:.1f} s")
    assert "not healthy" in serve.log() and "reload" in serve.log()


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
