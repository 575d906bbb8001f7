"""Keep a served model answering: the supervisor loop of ``recsys serve``.

Triton's ready endpoints do not see every outage: a python-backend stub that died (killed, out of
memory) leaves the model READY while every request fails with ``Stub process ... is not healthy``,
and Triton 2.51 never restarts it. So the supervisor watches ``tritonserver`` and the stubs it saw
healthy (a pidfd per process, /proc where pidfds are not available), and probes with a real
inference, built from the served model's config (one row of zeros per required input), every
``probe_interval_s`` and at once when one of those processes exits:

* tritonserver exited -> restart it (same ports, same admin key);
* a watched stub exited -> decide at once whether it died (:func:`stub_death`): its version is READY in
  Triton's repository index, no load is under way (no version LOADING, no new stub of the model, the
  repository lock free: no promotion or rollback in progress) and fewer of its stubs live than Triton's
  config asks for -> unload the model at once, in the same hold of the repository lock (its ready
  endpoint says "not ready" within a fraction of a second: the truth). A stub that exits because a
  promotion replaced it (its version UNLOADING, a new stub started, the lock held) is ambiguous: the
  probe decides, as for any other fault;
* the probe fails because the model cannot run at all (a dead stub, not loaded; not when the
  model's own code refuses the probe's zeros, which shows it alive) -> unload the model at once;
* after an unload and the backoff, load the served version again (both through the admin API, under
  the repository lock so they never race a promotion); if that fails, restart the server.

Each recovery waits a backoff (doubling from ``backoff_initial_s`` up to ``backoff_max_s``) and is
logged with its reason. More than ``max_failures`` failures within ``window_s`` -> give up:
:meth:`Supervisor.run` stops the server and returns a non-zero exit code. Every exit path goes
through :meth:`TritonServer.stop`, which also removes orphaned stubs and leaked /dev/shm regions.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import select
import time
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple, Optional

import numpy as np

from pipeline_lib.serving.admin_key import ADMIN_HEADER
from pipeline_lib.serving.repository import locked as repository_lock
from pipeline_lib.serving.server import ServerError, Stub, TritonServer, is_alive
from pipeline_lib.validate.requests import ERROR_PREFIXES

log = logging.getLogger(__name__)

GAVE_UP = 3  # exit code of `recsys serve` when the supervisor gives up
WATCH_POLL_S = 0.05  # how often the watch looks at /proc (and at should_stop) between pidfd wake-ups

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


def answered_by_model(message: str) -> bool:
    """Whether a failed probe was answered by the model's own code (alive) rather than by Triton for a model that
    cannot run: any of the models' own error answers (:data:`~pipeline_lib.validate.requests.ERROR_PREFIXES`:
    e.g. ``unavailable: no feature store ...`` for a probe that leaves a user-id version's features out while its
    store is down -- a restart cannot fix the store, and full-feature requests still answer), or a message that
    names none of Triton's "cannot run" causes (not "unknown model", which Triton answers with a 400 too)."""
    return message.startswith(ERROR_PREFIXES) or not _DEAD.search(message)


def probe(url: str, model: str, timeout_s: float = 10.0) -> Optional[str]:
    """None when ``model`` at ``url`` answers a real inference -- or its own code answers it with an
    error (:func:`answered_by_model`: a refusal of the probe's zeros, a feature store that is down): its
    process is alive -- else why not
    (a dead python stub, the model not loaded, the server not answering)."""
    import tritonclient.http as httpclient
    from tritonclient.utils import InferenceServerException

    try:
        with httpclient.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s) as c:
            c.infer(model, probe_inputs(c.get_model_config(model)))
        return None
    except InferenceServerException as exc:
        msg = str(exc.message() or exc)
        if answered_by_model(msg):
            return None  # the model's own code answered (refused the zeros, say): its process is alive
        return f"probe inference failed: {msg.splitlines()[0][:200]}"
    except Exception as exc:  # noqa: BLE001 - connection refused, timeout: all mean "not answering"
        return f"probe inference failed: {type(exc).__name__}: {str(exc).splitlines()[0][:200] if str(exc) else ''}"


class Problem(NamedTuple):
    """What :meth:`Supervisor.check` found: ``action`` "restart" | "reload", why, and whether the model
    was unloaded already (a stub death decided from /proc and Triton's index unloads it at once)."""

    action: str
    reason: str
    unloaded: bool = False


