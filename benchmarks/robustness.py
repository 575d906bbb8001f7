"""Robustness check (issue 24): bad requests, load, promote/rollback under load and killed processes,
against a ranking and a retrieval version served by `recsys serve` on loopback.

    make robustness                       # or: uv run --frozen --no-sync python -m benchmarks.robustness
    ... python -m benchmarks.robustness --load-seconds 20 --out benchmarks/results/robustness.json

What it does, with bounded loops only (127.0.0.1, free ports, everything stopped at the end):

1. builds two small versions with the pipeline's own stage functions (the family's raw data, ETL,
   train, export, publish; no Prefect): a DLRM ranking model ``rank`` (its ``user_age`` declared
   in [0, 120] so the range check has something to refuse) and an EASE retrieval model ``ret`` in two
   versions (different regularisation: different answers), version 1 promoted;
2. serves each with ``python -m flows.cli serve`` (the supervisor and the per-server admin key as a user
   gets them, default supervisor settings) on its own ports;
3. the bad-request matrix (:func:`matrix`) over HTTP (raw JSON bodies) and gRPC (typed tensors);
4. a load phase: gRPC clients in threads, every answer checked against the offline answer of the same
   rows (finite scores, ids, ``count``, no excluded or padding id presented as an item);
5. promote / rollback of ``ret`` under load: each answer must equal version 1's or version 2's;
6. kill faults: SIGKILL of each server's python-backend stub and of its ``tritonserver``; time until
   a correct answer returns, and what ``/v2/health/ready`` and ``/v2/models/<m>/ready`` said while
   requests failed (the ready endpoints polled every ~20 ms in a thread of their own, see
   :func:`ready_lie`);
7. a table on stdout and JSON in ``benchmarks/results/robustness.json``.

Triton 2.51's HTTP front-end answers 500 for bodies it cannot parse (docs/serving.md, upstream
triton-inference-server/server#8762): those probes are reported as "Triton front-end 500 (upstream)",
not as 4xx.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parent.parent
RANK, RET = "rank", "ret"
RECOVER_TARGET_S = 10.0
# "ready endpoint truthful": it may say 200 after a kill for at most this long while requests fail (the
# supervisor needs a moment to see the death and unload the model; measured ~0.02-0.1 s)
READY_TOLERANCE_S = 0.5
READY_POLL_S = 0.02
# what Triton 2.51's HTTP front-end says when it cannot parse a body (answered 500: upstream #8762)
UPSTREAM_PARSE = ("failed to parse the request JSON", "Unable to parse", "failed to parse")
GRPC_CLIENT_ERRORS = {"INVALID_ARGUMENT", "NOT_FOUND", "OUT_OF_RANGE", "FAILED_PRECONDITION",
                      "PERMISSION_DENIED", "RESOURCE_EXHAUSTED", "UNIMPLEMENTED"}

SMALL = {
    "data": {"synthetic": {"n_users": 300, "n_items": 150, "n_interactions": 6000}},
    "model": {"epochs": 1, "batch_size": 256},
    "export": {"parity_rows": 64},
    "serving": {"notify_live_server": False},
    "gate": {"require_beat_baseline": False},
}


# -- the bad-request matrix -------------------------------------------------------------------------
@dataclass
class Probe:
    """One bad (or edge) request. ``arrays``: a function of the valid request's tensors (name -> numpy)
    returning the tensors to send (both protocols); ``raw``: a function of the valid JSON body returning
    the HTTP body bytes (HTTP only: gRPC messages are typed). ``expect``: "4xx" (refused as a client
    error), "upstream" (Triton's HTTP front-end cannot parse it: 500 documented upstream), "ok" (answered;
    ``check`` validates the answer, returns an error text or None)."""

    name: str
    model: str
    expect: str
    arrays: Optional[Callable[[dict], dict]] = None
    raw: Optional[Callable[[dict], bytes]] = None
    check: Optional[Callable[[dict], Optional[str]]] = None

    @property
    def protocols(self) -> list[str]:
        return ["http"] + (["grpc"] if self.arrays is not None else [])


def _set(name: str, value: Any, dtype: Any = None) -> Callable[[dict], dict]:
    def f(a: dict) -> dict:
        old = a[name]
        arr = np.asarray(value, dtype=dtype or old.dtype)
        return {**a, name: np.resize(arr, old.shape) if arr.ndim == 0 else arr}
    return f


def _drop(name: str) -> Callable[[dict], dict]:
    return lambda a: {k: v for k, v in a.items() if k != name}


def _body_edit(fn: Callable[[dict], Any]) -> Callable[[dict], bytes]:
    def f(body: dict) -> bytes:
        b = json.loads(json.dumps(body))
        out = fn(b)
        return (out if isinstance(out, bytes) else json.dumps(b if out is None else out).encode())
    return f


def _input(body: dict, name: str) -> dict:
    return next(i for i in body["inputs"] if i["name"] == name)


def _finite_scores(out: dict) -> Optional[str]:
    for name, arr in out.items():
        if arr.dtype.kind == "f" and not np.isfinite(arr).all():
            return f"non-finite values in output '{name}'"
    return None


def matrix(ctx: "Context") -> list[Probe]:
    """The bad-request matrix for the ranking model (raw features) and the top-k model (user id,
    ``exclude_item_ids``, ``k``)."""
    k = ctx.k
    probes = [
        # -- bodies Triton's HTTP front-end cannot parse (500 upstream) ------------------------------
        Probe("malformed JSON", RANK, "upstream", raw=lambda b: b'{"inputs": [{"name": '),
        Probe("body null", RANK, "upstream", raw=lambda b: b"null"),
        Probe("inputs null", RANK, "upstream", raw=_body_edit(lambda b: {"inputs": None})),
        Probe("data null", RANK, "upstream", raw=_body_edit(lambda b: _input(b, "user_age").update(data=None))),
        Probe("string where a number belongs", RANK, "upstream",
              raw=_body_edit(lambda b: _input(b, "user_age").update(data=["abc"] * len(_input(b, "user_age")["data"])))),
        Probe("data does not match shape", RANK, "upstream",
              raw=_body_edit(lambda b: _input(b, "user_age").update(data=_input(b, "user_age")["data"][:1]))),
        # json.dumps writes inf as Infinity (not JSON); Triton's parser accepts it and the model refuses it
        Probe("inf in JSON (Infinity, not JSON)", RANK, "4xx",
              raw=_body_edit(lambda b: _input(b, "user_age").update(data=[float("inf")] * len(_input(b, "user_age")["data"])))),
        Probe("string user id (retrieval)", RET, "upstream",
              raw=_body_edit(lambda b: _input(b, "user_id").update(data=["u1"] * len(_input(b, "user_id")["data"])))),
        # -- typed bad requests: refused by Triton's checks or the served model (400 / INVALID_ARGUMENT) --
        Probe("missing input", RANK, "4xx", arrays=_drop("item_id")),
        Probe("unknown input name", RANK, "4xx", arrays=lambda a: {**a, "bogus": np.zeros(len(a["user_id"]), np.int64)}),
        Probe("wrong datatype (FP32 for FP64)", RANK, "4xx", arrays=lambda a: {**a, "user_age": a["user_age"].astype(np.float32)}),
        Probe("row count mismatch", RANK, "4xx", arrays=lambda a: {**a, "user_age": np.concatenate([a["user_age"], a["user_age"]])}),
        Probe("wrong rank (2-D input)", RANK, "4xx", arrays=lambda a: {**a, "user_age": a["user_age"].reshape(1, -1)}),
        Probe("empty batch", RANK, "4xx", arrays=lambda a: {n: (v[:0] if not n.endswith("__offsets") else v[:1] * 0)
                                                            for n, v in a.items()}),
        Probe("1e40 in a continuous feature", RANK, "4xx", arrays=_set("item_price", 1e40)),
        Probe("-1e40 in a continuous feature", RANK, "4xx", arrays=_set("user_age", -1e40)),
        Probe("inf in a continuous feature", RANK, "4xx", arrays=_set("user_age", np.inf)),
        Probe("-inf in a continuous feature", RANK, "4xx", arrays=_set("item_price", -np.inf)),
        Probe("value above the declared max", RANK, "4xx", arrays=_set("user_age", 1000.0)),
        Probe("value below the declared min", RANK, "4xx", arrays=_set("user_age", -5.0)),
        Probe("oversized string (2 KB)", RANK, "4xx", arrays=_set("device", b"x" * 2048, object)),
        Probe("oversized list (20k values)", RANK, "4xx",
              arrays=lambda a: {**a, "item_tags__values": np.arange(20_000, dtype=a["item_tags__values"].dtype),
                                "item_tags__offsets": np.array([0] + [20_000] * (len(a["item_tags__offsets"]) - 1),
                                                               a["item_tags__offsets"].dtype)}),
        Probe("offsets not starting at 0", RANK, "4xx",
              arrays=lambda a: {**a, "item_tags__offsets": a["item_tags__offsets"][::-1].copy()}),
        Probe("offsets decreasing", RANK, "4xx",
              arrays=lambda a: {**a, "item_tags__offsets": np.concatenate(
                  [a["item_tags__offsets"][:1], a["item_tags__offsets"][-1:], a["item_tags__offsets"][2:] * 0])}),
        Probe("offsets past the values", RANK, "4xx",
              arrays=lambda a: {**a, "item_tags__offsets": a["item_tags__offsets"] + 1000}),
        Probe("NaN in a continuous feature (missing value)", RANK, "ok", arrays=_set("user_age", np.nan),
              check=_finite_scores),
        Probe("unknown user, item and category", RANK, "ok",
              arrays=lambda a: {**a, "user_id": a["user_id"] + 10**12, "item_id": a["item_id"] + 10**12,
                                "device": np.full(a["device"].shape, b"never-seen", object)}, check=_finite_scores),
        # -- top-k: k, exclusion lists, unknown users -------------------------------------------------
        Probe("k = 0", RET, "4xx", arrays=lambda a: {**a, "k": np.array([0], np.int32)}),
        Probe("k = -1", RET, "4xx", arrays=lambda a: {**a, "k": np.array([-1], np.int32)}),
        Probe(f"k = {k + 1} (above the exported k)", RET, "4xx", arrays=lambda a: {**a, "k": np.array([k + 1], np.int32)}),
        Probe("k = 2**31-1", RET, "4xx", arrays=lambda a: {**a, "k": np.array([2**31 - 1], np.int32)}),
        Probe("k of shape [2]", RET, "4xx", arrays=lambda a: {**a, "k": np.array([1, 2], np.int32)}),
        Probe("k as INT64", RET, "4xx", arrays=lambda a: {**a, "k": np.array([3], np.int64)}),
        Probe("k = 3", RET, "ok", arrays=lambda a: {**a, "k": np.array([3], np.int32)}, check=ctx.check_k3),
        Probe("exclusions leave fewer than k items", RET, "ok", arrays=ctx.leave_three, check=ctx.check_leave_three),
        Probe("exclusions remove every item", RET, "ok", arrays=ctx.exclude_all, check=ctx.check_exclude_all),
        Probe("oversized exclusion list (20k ids)", RET, "4xx",
              arrays=ctx.oversized_exclusions),
        Probe("exclusion offsets without values", RET, "4xx",
              arrays=lambda a: {**a, "exclude_item_ids__offsets": np.zeros(len(a["user_id"]) + 1, np.int32)}),
        Probe("unknown users", RET, "ok", arrays=lambda a: {**a, "user_id": a["user_id"] + 10**12},
              check=ctx.check_unknown_users),
    ]
    return probes


def classify(protocol: str, status: str, message: str) -> str:
    """An answer's class: "2xx", "4xx", "upstream-500" (Triton's HTTP front-end could not parse the
    body: its documented 500), "5xx" (a server error), or "no answer"."""
    if protocol == "http":
        if status.startswith("2"):
            return "2xx"
        if status.startswith("4"):
            return "4xx"
        if status == "500" and message.lstrip().startswith(UPSTREAM_PARSE):
            return "upstream-500"
        return "5xx" if status.startswith("5") else "no answer"
    if status == "OK":
        return "2xx"
    code = status.rsplit(".", 1)[-1]
    return "4xx" if code in GRPC_CLIENT_ERRORS else ("no answer" if code == "" else "5xx")


def probe_passed(expect: str, cls: str, check_error: Optional[str]) -> bool:
    if expect == "ok":
        return cls == "2xx" and check_error is None
    if expect == "upstream":
        return cls in ("4xx", "upstream-500")  # a future Triton answering 400 passes too
    return cls == "4xx"


# -- the report -------------------------------------------------------------------------------------
def summary_rows(res: dict) -> list[tuple[str, str, str]]:
    """(measure, value, target) rows of the table."""
    m, load = res.get("matrix", {}), res.get("totals", {})
    rows = [
        ("requests (load + promote/rollback + faults)", str(load.get("requests", 0)), ""),
        ("errors (failed requests outside fault windows)", str(load.get("errors", 0)), "0"),
        ("wrong answers", str(load.get("wrong", 0)), "0"),
        ("non-finite scores served", str(load.get("non_finite", 0)), "0"),
        ("bad requests (probes x protocols)", str(m.get("probes", 0)), ""),
        ("  answered 4xx / INVALID_ARGUMENT", str(m.get("4xx", 0)), "all but upstream"),
        ("  Triton front-end 500 (upstream)", str(m.get("upstream-500", 0)), "documented"),
        ("  answered 5xx (other)", str(m.get("5xx", 0)), "0"),
        ("  answered 2xx where refusal expected", str(m.get("2xx_unexpected", 0)), "0"),
        ("  edge cases answered correctly (2xx)", f"{m.get('ok_passed', 0)}/{m.get('ok_total', 0)}", "all"),
        ("promote/rollback cycles, failed requests",
         f"{res.get('promote', {}).get('cycles', 0)}, {res.get('promote', {}).get('errors', 0)}", "0 failed"),
    ]
    pr = res.get("promote", {})
    if "model_ready_not_200" in pr:
        slow = pr.get("model_ready_no_answer", 0)
        rows.append(("  model ready non-200 / supervisor actions during them",
                     f"{pr['model_ready_not_200']} / {len(pr.get('supervisor_actions', []))}"
                     + (f" ({slow} ready polls unanswered in 2 s)" if slow else ""), "0 / 0"))
    for f in res.get("faults", []):
        rec = "not back" if f.get("recovered_s") is None else f"{f['recovered_s']:.1f} s"
        rows.append((f"recovery after SIGKILL {f['target']} ({f['model']})", rec, f"<= {RECOVER_TARGET_S:.0f} s"))
        lied = f"{f['ready_lied_s']:.2f} s 200 while failing"
        rows.append((f"  ready endpoints truthful ({f['target']}, {f['model']})",
                     f"yes ({lied})" if f["ready_truthful"] else f"no ({lied})",
                     f"yes (<= {READY_TOLERANCE_S} s)"))
    return rows


def format_table(res: dict) -> str:
    rows = summary_rows(res)
    w = max(len(r[0]) for r in rows)
    v = max(len(r[1]) for r in rows)
    lines = [f"{'measure':<{w}}  {'value':>{v}}  target", "-" * (w + v + 20)]
    lines += [f"{a:<{w}}  {b:>{v}}  {c}" for a, b, c in rows]
    return "\n".join(lines)


def markdown_table(res: dict) -> str:
    lines = ["| measure | value | target |", "|---|---:|---|"]
    lines += [f"| {a.strip()} | {b} | {c} |" for a, b, c in summary_rows(res)]
    return "\n".join(lines)


# -- building the versions ----------------------------------------------------------------------------
def _cfg(tmp: Path, name: str, **extra):
    from pipeline_lib.config import load_config

    over: dict = json.loads(json.dumps(SMALL))
    over.update(runs_dir=str(tmp / "runs"), run_name=name)
    over["export"].update(model_repository=str(tmp / "model_repository"))
    for k, v in extra.items():
        over[k] = {**over.get(k, {}), **v} if isinstance(v, dict) else v
    return load_config(None, over)


@dataclass
class Context:
    """The built versions, their sample requests and offline answers, and the servers."""

    tmp: Path
    k: int = 10
    rank_rows: Any = None
    rank_offline: Any = None  # scores [rows]
    ret_rows: Any = None
    ret_offline: dict = field(default_factory=dict)  # (version, variant) -> (ids, scores, count)
    ret_excl: list = field(default_factory=list)  # per row: the extra exclusions of the "excl" variant
    catalogue: Any = None
    atol: float = 1e-5
    servers: dict = field(default_factory=dict)
    dtypes: dict = field(default_factory=dict)  # the top-k model's input name -> numpy dtype (from the server)

    def _excl(self, a: dict, per_row: list) -> dict:
        n = len(a["user_id"])
        values = np.asarray([i for _ in range(n) for i in per_row], self.dtypes.get("exclude_item_ids__values", np.int64))
        offsets = (np.arange(n + 1) * len(per_row)).astype(self.dtypes.get("exclude_item_ids__offsets", np.int32))
        return {**a, "exclude_item_ids__values": values, "exclude_item_ids__offsets": offsets}

    # the edge-case probes' arrays and checks (rows of ret_rows)
    def leave_three(self, a: dict) -> dict:
        return self._excl(a, list(self.catalogue[3:]))

    def exclude_all(self, a: dict) -> dict:
        return self._excl(a, list(self.catalogue))

    def oversized_exclusions(self, a: dict) -> dict:
        return self._excl(a, list(range(20_000)))

    def _topk_check(self, out: dict, allowed: Optional[set], max_count: Optional[int]) -> Optional[str]:
        ids, scores, count = out["item_ids"], out["scores"], out["count"]
        if not np.isfinite(scores).all():
            return "non-finite score"
        for r in range(len(ids)):
            c = int(count[r])
            if max_count is not None and c > max_count:
                return f"row {r}: count {c} > {max_count}"
            items, pads = ids[r, :c].tolist(), ids[r, c:].tolist()
            if any(i == -1 for i in items) or any(p != -1 for p in pads):
                return f"row {r}: padding id among the items or an item among the padding"
            if allowed is not None and not set(items) <= allowed:
                return f"row {r}: excluded ids {sorted(set(items) - allowed)[:5]} answered"
        return None

    def check_leave_three(self, out: dict) -> Optional[str]:
        return self._topk_check(out, set(int(i) for i in self.catalogue[:3]), 3)

    def check_exclude_all(self, out: dict) -> Optional[str]:
        err = self._topk_check(out, set(), 0)
        return err or (None if int(out["count"].sum()) == 0 else "items answered although all were excluded")

    def check_unknown_users(self, out: dict) -> Optional[str]:
        err = self._topk_check(out, None, None)
        return err or (None if (out["count"] == self.k).all() else "an unknown user got fewer than k items")

    def check_k3(self, out: dict) -> Optional[str]:
        ids, scores, _ = self.ret_offline[(1, "plain")]
        n = len(out["item_ids"])
        if out["item_ids"].shape != (n, 3):
            return f"shape {out['item_ids'].shape}, expected ({n}, 3)"
        if not np.array_equal(out["item_ids"], ids[:n, :3]) or not np.allclose(out["scores"], scores[:n, :3], atol=self.atol):
            return "k=3 answer differs from the first 3 of the offline top-k"
        return None


def build(ctx: Context, log: Callable[[str], None]) -> None:
    """The two models' versions, published into ``ctx.tmp/model_repository`` (version 1 of each promoted)."""
    import pandas as pd

    from pipeline_lib.export.classical import ClassicalRecommender
    from pipeline_lib.export.topk import finish_top_k
    from pipeline_lib.families import get_family
    from pipeline_lib.paths import new_run
    from pipeline_lib.serving import repository

    features = [f.model_dump(mode="json") for f in _cfg(ctx.tmp, "probe").columns.features]
    for f in features:
        if f["name"] == "user_age":
            f.update(min=0.0, max=120.0)
    cfg = _cfg(ctx.tmp, "rank", columns={"features": features}, export={"model_name": RANK})
    ctx.atol = cfg.serving.smoke_atol
    fam, paths = get_family(cfg), new_run(cfg)
    t0 = time.monotonic()
    raw = fam.raw_data(paths)
    etl_out = fam.etl(paths, raw)
    trained = fam.train(paths, etl_out)
    exp = fam.export(paths, etl_out, trained)
    v, _, _ = fam.publish(paths, raw, etl_out, trained, exp)
    repository.promote(cfg.export.model_repository, RANK, v)
    ctx.rank_rows = fam.smoke_rows(etl_out, 64).reset_index(drop=True)
    ctx.rank_offline = np.asarray(fam.offline_reference(etl_out, exp, ctx.rank_rows), dtype=np.float32).reshape(-1)
    log(f"built ranking version '{RANK}' v{v} (dlrm) in {time.monotonic() - t0:.0f} s")

    t0 = time.monotonic()
    for version, lam in ((1, 200.0), (2, 5.0)):  # two EASE versions: different regularisation, different answers
        # full requests (user id + exclusions, history from the version's seen.npz): the feature store is not what
        # this script checks (tests/integration/test_classical.py serves user-id requests through a store)
        rcfg = _cfg(ctx.tmp, f"ret{version}", model={"type": "ease", "classical": {"ease_lambda": lam}},
                    export={"model_name": RET}, features={"enabled": False})
        rfam, rpaths = get_family(rcfg), new_run(rcfg)
        rtrained = rfam.train(rpaths, etl_out)  # ease reads the raw split of the ranking run's ETL
        rexp = rfam.export(rpaths, etl_out, rtrained)
        got, _, _ = rfam.publish(rpaths, raw, etl_out, rtrained, rexp)
        assert got == version, (got, version)
        rec = rexp.open(ClassicalRecommender)
        ctx.k = int(rcfg.model.retrieval.k)
        if ctx.ret_rows is None:
            rows = rfam.smoke_rows(etl_out, 32)[rec.request_columns].reset_index(drop=True)
            ctx.catalogue = sorted(int(i) for i in pd.read_parquet(etl_out.split.train)[cfg.columns.item_id].unique())
            plain = finish_top_k(*rec.offline(rows))
            # the "excl" variant: each row also excludes its own top 3
            ctx.ret_excl = [[int(i) for i in plain[0][r, :3]] for r in range(len(rows))]
            ctx.ret_rows = rows
        for variant in ("plain", "excl"):
            rows = ctx.ret_rows if variant == "plain" else ctx.ret_rows.assign(exclude_item_ids=ctx.ret_excl)
            ctx.ret_offline[(version, variant)] = finish_top_k(*rec.offline(rows))
    repository.promote(cfg.export.model_repository, RET, 1)
    log(f"built retrieval versions '{RET}' v1, v2 (ease) in {time.monotonic() - t0:.0f} s")


