"""Keep a served model answering: the supervisor loop of ``recsys serve``.

Triton's ready endpoints do not see every outage: a python-backend stub that died (killed, out of
memory) leaves the model READY while every request fails with ``Stub process ... is not healthy``,
and Triton 2.51 never restarts it. So the supervisor probes with a real inference, built from the
served model's config (one row of zeros per required input), every ``probe_interval_s``, and at once
when tritonserver or one of the stubs it saw healthy exits (watched in /proc every 0.1 s, so the
ready endpoint lies for a fraction of a second rather than a probe interval):

* tritonserver exited -> restart it (same ports, same admin key);
* the probe fails because the model cannot run at all (a dead stub, not loaded; not when the
  model's own code refuses the probe's zeros, which shows it alive) -> unload the model at once (its
  ready endpoint then says "not ready", which is the truth), then, after the backoff, load the served
  version again (both through the admin API, under the repository lock so they never race a
  promotion); if that fails, restart the server.

Each recovery waits a backoff (doubling from ``backoff_initial_s`` up to ``backoff_max_s``) and is
logged with its reason. More than ``max_failures`` failures within ``window_s`` -> give up:
:meth:`Supervisor.run` stops the server and returns a non-zero exit code. Every exit path goes
through :meth:`TritonServer.stop`, which also removes orphaned stubs and leaked /dev/shm regions.
"""
from __future__ import annotations

import logging
import re
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from pipeline_lib.serving.admin_key import ADMIN_HEADER
from pipeline_lib.serving.server import ServerError, TritonServer, is_alive

log = logging.getLogger(__name__)

GAVE_UP = 3  # exit code of `recsys serve` when the supervisor gives up

_NP = {"TYPE_BOOL": np.bool_, "TYPE_INT8": np.int8, "TYPE_INT16": np.int16, "TYPE_INT32": np.int32,
       "TYPE_INT64": np.int64, "TYPE_UINT8": np.uint8, "TYPE_UINT16": np.uint16, "TYPE_UINT32": np.uint32,
       "TYPE_UINT64": np.uint64, "TYPE_FP16": np.float16, "TYPE_FP32": np.float32, "TYPE_FP64": np.float64}


@dataclass
class SupervisorPolicy:
    probe_interval_s: float = 2.0
    probe_timeout_s: float = 10.0
    max_failures: int = 5
    window_s: float = 300.0
    backoff_initial_s: float = 0.5
    backoff_max_s: float = 30.0
    startup_timeout_s: float = 180.0


def probe_inputs(config: dict) -> list:
    """One request row from a model config (HTTP JSON form): zeros / empty strings, optional inputs left out."""
    import tritonclient.http as httpclient

    batched = int(config.get("max_batch_size", 0)) > 0
    inputs = []
    for spec in config.get("input", []):
        if spec.get("optional"):
            continue
        dims = [1 if int(d) < 0 else int(d) for d in spec.get("dims", [])]
        shape = ([1] if batched else []) + (dims or ([] if batched else [1]))
        dtype = spec.get("data_type", "TYPE_FP32")
        if dtype == "TYPE_STRING":
            arr = np.full(shape, b"0", dtype=np.object_)
            triton = "BYTES"
        else:
            arr = np.zeros(shape, dtype=_NP.get(dtype, np.float32))
            triton = dtype.replace("TYPE_", "")
            if spec["name"].endswith("__offsets") and arr.shape[-1] == 1:  # list feature: one row of one value
                arr = np.concatenate([arr, np.ones_like(arr)], axis=-1)
        inp = httpclient.InferInput(spec["name"], list(arr.shape), triton)
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    return inputs


# what Triton answers when the model cannot run a request at all (vs. the model's code raising on the probe)
_DEAD = re.compile(r"stub process|not healthy|is not ready|unknown model|unavailable|"
                   r"failed to connect|connection", re.IGNORECASE)