def stub_death(model: str, gone: dict[int, Stub], watched: dict[int, Stub], live: dict[int, Stub],
               states: dict[str, str], instances: Optional[int]) -> Optional[str]:
    """Why the exit of the watched stubs ``gone`` is certainly a death of ``model``'s served version
    (-> the reason), or None when it may be intended and only a probe can tell (a promotion, rollback
    or reload replacing the stub, or a stub of another model).

    ``live``: the server's stubs now; ``states``: Triton's repository index for ``model``, version ->
    state; ``instances``: the instance count of Triton's config for ``model`` (None: unknown). Triton
    loads a new version (or a new copy of the same one) before it unloads the old one, so a stub that
    exits because it was replaced has a newer unwatched stub of the model beside it, or its version is
    UNLOADING, or a version is LOADING; an instance count lowered in place leaves as many stubs as the
    config asks for."""
    mine = [s for s in gone.values() if s.model == model]
    if not mine:
        return None
    if any(s.model == model and pid not in watched for pid, s in live.items()):
        return None  # a stub started since the last healthy probe: a load is under way
    if "LOADING" in states.values():
        return None
    for s in mine:
        v = str(s.version)
        if states.get(v) != "READY":
            continue  # its version is unloading (replaced) or gone: an intended exit
        running = sum(1 for x in live.values() if x.model == model and x.version == s.version)
        if instances is not None and running >= instances:
            continue  # as many instances as the config asks for: one was removed on purpose
        return (f"python stub {s.pid} ('{s.instance}') exited while version {v} is READY and no load is "
                f"under way ({running} of {instances if instances is not None else '?'} instances running)")
    return None


def _pidfd(pid: int) -> Optional[int]:
    """A pidfd for ``pid`` (readable once it exits), or None (gone, or no pidfd_open here)."""
    try:
        return os.pidfd_open(pid)
    except (AttributeError, OSError):
        return None