# -- serving --------------------------------------------------------------------------------------
def children(pid: int) -> list[int]:
    """The pids whose parent is ``pid`` (from /proc)."""
    out = []
    for p in Path("/proc").iterdir():
        if p.name.isdigit():
            try:
                if int((p / "stat").read_text().rsplit(")", 1)[1].split()[1]) == pid:
                    out.append(int(p.name))
            except (OSError, ValueError, IndexError):
                pass
    return out


def alive(pid: int) -> bool:
    """``pid`` exists and is not a zombie."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def cmdline(pid: int) -> str:
    """``pid``'s command line ('' when it is gone)."""
    try:
        return Path(f"/proc/{pid}/cmdline").read_text(errors="replace")
    except OSError:
        return ""


class Serve:
    """``python -m flows.cli serve`` for one model on free loopback ports (default supervisor settings)."""

    def __init__(self, repo: Path, model: str, tmp: Path):
        from pipeline_lib.serving.server import free_ports

        self.model = model
        self.http, self.grpc, self.metrics = free_ports(3)
        sets = {"export.model_repository": repo, "export.model_name": model, "serving.host": "127.0.0.1",
                "serving.http_port": self.http, "serving.grpc_port": self.grpc, "serving.metrics_port": self.metrics}
        args = [a for k, v in sets.items() for a in ("--set", f"{k}={v}")]
        self.log_path = tmp / f"serve-{model}.log"
        self.out = open(self.log_path, "w")
        self.proc = subprocess.Popen([sys.executable, "-m", "flows.cli", "serve", *args], cwd=ROOT,
                                     stdout=self.out, stderr=subprocess.STDOUT)
        self.url, self.grpc_url = f"127.0.0.1:{self.http}", f"127.0.0.1:{self.grpc}"

    def triton(self) -> Optional[int]:
        pids = [p for p in children(self.proc.pid) if "tritonserver" in cmdline(p) and alive(p)]
        return pids[0] if pids else None

    def stubs(self) -> list[int]:
        t = self.triton()
        return [p for p in children(t) if alive(p) and "stub" in cmdline(p)] if t else []

    def live(self):
        from pipeline_lib.config import load_config
        from pipeline_lib.serving.server import live_server

        return live_server(load_config(None, {"serving": {"host": "127.0.0.1", "http_port": self.http}}).serving)

    def stop(self) -> Optional[int]:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()
        return self.proc.returncode


