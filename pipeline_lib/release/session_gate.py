"""Release of a session version: the served smoke test (served == offline) and the scoring of a
version on held-out sessions that the one promotion gate (:func:`pipeline_lib.release.gate.decide`) uses.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from pipeline_lib.export.parity import score_diff
from pipeline_lib.export.session_classical import open_session_version
from pipeline_lib.export.topk import TopKRoute
from pipeline_lib.models import intervals
from pipeline_lib.release.gate import CannotCompare, require_kind
from pipeline_lib.release.smoke import SmokeResult, model_load_events, serve_and_ask, served_parity
from pipeline_lib.models.session import metrics_from_topk
from pipeline_lib.etl.sessions import prefixes

def session_smoke_test(repository: Path, model_name: str, rows: pd.DataFrame, offline: tuple[np.ndarray, np.ndarray],
                       atol: float, out_dir: Path, startup_timeout_s: float = 180.0) -> SmokeResult:
    """Serve ``repository`` on free ports; served top-k ids must equal offline ids (scores within atol)
    over HTTP and gRPC (:func:`pipeline_lib.release.smoke.served_parity`). The result's ``offline`` /
    ``http`` / ``grpc`` are the top-k id lists."""
    http, grpc = serve_and_ask(repository, model_name, out_dir, startup_timeout_s, lambda c: c.recommend(rows))
    res = SmokeResult(len(rows), score_diff(http[1], offline[1]), score_diff(grpc[1], offline[1]),
                      offline[0].tolist(), http[0].tolist(), grpc[0].tolist(), model_load_events(out_dir / "triton.log"))
    try:
        served_parity(http, grpc, offline, atol)
    finally:
        (out_dir / "smoke.json").write_text(json.dumps({**asdict(res), "max_abs_diff": res.max_abs_diff,
                                                        "ids_equal": res.http == res.offline == res.grpc},
                                                       indent=2, default=str))
    return res


def score_version(version_dir: Path, sessions: pd.DataFrame, cols, k: int, batch: int = 2048,
                  rec: Optional[TopKRoute] = None) -> dict:
    """A published/staged version's metrics on raw held-out sessions (prefix in, last item as target).
    ``rec``: the version's recommender when already loaded (the staged candidate's, from export)."""

    if rec is None:
        require_kind(version_dir, "session")  # another family: CannotCompare; no version at all: an error
    rec = rec or open_session_version(version_dir)  # deep or classical by spec.json
    req, targets = prefixes(sessions, cols)
    missing = [c for c in rec.request_columns if c not in req.columns]
    if missing:
        raise CannotCompare(f"version {Path(version_dir).name} needs column(s) {missing}: not a session model for "
                            "this data")
    parts = [rec.recommend(req.iloc[i:i + batch]) for i in range(0, len(req), batch)]
    ids = np.concatenate([p[0] for p in parts])
    if ids.shape[1] < k:
        raise ValueError(f"version {Path(version_dir).name} returns {ids.shape[1]} items, fewer than top_k={k}")
    ids = ids[:, :k]
    targets = np.asarray(targets).astype(ids.dtype) if ids.dtype != object else np.asarray(targets).astype(str)
    hit = ids == np.asarray(targets).reshape(-1, 1)
    ranks = np.where(hit.any(axis=1), hit.argmax(axis=1), -1)
    units = {key: intervals.MeanUnits(v) for key, v in intervals.rank_units(ranks, k).items()}
    return metrics_from_topk(ids, None, targets, k) | {"units": units}
