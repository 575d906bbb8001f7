"""Serving smoke test: start Triton on a repository, send raw rows over HTTP and gRPC, compare
with the offline (workflow + model) scores, stop. Used as the gate before a version is published."""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from pipeline_lib.export.compiled_version import load_events
from pipeline_lib.export.parity import ParityError, check_parity
from pipeline_lib.serving.client import RecsysClient
from pipeline_lib.serving.server import TritonServer

log = logging.getLogger(__name__)


class ServingMismatch(AssertionError):
    pass


@dataclass
class SmokeResult:
    n_rows: int
    max_abs_diff_http: float
    max_abs_diff_grpc: float
    offline: list[float]
    http: list[float]
    grpc: list[float]
    model_load: list[dict] = field(default_factory=list)  # the served model's load lines (compiled_version.load_event)
    n_user_id_requests: int = 0  # (user, item) pairs scored by ids alone (feature store lookup), compared too
    max_abs_diff_user_id: float = 0.0

    @property
    def max_abs_diff(self) -> float:
        return max(self.max_abs_diff_http, self.max_abs_diff_grpc)

    def table(self, rows: pd.DataFrame) -> pd.DataFrame:
        out = rows.reset_index(drop=True).copy()
        out["served_http"], out["served_grpc"], out["offline"] = self.http, self.grpc, self.offline
        return out


def serve_and_ask(repository: Path, model_name: str, out_dir: Path, startup_timeout_s: float, ask) -> tuple:
    """Start Triton on ``repository`` (free local ports), call ``ask(client)`` over HTTP and then
    gRPC, stop the server; returns (http answer, grpc answer)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    server = TritonServer.on_free_ports(repository, log_file=out_dir / "triton.log")
    with server.start(timeout_s=startup_timeout_s, models=[model_name]):
        t0 = time.perf_counter()
        with RecsysClient(server.http_url, "http", model_name) as c:
            http = ask(c)
        with RecsysClient(server.grpc_url, "grpc", model_name) as c:
            grpc = ask(c)
        log.info("sent the raw rows to model '%s' over HTTP and gRPC: answered in %.2f s; stopping Triton",
                 model_name, time.perf_counter() - t0)
    return http, grpc


def served_parity(http, grpc, offline, atol: float) -> float:
    """:func:`pipeline_lib.export.parity.check_parity` of both protocols' answers; a difference is a
    :class:`ServingMismatch`. Returns the largest score difference."""
    try:
        return max(check_parity("served (HTTP)", http, offline, atol), check_parity("served (gRPC)", grpc, offline, atol))
    except ParityError as exc:
        raise ServingMismatch(str(exc)) from exc


def smoke_test(
    repository: Path,
    model_name: str,
    rows: pd.DataFrame,
    offline: np.ndarray,
    atol: float,
    out_dir: Path,
    startup_timeout_s: float = 180.0,
    user_requests: Optional["UserRequests"] = None,
) -> SmokeResult:
    """Serve ``repository`` on free local ports and check served == offline for raw ``rows``. ``user_requests``
    (``item_ids`` set): also score (user, item) pairs sent as ids alone (the served model reads the feature store)
    and compare them with the offline scores of the same pairs' full rows, read from the training data."""
    def ask(c: RecsysClient):
        full = c.predict(rows)
        if user_requests is None:
            return full, None
        return full, c.predict_user(user_requests.user_ids, user_requests.item_ids or [], user_requests.user_column,
                                    user_requests.item_column)

    (http, http_user), (grpc, grpc_user) = serve_and_ask(repository, model_name, out_dir, startup_timeout_s, ask)
    offline = np.asarray(offline, dtype=np.float64).reshape(-1)
    res = SmokeResult(
        n_rows=len(rows),
        max_abs_diff_http=float(np.max(np.abs(http - offline))),
        max_abs_diff_grpc=float(np.max(np.abs(grpc - offline))),
        offline=offline.tolist(), http=http.astype(float).tolist(), grpc=grpc.astype(float).tolist(),
        model_load=model_load_events(out_dir / "triton.log"),
    )
    if user_requests is not None:
        res.n_user_id_requests = len(user_requests.user_ids)
        res.max_abs_diff_user_id = pair_parity(user_requests, http_user, grpc_user, atol)
    (out_dir / "smoke.json").write_text(json.dumps(asdict(res) | {"max_abs_diff": res.max_abs_diff}, indent=2))
    log.info("smoke test: %d raw rows, served scores vs offline (workflow + model in process): max |diff| "
             "HTTP %.1e, gRPC %.1e (tolerance %g)", res.n_rows, res.max_abs_diff_http, res.max_abs_diff_grpc, atol)
    if not res.max_abs_diff <= atol:
        raise ServingMismatch(
            f"served scores differ from offline: http {res.max_abs_diff_http:.3g}, grpc {res.max_abs_diff_grpc:.3g} > {atol}"
        )
    return res


def model_load_events(log_file: Path) -> list[dict]:
    """The served model's load lines in the smoke test's Triton log, logged as one summary line."""
    try:
        events = load_events(log_file.read_text(errors="replace"))
    except OSError:
        return []
    for e in events:
        log.info("served model loaded the %s path in %.1f s%s; heavy modules in its process: %s", e.get("path"),
                 e.get("seconds", 0.0), f" ({e['why']})" if e.get("why") else "", ", ".join(e.get("heavy_modules") or [])
                 or "none")
    return events