# -- checking answers ---------------------------------------------------------------------------
class Checker:
    """Sends one sample request to a model over gRPC and checks the answer against the offline answers
    of the accepted versions. -> "ok" | "wrong" | "non-finite" | "error"."""

    def __init__(self, ctx: Context, serve: Serve, seed: int):
        from pipeline_lib.serving.client import RecsysClient

        self.ctx, self.serve, self.rng = ctx, serve, random.Random(seed)
        self.client = RecsysClient(serve.grpc_url, "grpc", serve.model, timeout_s=30)
        self.last_error = ""

    def close(self) -> None:
        self.client.close()

    def once(self, accepted: tuple[int, ...] = (1,), size: int = 8) -> str:
        ctx = self.ctx
        try:
            if self.serve.model == RANK:
                i = self.rng.randrange(0, len(ctx.rank_rows) - size + 1)
                scores = np.asarray(self.client.predict(ctx.rank_rows.iloc[i:i + size]))
                if not np.isfinite(scores).all():
                    return "non-finite"
                return "ok" if np.allclose(scores.reshape(-1), ctx.rank_offline[i:i + size], atol=ctx.atol) else "wrong"
            i = self.rng.randrange(0, len(ctx.ret_rows) - size + 1)
            variant = self.rng.choice(("plain", "excl"))
            rows = ctx.ret_rows.iloc[i:i + size]
            if variant == "excl":
                rows = rows.assign(exclude_item_ids=ctx.ret_excl[i:i + size])
            ids, scores, count = self.client.recommend(rows, with_count=True)
            if not np.isfinite(scores).all():
                return "non-finite"
            if variant == "excl" and any(set(ids[r, :count[r]].tolist()) & set(ctx.ret_excl[i + r]) for r in range(size)):
                return "wrong"
            for v in accepted:
                oi, os_, oc = ctx.ret_offline[(v, variant)]
                if (np.array_equal(ids, oi[i:i + size]) and np.array_equal(count, oc[i:i + size])
                        and np.allclose(scores, os_[i:i + size], atol=ctx.atol)):
                    return "ok"
            return "wrong"
        except Exception as exc:  # noqa: BLE001 - any failure is counted and its message kept
            self.last_error = str(exc).splitlines()[0][:300] if str(exc) else type(exc).__name__
            return "error"