def probe(url: str, model: str, timeout_s: float = 10.0) -> Optional[str]:
    """None when ``model`` at ``url`` answers a real inference -- or its own code answers it with an
    error (a 400, or an exception about the zeros of the probe row): its process is alive -- else why not
    (a dead python stub, the model not loaded, the server not answering)."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    try:
        with httpclient.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s) as c:
            c.infer(model, probe_inputs(c.get_model_config(model)))
        return None
    except InferenceServerException as exc:
        msg = str(exc.message() or exc)
        if exc.status() == "400" or not _DEAD.search(msg):
            return None  # the model's own code answered (refused the zeros, say): its process is alive
        return f"probe inference failed: {msg.splitlines()[0][:200]}"
    except Exception as exc:  # noqa: BLE001 - connection refused, timeout: all mean "not answering"
        return f"probe inference failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


class Supervisor:
    """Watch ``server`` (started) serving ``model`` from ``repository``; see the module docstring."""

    def __init__(self, server: TritonServer, model: str, repository: Path,
                 policy: Optional[SupervisorPolicy] = None, clock: Callable[[], float] = time.monotonic):
        self.server, self.model, self.repository = server, model, Path(repository)
        self.policy = policy or SupervisorPolicy()
        self.clock = clock
        self.failures: deque[float] = deque()
        self.recoveries: list[dict] = []  # what happened, for logs and tests
        self._stubs: set[int] = set()  # the stubs alive at the last healthy probe

    def _exited(self) -> bool:
        """tritonserver or a stub that was alive at the last healthy probe has exited."""
        proc = self.server.process
        return proc is None or proc.poll() is not None or not all(is_alive(pid) for pid in self._stubs)

    def _watch(self, seconds: float, should_stop: Callable[[], bool]) -> bool:
        """Wait up to ``seconds`` for the next probe, sooner when a process exits (-> False, probe now);
        -> True when asked to stop meanwhile."""
        end = self.clock() + seconds
        while self.clock() < end:
            if should_stop():
                return True
            if self._exited():
                return False
            time.sleep(min(0.1, max(end - self.clock(), 0)))
        return should_stop()

    def _sleep(self, seconds: float, should_stop: Callable[[], bool]) -> bool:
        """Sleep up to ``seconds``; -> True when asked to stop meanwhile."""
        end = self.clock() + seconds
        while self.clock() < end:
            if should_stop():
                return True
            time.sleep(min(0.1, max(end - self.clock(), 0)))
        return should_stop()

    def check(self) -> Optional[tuple[str, str]]:
        """(action, reason) when something is wrong: ("restart", ...) or ("reload", ...)."""
        proc = self.server.process
        if proc is None or proc.poll() is not None:
            code = None if proc is None else proc.returncode
            return "restart", f"tritonserver is not running (exit code {code})"
        stubs = self.server.stub_pids()
        reason = probe(self.server.http_url, self.model, self.policy.probe_timeout_s)
        if reason is not None:
            self._stubs = set()
            return "reload", reason
        self._stubs = stubs & self.server.stub_pids()  # a stub replaced meanwhile (promotion) is not watched
        self.server.remember_shm_regions()
        return None

    def run(self, should_stop: Callable[[], bool]) -> int:
        """Supervise until ``should_stop()``; -> 0, or :data:`GAVE_UP` after too many failures."""
        p = self.policy
        self._stubs = self.server.stub_pids()  # started and ready: its stubs are the healthy ones
        self.server.remember_shm_regions()
        try:
            while not self._watch(p.probe_interval_s, should_stop):
                problem = self.check()
                if problem is None:
                    continue
                action, reason = problem
                now = self.clock()
                self.failures.append(now)
                while self.failures and self.failures[0] < now - p.window_s:
                    self.failures.popleft()
                n = len(self.failures)
                if n > p.max_failures:
                    log.error("giving up: %d failures within %.0f s (last: %s); stopping Triton",
                              n, p.window_s, reason)
                    self.recoveries.append({"action": "give up", "reason": reason, "time": now})
                    return GAVE_UP
                backoff = min(p.backoff_initial_s * 2 ** (n - 1), p.backoff_max_s)
                log.warning("%s -> %s in %.1f s (failure %d of at most %d within %.0f s)",
                            reason, action, backoff, n, p.max_failures, p.window_s)
                t0 = self.clock()
                unloaded = action == "reload" and self._unload()  # ready endpoint: "not ready" from now on
                if self._sleep(backoff, should_stop):
                    break
                ok = self._load() if unloaded else False
                if not ok:
                    action = "restart"
                    ok = self._restart()
                self.recoveries.append({"action": action, "reason": reason, "time": now, "ok": ok,
                                        "took_s": round(self.clock() - t0, 2)})
                if ok:
                    self._stubs = self.server.stub_pids()  # the new stubs are the healthy ones now
                    self.server.remember_shm_regions()  # and their shared memory, should Triton die next
                    log.warning("%s done in %.1f s: model '%s' answers again", action, self.clock() - t0, self.model)
            return 0
        finally:
            self.server.stop()

    def _admin(self, call: Callable, timeout_s: float) -> None:
        """``call(client, headers)`` through the admin API, under the repository lock."""
        import tritonclient.http as httpclient

        from pipeline_lib.serving import repository

        key = self.server.admin_api_key
        headers = {ADMIN_HEADER: key} if key and self.server.restrict_repository_api else None
        with repository.locked(self.repository, self.model):
            with httpclient.InferenceServerClient(self.server.http_url, connection_timeout=30,
                                                  network_timeout=timeout_s) as c:
                call(c, headers)

    def _unload(self) -> bool:
        """Unload the model whose stub cannot run: its ready endpoint says so until :meth:`_load`."""
        try:
            self._admin(lambda c, h: c.unload_model(self.model, headers=h), self.policy.probe_timeout_s)
            return True
        except Exception as exc:  # noqa: BLE001 - any failure falls back to a restart
            log.warning("unload of model '%s' failed: %s", self.model, str(exc).splitlines()[0][:300] if str(exc) else exc)
            return False

    def _load(self) -> bool:
        """Load the served version again (a dead stub is replaced only by a fresh load)."""
        try:
            self._admin(lambda c, h: c.load_model(self.model, headers=h), self.policy.startup_timeout_s)
            reason = probe(self.server.http_url, self.model, self.policy.probe_timeout_s)
            if reason is not None:
                log.warning("reload did not help (%s)", reason)
            return reason is None
        except Exception as exc:  # noqa: BLE001 - any failure falls back to a restart
            log.warning("reload of model '%s' failed: %s", self.model, str(exc).splitlines()[0][:300] if str(exc) else exc)
            return False

    def _restart(self) -> bool:
        self.server.stop(keep_key=True)
        try:
            self.server.start(timeout_s=self.policy.startup_timeout_s, models=[self.model], attempts=1)
        except ServerError as exc:
            log.warning("restart failed: %s", str(exc).splitlines()[0])
            return False
        return probe(self.server.http_url, self.model, self.policy.probe_timeout_s) is None
