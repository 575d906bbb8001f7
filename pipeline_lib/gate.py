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

HIGHER_IS_BETTER = {"auc": True, "logloss": False}


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


def decide(candidate_dir: Path, served_dir: Optional[Path], served_version: Optional[int], raw: pd.DataFrame,
           label: str, metric: str, tolerance: float) -> GateDecision:
    cand = score_version(candidate_dir, raw, label)[metric]
    base = dict(metric=metric, candidate=cand, served_version=served_version, tolerance=tolerance, n_rows=len(raw))
    if served_dir is None:
        return GateDecision(promote=True, served=None, reason="nothing served yet: first version promotes", **base)
    try:
        served = score_version(served_dir, raw, label)[metric]
    except Exception as exc:  # e.g. the served version was trained on other columns
        return GateDecision(promote=True, served=None,
                            reason=f"served version {served_version} cannot score this data ({exc}); promoting", **base)
    better = HIGHER_IS_BETTER[metric]
    ok = cand >= served - tolerance if better else cand <= served + tolerance
    word = "not worse than" if ok else "worse than"
    return GateDecision(promote=ok, served=served,
                        reason=f"candidate {metric} {cand:.5f} is {word} served v{served_version} {served:.5f} "
                               f"(tolerance {tolerance})", **base)