def load(ctx: Context, plan: list[tuple[Serve, tuple[int, ...]]], seconds: float,
         during: Optional[Callable[[], Any]] = None) -> dict:
    """One thread per (server, accepted versions) sending checked requests for ``seconds`` (or until
    ``during`` returns, when given); -> counts per outcome."""
    counts: dict[str, int] = {"requests": 0, "ok": 0, "wrong": 0, "non-finite": 0, "error": 0}
    errors: list[str] = []
    lock, stop = threading.Lock(), threading.Event()

    def worker(n: int, serve: Serve, accepted: tuple[int, ...]) -> None:
        c = Checker(ctx, serve, seed=n)
        try:
            while not stop.is_set():
                r = c.once(accepted)
                with lock:
                    counts["requests"] += 1
                    counts[r] += 1
                    if r == "error" and len(errors) < 5:
                        errors.append(f"{serve.model}: {c.last_error}")
        finally:
            c.close()

    threads = [threading.Thread(target=worker, args=(n, s, acc), daemon=True) for n, (s, acc) in enumerate(plan)]
    t0 = time.monotonic()
    for t in threads:
        t.start()
    result = None
    if during is not None:
        result = during()
    else:
        time.sleep(seconds)
    stop.set()
    for t in threads:
        t.join(timeout=60)
    wall = time.monotonic() - t0
    return {**counts, "seconds": round(wall, 1), "requests_per_s": round(counts["requests"] / wall, 1),
            "clients": len(plan), "first_errors": errors, "during": result}