@dataclass
class TopKSmokeResult:
    n_rows: int
    max_abs_diff: float
    item_ids: list
    scores: list
    request_columns: list
    n_user_id_requests: int = 0  # users asked by id alone (feature store lookup), compared too

    def table(self, rows: pd.DataFrame) -> pd.DataFrame:
        """The request columns that were sent, with the served top items and scores."""
        out = rows[self.request_columns].reset_index(drop=True).copy()
        out["top_items"] = [list(map(str, r)) for r in self.item_ids]
        out["top_scores"] = [[round(float(s), 4) for s in r] for r in self.scores]
        return out


def smoke_test_topk(
    repository: Path,
    model_name: str,
    rows: pd.DataFrame,
    offline: tuple[np.ndarray, np.ndarray],
    atol: float,
    out_dir: Path,
    startup_timeout_s: float = 180.0,
    user_requests: Optional["UserRequests"] = None,
) -> TopKSmokeResult:
    """Serve a top-k ``repository`` on free ports; the served top-k over HTTP and gRPC must equal
    the offline top-k for the same raw rows (same ids in the same order, scores within atol). The served
    answer holds only valid items (:func:`pipeline_lib.export.topk.finish_top_k`): the offline top-k is
    compared in the same form (a row the exclusions left fewer than k items padded the same way).
    ``user_requests``: also send requests that carry only the user id (the served model reads the feature store)
    and compare them with the offline top-k of the same users' full rows, read from the training data."""
    from pipeline_lib.export.topk import finish_top_k

    offline = finish_top_k(*offline)[:2]

    def ask(c: RecsysClient):
        full = c.recommend(rows)
        if user_requests is None:
            return full, None
        ids, scores, _, cold = c.recommend_user(user_requests.user_ids, user_requests.user_column)
        return full, (ids, scores, cold)

    (http, http_user), (grpc, grpc_user) = serve_and_ask(repository, model_name, out_dir, startup_timeout_s, ask)
    diff = served_parity(http, grpc, offline, atol)
    if user_requests is not None:
        diff = max(diff, user_parity(user_requests, http_user, grpc_user, atol))
    res = TopKSmokeResult(len(rows), diff, http[0].tolist(), http[1].astype(float).tolist(), list(rows.columns),
                          len(user_requests.user_ids) if user_requests is not None else 0)
    log.info("smoke test: %d raw rows, served top-%d over HTTP and gRPC == offline top-k (same ids and order; "
             "max score diff %.1e, tolerance %g)", res.n_rows, http[0].shape[1] if http[0].ndim == 2 else 0, diff, atol)
    (out_dir / "smoke.json").write_text(json.dumps(asdict(res), indent=2, default=str))
    return res


@dataclass
class UserRequests:
    """User-id requests of the smoke test: the ids, the user column, the offline top-k of their full rows
    (features read from the training data) and which ids the store must not know (cold start)."""

    user_ids: list
    user_column: str
    offline: tuple
    cold: list
    item_ids: Optional[list] = None  # a ranking version: one (user_ids[i], item_ids[i]) pair per row, scored
    item_column: str = ""


def _check_cold(req: UserRequests, what: str, http_flags, grpc_flags) -> None:
    """The served ``cold_start`` flags (HTTP, gRPC) must be set exactly where ``req`` expects (unknown users)."""
    for name, flags in (("HTTP", http_flags), ("gRPC", grpc_flags)):
        if list(map(bool, flags)) != list(req.cold):
            raise ServingMismatch(f"{what} over {name}: cold_start {list(map(bool, flags))}, expected "
                                  f"{list(req.cold)} for users {req.user_ids}")


def pair_parity(req: UserRequests, http, grpc, atol: float) -> float:
    """Ranking user-id answers ((scores, cold_start) over HTTP and gRPC) == the offline scores of the same pairs'
    full rows; ``cold_start`` set exactly for the unknown users' rows. Returns the largest score difference."""
    want = np.asarray(req.offline, dtype=np.float64).reshape(-1)
    diff = served_parity(np.asarray(http[0], dtype=np.float64), np.asarray(grpc[0], dtype=np.float64), want, atol)
    for name, got in (("HTTP", http), ("gRPC", grpc)):
        if not np.isfinite(got[0]).all():
            raise ServingMismatch(f"user-id ranking requests over {name}: non-finite scores {got[0].tolist()}")
    _check_cold(req, "user-id ranking requests", http[1], grpc[1])
    log.info("smoke test: %d (user, item) pairs sent as ids alone (features from the store) over HTTP and gRPC == "
             "offline scores of the same pairs' training rows (%d rows of an unknown user: cold start; max diff %.1e)",
             len(req.user_ids), sum(req.cold), diff)
    return diff


def user_parity(req: UserRequests, http, grpc, atol: float) -> float:
    """User-id answers over HTTP and gRPC == the offline top-k of the same users' full rows; the cold-start flag
    set exactly for the unknown ids. Returns the largest score difference."""
    from pipeline_lib.export.topk import finish_top_k

    want = finish_top_k(*req.offline)[:2]
    diff = served_parity(http[:2], grpc[:2], want, atol)
    _check_cold(req, "user-id requests", http[2], grpc[2])
    log.info("smoke test: %d user-id requests (features from the store) over HTTP and gRPC == offline top-k of the "
             "same users' training rows (%d unknown: cold start)", len(req.user_ids), sum(req.cold))
    return diff