class Supervisor:
    """Watch ``server`` (started) serving ``model`` from ``repository``; see the module docstring."""

    def __init__(self, server: TritonServer, model: str, repository: Path,
                 policy: Optional[SupervisorPolicy] = None, clock: Callable[[], float] = time.monotonic):
        self.server, self.model, self.repository = server, model, Path(repository)
        self.policy = policy or SupervisorPolicy()
        self.clock = clock
        self.failures: deque[float] = deque()
        self.recoveries: list[dict] = []  # what happened, for logs and tests
        self._stubs: dict[int, Stub] = {}  # the stubs alive at the last healthy probe

    def _exited(self) -> bool:
        """tritonserver or a stub that was alive at the last healthy probe has exited."""
        proc = self.server.process
        return proc is None or proc.poll() is not None or not all(is_alive(pid) for pid in self._stubs)

    def _watch(self, seconds: float, should_stop: Callable[[], bool]) -> bool:
        """Wait up to ``seconds`` for the next probe, sooner when a process exits (-> False, check now);
        -> True when asked to stop meanwhile. A pidfd per watched process wakes it at the exit; /proc is
        read every :data:`WATCH_POLL_S` as well (and alone where pidfds are not available)."""
        proc = self.server.process
        pids = ([proc.pid] if proc is not None else []) + list(self._stubs)
        fds = [fd for fd in map(_pidfd, pids) if fd is not None]
        poller = select.poll()
        for fd in fds:
            poller.register(fd, select.POLLIN)
        try:
            end = self.clock() + seconds
            while self.clock() < end:
                if should_stop():
                    return True
                if self._exited():
                    return False
                poller.poll(1000 * min(WATCH_POLL_S, max(end - self.clock(), 0)))
            return should_stop()
        finally:
            for fd in fds:
                os.close(fd)

    def _sleep(self, seconds: float, should_stop: Callable[[], bool]) -> bool:
        """Sleep up to ``seconds``; -> True when asked to stop meanwhile."""
        end = self.clock() + seconds
        while self.clock() < end:
            if should_stop():
                return True
            time.sleep(min(0.1, max(end - self.clock(), 0)))
        return should_stop()

    def check(self) -> Optional[Problem]:
        """What is wrong, if anything: a ("restart", ...) or ("reload", ...) :class:`Problem`."""
        proc = self.server.process
        if proc is None or proc.poll() is not None:
            code = None if proc is None else proc.returncode
            return Problem("restart", f"tritonserver is not running (exit code {code})")
        gone = {pid: s for pid, s in self._stubs.items() if not is_alive(pid)}
        if gone:
            died = self._stub_died(gone)
            if died is not None:
                self._stubs = {}
                return died
        stubs = self.server.stubs()
        reason = probe(self.server.http_url, self.model, self.policy.probe_timeout_s)
        if reason is not None:
            self._stubs = {}
            return Problem("reload", reason)
        self._stubs = {p: s for p, s in stubs.items() if is_alive(p)}  # one replaced meanwhile is not watched
        self.server.remember_shm_regions()
        return None

    def _stub_died(self, gone: dict[int, Stub]) -> Optional[Problem]:
        """Watched stubs exited: when :func:`stub_death` says it is a death, unload the model now, in the
        same hold of the repository lock (a promotion cannot start in between) -> the problem; None when
        it may be intended (the probe then decides)."""
        try:
            with repository_lock(self.repository, self.model, wait=False) as held:
                if not held:
                    log.info("stub %s exited while the repository lock is held (a promotion or rollback?): "
                             "probing", sorted(gone))
                    return None
                live = self.server.stubs()
                states, instances = self._triton_view()
                if states is None:
                    return None
                reason = stub_death(self.model, gone, self._stubs, live, states, instances)
                if reason is None:
                    log.info("stub %s exited: replaced (%s), probing", sorted(gone),
                             ", ".join(f"v{v} {st}" for v, st in sorted(states.items())))
                    return None
                return Problem("reload", reason, self._unload(lock=False))
        except OSError as exc:  # the lock file cannot be opened: let the probe decide
            log.info("stub %s exited; repository lock unavailable (%s): probing", sorted(gone), exc)
            return None

    def _triton_view(self) -> tuple[Optional[dict[str, str]], Optional[int]]:
        """(version -> state of ``model`` in Triton's repository index, the instance count of its
        config); (None, None) when Triton does not answer."""
        import tritonclient.http as httpclient

        timeout = min(self.policy.probe_timeout_s, 5.0)
        try:
            with httpclient.InferenceServerClient(self.server.http_url, connection_timeout=timeout,
                                                  network_timeout=timeout) as c:
                index = c.get_model_repository_index(headers=self._admin_headers())
                config = c.get_model_config(self.model)
        except Exception as exc:  # noqa: BLE001 - not answering: the probe decides
            log.info("repository index unavailable (%s)", str(exc).splitlines()[0][:200] if str(exc) else exc)
            return None, None
        states = {str(m.get("version")): str(m.get("state")) for m in index if m.get("name") == self.model}
        groups = config.get("instance_group") or []
        instances = sum(int(g.get("count", 1)) for g in groups) if groups else None
        return states, instances

    def run(self, should_stop: Callable[[], bool]) -> int:
        """Supervise until ``should_stop()``; -> 0, or :data:`GAVE_UP` after too many failures."""
        p = self.policy
        self._stubs = self.server.stubs()  # started and ready: its stubs are the healthy ones
        self.server.remember_shm_regions()
        try:
            while not self._watch(p.probe_interval_s, should_stop):
                problem = self.check()
                if problem is None:
                    continue
                action, reason, unloaded = problem
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
                log.warning("%s -> %s%s in %.1f s (failure %d of at most %d within %.0f s)",
                            reason, "unloaded; " if unloaded else "", action, backoff, n, p.max_failures, p.window_s)
                t0 = self.clock()
                # ready endpoint: "not ready" from the unload on
                unloaded = action == "reload" and (unloaded or self._unload())
                if self._sleep(backoff, should_stop):
                    break
                ok = self._load() if unloaded else False
                if not ok:
                    action = "restart"
                    ok = self._restart()
                self.recoveries.append({"action": action, "reason": reason, "time": now, "ok": ok,
                                        "took_s": round(self.clock() - t0, 2)})
                if ok:
                    self._stubs = self.server.stubs()  # the new stubs are the healthy ones now
                    self.server.remember_shm_regions()  # and their shared memory, should Triton die next
                    log.warning("%s done in %.1f s: model '%s' answers again", action, self.clock() - t0, self.model)
            return 0
        finally:
            self.server.stop()

    def _admin_headers(self) -> Optional[dict]:
        key = self.server.admin_api_key
        return {ADMIN_HEADER: key} if key and self.server.restrict_repository_api else None

    def _admin(self, call: Callable, timeout_s: float, lock: bool = True) -> None:
        """``call(client, headers)`` through the admin API, under the repository lock (``lock=False``:
        the caller holds it)."""
        import tritonclient.http as httpclient

        with repository_lock(self.repository, self.model) if lock else contextlib.nullcontext():
            with httpclient.InferenceServerClient(self.server.http_url, connection_timeout=30,
                                                  network_timeout=timeout_s) as c:
                call(c, self._admin_headers())

    def _unload(self, lock: bool = True) -> bool:
        """Unload the model whose stub cannot run: its ready endpoint says so until :meth:`_load`."""
        try:
            self._admin(lambda c, h: c.unload_model(self.model, headers=h), self.policy.probe_timeout_s, lock)
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