# -- the phases -----------------------------------------------------------------------------------
def _valid_arrays(ctx: Context, serve: Serve) -> dict:
    from pipeline_lib.serving.client import RecsysClient

    from tritonclient.utils import triton_to_np_dtype

    with RecsysClient(serve.url, "http", serve.model) as c:
        rows = ctx.rank_rows.head(4) if serve.model == RANK else ctx.ret_rows.head(4)
        arrays = c.to_arrays(rows)
        if serve.model == RET:
            ctx.dtypes = {n: triton_to_np_dtype(t) for n, t in c._inputs.items()}
        return arrays


def _json_body(arrays: dict) -> dict:
    from tritonclient.utils import np_to_triton_dtype

    def data(a: np.ndarray) -> list:
        return [v.decode("utf-8", "replace") if isinstance(v, bytes) else v for v in a.ravel().tolist()]

    return {"inputs": [{"name": n, "shape": list(a.shape), "datatype": np_to_triton_dtype(a.dtype), "data": data(a)}
                       for n, a in arrays.items()]}


def _send_http(serve: Serve, body: bytes) -> tuple[str, str, dict]:
    import requests

    r = requests.post(f"http://{serve.url}/v2/models/{serve.model}/infer", data=body,
                      headers={"Content-Type": "application/json"}, timeout=60)
    try:
        doc = r.json()
    except ValueError:
        return str(r.status_code), r.text[:300], {}
    if r.status_code != 200:
        return str(r.status_code), str(doc.get("error", doc))[:300], {}
    out = {o["name"]: np.array(o["data"]).reshape(o["shape"]) for o in doc.get("outputs", [])}
    return "200", "", out


