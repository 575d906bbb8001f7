"""Evaluation gate: promote a candidate only if it is not worse than the served version.

Both are scored on the *same* raw validation rows (this run's held-out split), each through its
own exported ensemble (its own fitted workflow + model), so the comparison is what serving
would produce. The first run (nothing served) promotes.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from pipeline_lib import export
from pipeline_lib.train import ranking_metrics

HIGHER_IS_BETTER = {"auc": True, "logloss": False, "recall": True, "ndcg": True, "mrr": True, "precision": True}


@dataclass
class GateDecision:
    promote: bool
    metric: str
    candidate: float
    served: Optional[float]
    served_version: Optional[int]
    tolerance: float
    n_rows: int
    reason: str

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps(asdict(self), indent=2))
        return path


def score_version(version_dir: Path, raw: pd.DataFrame, label: str, batch: int = 8192) -> dict:
    ens = export.load_version(version_dir)
    cols = ens.input_schema.column_names
    missing = [c for c in cols if c not in raw.columns]
    if missing:
        raise KeyError(f"validation data lacks column(s) {missing} that version {Path(version_dir).name} needs")
    scores = np.concatenate([export.ensemble_scores(ens, raw.iloc[i:i + batch]) for i in range(0, len(raw), batch)])
    return ranking_metrics(raw[label].to_numpy(), scores)


def score_topk_version(version_dir: Path, raw: pd.DataFrame, label: str, batch: int = 4096) -> dict:
    """Recall/Precision/NDCG/MRR@k of what a top-k version *returns* for the held-out positives
    (its own k; the two-stage output when it has a ranker), over its item catalogue."""
    from pipeline_lib.retrieval import retrieval_metrics
    from pipeline_lib.topk import TOPK_DIR, TopKRecommender

    art = Path(version_dir) / TOPK_DIR
    if not art.is_dir():
        raise KeyError(f"version {Path(version_dir).name} is not a top-k model")
    rec = TopKRecommender(art)
    missing = [c for c in rec.request_columns if c not in raw.columns]
    if missing:
        raise KeyError(f"validation data lacks column(s) {missing} that version {Path(version_dir).name} needs")
    pos = raw[raw[label] == 1].reset_index(drop=True)
    row = pd.Series(np.arange(len(rec.item_ids)), index=rec.item_ids)
    preds = []
    for i in range(0, len(pos), batch):
        ids, scores = rec.recommend(pos.iloc[i:i + batch])
        # returned items ranked by their returned order; everything else below them
        pred = np.full((len(ids), len(rec.item_ids)), -1.0, dtype=np.float32)
        np.put_along_axis(pred, row.loc[ids.reshape(-1)].to_numpy().reshape(ids.shape),
                          np.arange(ids.shape[1], 0, -1, dtype=np.float32)[None, :].repeat(len(ids), 0), 1)
        preds.append(pred)
    pred = np.concatenate(preds) if preds else np.zeros((0, len(rec.item_ids)), dtype=np.float32)
    return retrieval_metrics(pred, rec.item_ids, pos[rec.spec.item_id].to_numpy(), rec.k)


def decide(candidate_dir: Path, served_dir: Optional[Path], served_version: Optional[int], raw: pd.DataFrame,
           label: str, metric: str, tolerance: float, topk: bool = False) -> GateDecision:
    score = score_topk_version if topk else score_version
    cand = score(candidate_dir, raw, label)[metric]
    base = dict(metric=metric, candidate=cand, served_version=served_version, tolerance=tolerance, n_rows=len(raw))
    if served_dir is None:
        return GateDecision(promote=True, served=None, reason="nothing served yet: first version promotes", **base)
    try:
        served = score(served_dir, raw, label)[metric]
    except Exception as exc:  # e.g. the served version was trained on other columns
        return GateDecision(promote=True, served=None,
                            reason=f"served version {served_version} cannot score this data ({exc}); promoting", **base)
    better = HIGHER_IS_BETTER[metric]
    ok = cand >= served - tolerance if better else cand <= served + tolerance
    word = "not worse than" if ok else "worse than"
    return GateDecision(promote=ok, served=served,
                        reason=f"candidate {metric} {cand:.5f} is {word} served v{served_version} {served:.5f} "
                               f"(tolerance {tolerance})", **base)