def _send_grpc(serve: Serve, arrays: dict) -> tuple[str, str, dict]:
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException, np_to_triton_dtype

    inputs = []
    for n, a in arrays.items():
        inp = grpcclient.InferInput(n, list(a.shape), np_to_triton_dtype(a.dtype))
        inp.set_data_from_numpy(a)
        inputs.append(inp)
    with grpcclient.InferenceServerClient(serve.grpc_url) as c:
        try:
            res = c.infer(serve.model, inputs, client_timeout=60)
        except InferenceServerException as exc:
            return str(exc.status() or ""), (exc.message() or "")[:300], {}
        outs = [o.name for o in res.get_response().outputs]
        return "OK", "", {n: res.as_numpy(n) for n in outs}


def run_matrix(ctx: Context, log: Callable[[str], None]) -> dict:
    valid = {m: _valid_arrays(ctx, ctx.servers[m]) for m in (RANK, RET)}
    probes = matrix(ctx)
    details = []
    for p in probes:
        serve = ctx.servers[p.model]
        base = valid[p.model]
        for protocol in p.protocols:
            try:
                if protocol == "http":
                    body = p.raw(_json_body(base)) if p.raw else json.dumps(_json_body(p.arrays(base))).encode()
                    status, msg, out = _send_http(serve, body)
                else:
                    status, msg, out = _send_grpc(serve, p.arrays(base))
            except Exception as exc:  # noqa: BLE001 - no answer at all (connection reset: a crash) is a result
                status, msg, out = "", f"{type(exc).__name__}: {exc}"[:300], {}
            cls = classify(protocol, status, msg)
            err = None
            if cls == "2xx":
                if out and any(a.dtype.kind == "f" and not np.isfinite(a).all() for a in out.values()):
                    err = "non-finite output"
                elif p.check is not None:
                    err = p.check(out)
            details.append({"probe": p.name, "model": p.model, "protocol": protocol, "expect": p.expect,
                            "status": status, "class": cls, "message": msg, "check_error": err,
                            "passed": probe_passed(p.expect, cls, err)})
    counts = {c: sum(d["class"] == c for d in details) for c in ("2xx", "4xx", "upstream-500", "5xx", "no answer")}
    bad = [d for d in details if d["expect"] != "ok"]
    res = {"probes": len(bad), **{c: sum(d["class"] == c for d in bad) for c in ("4xx", "upstream-500", "5xx", "no answer")},
           "2xx_unexpected": sum(d["class"] == "2xx" for d in bad),
           "ok_total": sum(d["expect"] == "ok" for d in details),
           "ok_passed": sum(d["expect"] == "ok" and d["passed"] for d in details),
           "all_classes": counts, "failed": [d for d in details if not d["passed"]], "details": details,
           "servers_alive_after": all(s.proc.poll() is None and s.triton() for s in ctx.servers.values())}
    log(f"bad-request matrix: {len(details)} requests ({len(bad)} bad, {res['ok_total']} edge cases): "
        f"4xx {res['4xx']}, upstream 500 {res['upstream-500']}, other 5xx {res['5xx']}, "
        f"2xx where refusal expected {res['2xx_unexpected']}, failed {len(res['failed'])}")
    for d in res["failed"]:
        log(f"  FAILED {d['protocol']} {d['model']} '{d['probe']}': {d['status']} {d['class']} {d['check_error'] or ''} {d['message'][:120]}")
    return res


# what `recsys serve`'s supervisor logs when it acts on a fault (none may appear during promote/rollback)
SUPERVISOR_ACTIONS = ("-> reload", "-> restart", "unloaded;", "giving up")


class ReadyPoller:
    """Polls ``/v2/health/ready`` and ``/v2/models/<m>/ready`` of ``serve`` every ``READY_POLL_S``, one
    thread per endpoint (Triton's health endpoint can block while a model loads: the model's endpoint must
    not wait for it). ``model`` / ``health``: [(t, status)], t = when the answer arrived (when a load
    balancer would act on it; Triton can take a second to answer while a model loads), in seconds since
    ``t0``; status 0: no answer within 2 s."""

    def __init__(self, serve: Serve, t0: float):
        self.t0 = t0
        self.model: list[tuple[float, int]] = []
        self.health: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, args=(f"http://{serve.url}{path}", out), daemon=True)
                         for path, out in ((f"/v2/models/{serve.model}/ready", self.model),
                                           ("/v2/health/ready", self.health))]
        for t in self._threads:
            t.start()

    def _run(self, url: str, out: list) -> None:
        import requests

        with requests.Session() as session:
            while not self._stop.is_set():
                try:
                    code = session.get(url, timeout=2).status_code
                except Exception:  # noqa: BLE001 - not answering is "not ready"
                    code = 0
                out.append((round(time.monotonic() - self.t0, 3), code))
                self._stop.wait(READY_POLL_S)

    def stop(self) -> "ReadyPoller":
        self._stop.set()
        for t in self._threads:
            t.join(timeout=10)
        return self


def _changes(samples: list[tuple[float, int]]) -> list[tuple[float, int]]:
    return [s for i, s in enumerate(samples) if i == 0 or s[1] != samples[i - 1][1]]


def ready_lie(ready: list[tuple[float, int]], failed_at: list[float], back_s: Optional[float]) -> tuple[float, Optional[float]]:
    """How long the model's ready endpoint said 200 while the service was down after a kill at t=0.

    ``ready``: (t, model ready status) samples in time order; ``failed_at``: start times of requests that
    failed; ``back_s``: start of the first correct answer (None: never back). The service is down from 0
    to ``back_s``; a stretch of 200 samples within it counts when it is the first one (the kill made
    every request fail) or when a request started in it and failed (a 200 that lied again later).
    -> (seconds of such 200 stretches, seconds until the first non-200 sample or None)."""
    end = back_s if back_s is not None else (ready[-1][0] if ready else 0.0)
    first_not_ready = next((t for t, code in ready if code != 200), None)
    lied = 0.0
    for i, (t, code) in enumerate(ready):
        if code != 200 or t >= end:
            continue
        t_next = min(ready[i + 1][0] if i + 1 < len(ready) else end, end)
        start = 0.0 if i == 0 else t  # the kill (t=0) is before the first sample
        initial = first_not_ready is None or t < first_not_ready
        if (initial and failed_at) or any(start <= f < t_next for f in failed_at):
            lied += t_next - start
    return round(lied, 3), first_not_ready


def run_promote(ctx: Context, cycles: int, dwell_s: float, log: Callable[[str], None]) -> dict:
    from pipeline_lib.serving import repository

    ret = ctx.servers[RET]
    repo = ctx.tmp / "model_repository"
    live = ret.live()
    events = []
    log_before = len(ret.log_path.read_text())
    poller = ReadyPoller(ret, time.monotonic())

    def switch() -> list:
        for _ in range(cycles):
            for op in ("promote", "rollback"):
                time.sleep(dwell_s)
                t0 = time.monotonic()
                if op == "promote":
                    repository.promote(repo, RET, 2, live)
                else:
                    repository.rollback(repo, RET, live)
                events.append({"op": op, "served": repository.served_version(repo, RET),
                               "seconds": round(time.monotonic() - t0, 2)})
        time.sleep(dwell_s)
        return events

    plan = [(ret, (1, 2)), (ret, (1, 2)), (ctx.servers[RANK], (1,))]
    try:
        res = load(ctx, plan, 0, during=switch)
    finally:
        ready = poller.stop().model
    # the replaced version's stub exits after each switch: the supervisor must not take it for a death
    actions = [line for line in ret.log_path.read_text()[log_before:].splitlines()
               if any(a in line for a in SUPERVISOR_ACTIONS)]
    not_200 = [(t, code) for t, code in ready if code not in (200, 0)]
    slow = [t for t, code in ready if code == 0]  # no answer within 2 s (Triton busy loading on 2 cores)
    res.update(cycles=cycles, errors=res["error"], events=events, ready_samples=len(ready),
               model_ready_not_200=len(not_200), model_ready_not_200_samples=not_200[:20],
               model_ready_no_answer=len(slow), model_ready_no_answer_at=slow[:20], supervisor_actions=actions)
    log(f"promote/rollback under load: {cycles} cycles, {res['requests']} requests, {res['error']} errors, "
        f"{res['wrong']} wrong, switch times {[e['seconds'] for e in events]} s; model ready answered non-200 "
        f"{len(not_200)} times {not_200[:5]}, no answer within 2 s {len(slow)} times, of {len(ready)} samples; "
        f"supervisor actions: {len(actions)}")
    return res


def run_fault(ctx: Context, model: str, target: str, log: Callable[[str], None], limit_s: float = 60.0) -> dict:
    """SIGKILL ``target`` ("stub" | "tritonserver") of ``model``'s server; send a checked inference every
    ~0.1 s until a correct answer returns, while a :class:`ReadyPoller` records the ready endpoints;
    -> recovery time and what the ready endpoints said while inference failed (:func:`ready_lie`)."""
    serve = ctx.servers[model]
    pids = serve.stubs() if target == "stub" else [serve.triton()]
    pids = [p for p in pids if p]
    if not pids:
        return {"model": model, "target": target, "recovered_s": None, "ready_truthful": False, "ready_lied_s": 0.0,
                "error": "no process to kill"}
    checker = Checker(ctx, serve, seed=99)
    samples: list[dict] = []
    t0 = time.monotonic()
    for pid in pids:
        os.kill(pid, signal.SIGKILL)
    poller = ReadyPoller(serve, t0)
    recovered = None
    counts = {"ok": 0, "wrong": 0, "non-finite": 0, "error": 0}
    try:
        while time.monotonic() - t0 < limit_s:
            t = time.monotonic() - t0
            r = checker.once((1,), size=4)
            counts[r] += 1
            samples.append({"t": round(t, 3), "answer": r, "error": checker.last_error if r == "error" else ""})
            if r == "error":  # a fresh gRPC channel per try: a failed channel's reconnect backoff is the client's delay
                checker.close()
                checker = Checker(ctx, serve, seed=99)
            if r == "ok":
                recovered = t
                break
            time.sleep(0.1)
    finally:
        checker.close()
        poller.stop()
    failing = [s for s in samples if s["answer"] != "ok"]
    lied_s, not_ready_s = ready_lie(poller.model, [s["t"] for s in failing], recovered)
    down = [r for r in poller.model if recovered is None or r[0] < recovered]
    health_down = [r for r in poller.health if recovered is None or r[0] < recovered]
    res = {"model": model, "target": target, "killed": pids,
           "recovered_s": None if recovered is None else round(recovered, 2),
           "within_target": recovered is not None and recovered <= RECOVER_TARGET_S,
           "ready_truthful": lied_s <= READY_TOLERANCE_S, "ready_lied_s": lied_s,
           "model_not_ready_after_s": not_ready_s,
           "samples_failing": len(failing), "ready_samples_while_down": len(down),
           "ready_samples_model_200_while_down": sum(code == 200 for _, code in down),
           "health_samples_while_down": len(health_down),
           "health_samples_200_while_down": sum(code == 200 for _, code in health_down),
           "answers": counts, "first_error": next((s["error"] for s in failing if s["error"]), ""),
           "answer_transitions": [s for i, s in enumerate(samples)  # each change of (answer, error)
                                  if i == 0 or (s["answer"], s["error"]) != (samples[i - 1]["answer"], samples[i - 1]["error"])],
           "model_ready_transitions": _changes(poller.model), "health_ready_transitions": _changes(poller.health)}
    log(f"SIGKILL {target} of '{model}': "
        + ("not back" if recovered is None else f"correct answers again after {recovered:.1f} s")
        + f"; model ready said 200 for {lied_s:.2f} s while down (first non-200 after "
          + ("never" if not_ready_s is None else f"{not_ready_s:.2f} s") + "), health ready 200 in "
          f"{res['health_samples_200_while_down']} of {len(health_down)} samples while down")
    return res


def wait_answering(ctx: Context, serve: Serve, within_s: float) -> float:
    t0 = time.monotonic()
    checker = None
    try:
        while time.monotonic() - t0 < within_s:
            if serve.proc.poll() is not None:
                raise RuntimeError(f"recsys serve for '{serve.model}' exited:\n{serve.log_path.read_text()[-3000:]}")
            try:
                checker = checker or Checker(ctx, serve, seed=0)
                if checker.once((1,)) == "ok":
                    return time.monotonic() - t0
            except Exception:  # noqa: BLE001 - not up yet
                checker = None
            time.sleep(0.5)
    finally:
        if checker is not None:
            checker.close()
    raise RuntimeError(f"'{serve.model}' did not answer correctly within {within_s:.0f} s:\n"
                       f"{serve.log_path.read_text()[-3000:]}")


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--load-seconds", type=float, default=20.0)
    ap.add_argument("--load-clients", type=int, default=4, help="gRPC client threads in the load phase (half per model)")
    ap.add_argument("--promote-cycles", type=int, default=2)
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "robustness.json")
    ap.add_argument("--keep-work", action="store_true", help="keep the temporary folder (versions, server logs)")
    args = ap.parse_args(argv)

    t_start = time.monotonic()

    def log(msg: str) -> None:
        print(f"[{time.monotonic() - t_start:6.1f} s] {msg}", flush=True)

    tmp = Path(tempfile.mkdtemp(prefix="recsys-robustness-"))
    ctx = Context(tmp)
    res: dict = {"machine": {"cpus": os.cpu_count()}, "started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
    code = 1
    try:
        build(ctx, log)
        repo = tmp / "model_repository"
        ctx.servers = {m: Serve(repo, m, tmp) for m in (RANK, RET)}
        for m, s in ctx.servers.items():
            log(f"'{m}' served by recsys serve (HTTP {s.http}, gRPC {s.grpc}): answers correctly after "
                f"{wait_answering(ctx, s, 240):.0f} s more")
        res["matrix"] = run_matrix(ctx, log)
        half = max(args.load_clients // 2, 1)
        plan = [(ctx.servers[RANK], (1,))] * half + [(ctx.servers[RET], (1,))] * (args.load_clients - half)
        res["load"] = load(ctx, plan, args.load_seconds)
        lo = res["load"]
        log(f"load: {lo['clients']} gRPC clients x {lo['seconds']} s: {lo['requests']} requests "
            f"({lo['requests_per_s']}/s), {lo['error']} errors, {lo['wrong']} wrong, {lo['non-finite']} non-finite")
        res["promote"] = run_promote(ctx, args.promote_cycles, 1.0, log)
        res["faults"] = []
        for model in (RANK, RET):
            for target in ("stub", "tritonserver"):
                res["faults"].append(run_fault(ctx, model, target, log))
                wait_answering(ctx, ctx.servers[model], 60)
                time.sleep(2.5)  # one probe interval: the supervisor has seen the model healthy again
        parts = [res["load"], res["promote"]]
        fault_answers = [f.get("answers", {}) for f in res["faults"]]
        res["totals"] = {
            "requests": sum(p["requests"] for p in parts) + sum(sum(a.values()) for a in fault_answers),
            "errors": sum(p["error"] for p in parts),
            "errors_during_fault_windows": sum(a.get("error", 0) for a in fault_answers),
            "wrong": sum(p["wrong"] for p in parts) + sum(a.get("wrong", 0) for a in fault_answers),
            "non_finite": sum(p["non-finite"] for p in parts) + sum(a.get("non-finite", 0) for a in fault_answers),
        }
        res["supervisor_exit_codes"] = {m: s.stop() for m, s in ctx.servers.items()}
        m, t = res["matrix"], res["totals"]
        res["targets_met"] = {
            "0 non-finite scores": t["non_finite"] == 0,
            "0 wrong answers": t["wrong"] == 0,
            "0 failed requests under load and promote/rollback": t["errors"] == 0,
            "every bad request 4xx (upstream 500s aside)": m["5xx"] == 0 and m["2xx_unexpected"] == 0 and m["no answer"] == 0,
            "edge cases answered correctly": m["ok_passed"] == m["ok_total"],
            "back within 10 s after each kill": all(f.get("within_target") for f in res["faults"]),
            "ready endpoints truthful": (all(f.get("ready_truthful") for f in res["faults"])
                                         and res["promote"]["model_ready_not_200"] == 0),
            "promote/rollback never taken for a fault": not res["promote"]["supervisor_actions"],
        }
        code = 0
    finally:
        for s in ctx.servers.values():
            s.stop()
        res["seconds"] = round(time.monotonic() - t_start, 1)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(res, indent=2, default=str))
        if not args.keep_work:
            shutil.rmtree(tmp, ignore_errors=True)
    print()
    print(format_table(res))
    print()
    for name, ok in res["targets_met"].items():
        print(f"{'met   ' if ok else 'MISSED'} {name}")
    print(f"\n{res['seconds']:.0f} s in all; JSON: {args.out}")
    return code


if __name__ == "__main__":
    sys.exit(main())
