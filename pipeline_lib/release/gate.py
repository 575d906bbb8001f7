"""Evaluation gate: promote a candidate only if it beats the obvious baselines and is not worse
than the served version.

Baselines (``gate.require_beat_baseline``, on by default): the candidate's gate metric, on the
same split and protocol as the baselines of its family (``pipeline_lib.models.evaluation``), must beat
the best baseline by ``gate.min_lift_over_baseline`` (relative: 0.02 = 2% above; for log loss,
2% below); otherwise it is refused, first run of a model family included ("dlrm auc 0.70000 does
not beat logistic_regression 0.71000").

Served version: both are scored on the *same* raw validation rows (this run's held-out split),
each through its own exported ensemble (its own fitted workflow + model), so the comparison is
what serving would produce. With nothing served, a candidate that beats the baselines promotes.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np
import pandas as pd

from pipeline_lib.export import ranking as export
from pipeline_lib.models.baselines import best_baseline, finite
from pipeline_lib.models.ranking import ranking_metrics
from pipeline_lib.models.retrieval import retrieval_metrics
from pipeline_lib.export.recommenders import open_recommender
from pipeline_lib.export.topk import TOPK_DIR, TopKRoute

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
    baseline_check: Optional[dict] = None  # see check_baselines

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


def score_topk_version(version_dir: Path, raw: pd.DataFrame, label: str, batch: int = 4096,
                       rec: Optional[TopKRoute] = None) -> dict:
    """Recall/Precision/NDCG/MRR@k of what a top-k version *returns* for the held-out positives
    (its own k; the two-stage output when it has a ranker), over its item catalogue. ``rec``: the
    version's recommender when already loaded (the staged candidate's, from export)."""

    art = Path(version_dir) / TOPK_DIR
    if not art.is_dir():
        raise KeyError(f"version {Path(version_dir).name} is not a top-k model")
    rec = rec or open_recommender(art)
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
        at = row.reindex(ids.reshape(-1)).to_numpy().reshape(ids.shape)  # NaN: padding (fewer than k returned)
        rank = np.arange(ids.shape[1], 0, -1, dtype=np.float32)[None, :].repeat(len(ids), 0)
        hit = ~np.isnan(at)
        pred[np.nonzero(hit)[0], at[hit].astype(np.int64)] = rank[hit]
        preds.append(pred)
    pred = np.concatenate(preds) if preds else np.zeros((0, len(rec.item_ids)), dtype=np.float32)
    return retrieval_metrics(pred, rec.item_ids, pos[rec.spec.item_id].to_numpy(), rec.k)  # type: ignore[attr-defined]


def _higher_is_better(metric: str) -> bool:
    return HIGHER_IS_BETTER[metric.split("@")[0]]


def check_baselines(model_name: str, metric: str, model_value: float, baselines: Mapping[str, Mapping],
                    min_lift: float = 0.0) -> dict:
    """Does the model beat the best baseline on ``metric`` by ``min_lift`` (relative)?

    ``baselines``: ``{name: {metric: value}}`` (entries without a finite ``metric`` value, e.g.
    ``{"skipped": reason}``, are left out). Higher-is-better metrics need ``model > best * (1 +
    min_lift)``, log loss ``model < best * (1 - min_lift)``; a tie does not beat. With no usable
    baseline the check passes (and says so); a NaN model value fails. Returns ``passed``,
    ``reason``, ``metric``, ``model``, ``best``, ``best_value``, ``required``, ``min_lift``.
    """
    hib = _higher_is_better(metric)
    _, best, bv = best_baseline(baselines, metric, hib)
    out: dict[str, Any] = dict(metric=metric, model=float(model_value) if finite(model_value) else None,
                               min_lift=min_lift, best=None, best_value=None, required=None)
    if best is None:
        return out | dict(passed=True, reason=f"no baseline has a {metric} value to compare {model_name} against")
    required = bv * (1 + min_lift) if hib else bv * (1 - min_lift)  # type: ignore[operator]  # best: bv too
    out.update(best=best, best_value=bv, required=required)
    margin = f" by {min_lift:.1%}" if min_lift else ""
    if not finite(model_value):
        return out | dict(passed=False, reason=f"{model_name} {metric} is NaN: it cannot beat {best} {bv:.5f}")
    mv = float(model_value)
    ok = mv > required if hib else mv < required
    lift = (mv - bv) / abs(bv) * 100 if bv else float("nan")
    if ok:
        reason = f"{model_name} {metric} {mv:.5f} beats the best baseline {best} {bv:.5f}{margin} ({lift:+.1f}%)"
    else:
        reason = f"{model_name} {metric} {mv:.5f} does not beat {best} {bv:.5f}{margin} (the best baseline)"
    return out | dict(passed=bool(ok), reason=reason)


@dataclass(frozen=True)
class BaselineArgs:
    """The baseline requirement of :func:`decide`: ``model_value`` (the model under the baselines' own
    protocol, on ``metric``) must beat the best of ``baselines`` (``{name: {metric: value}}``) by ``min_lift``."""

    baselines: Mapping[str, Mapping]
    model_value: float
    metric: str
    min_lift: float = 0.0
    model_name: str = "candidate"


@dataclass(frozen=True)
class Scorer:
    """How a family scores a version on its held-out data: ``score(version_dir) -> {metric: value}``
    over ``n_rows`` rows (ranking: AUC/log loss of the ensemble; top-k: recall/NDCG/... of what it returns)."""

    score: Callable[[Path], dict]
    n_rows: int

    def __call__(self, version_dir: Path) -> dict:
        return self.score(version_dir)


def ranking_scorer(raw: pd.DataFrame, label: str) -> Scorer:
    """Ranking ensembles (AUC, log loss) on raw validation rows (top-k versions: :func:`score_topk_version`)."""
    return Scorer(lambda version_dir: score_version(version_dir, raw, label), len(raw))


def baseline_args(gate_cfg, report) -> Optional[BaselineArgs]:
    """The baseline requirement for a run's ``GateConfig`` and ``evaluation.BaselineReport``
    (none when the report is missing or ``require_beat_baseline`` is off)."""
    if report is None or not gate_cfg.require_beat_baseline:
        return None
    return BaselineArgs(report.baselines, report.model_value, report.metric, gate_cfg.min_lift_over_baseline,
                        report.label)


def with_baselines(decision: GateDecision, baselines: Optional[Mapping[str, Mapping]], model_value: float,
                   metric: str, min_lift: float = 0.0, model_name: str = "candidate") -> GateDecision:
    """``decision`` after the baseline check: refused (with the check's reason first) when the
    model does not beat the best baseline; unchanged, with the check recorded, otherwise."""
    if baselines is None:
        return decision
    check = check_baselines(model_name, metric, model_value, baselines, min_lift)
    decision.baseline_check = check
    if check["passed"]:
        decision.reason = f"{check['reason']}; {decision.reason}"
    else:
        decision.promote = False
        # the comparison's own "... promotes/promoting" no longer holds: say what stays served instead
        context = ("nothing is served yet" if decision.served_version is None
                   else decision.reason.replace("; promoting", ""))
        decision.reason = f"{check['reason']}: not promoted (gate.require_beat_baseline); {context}"
    return decision


def decide(candidate_dir: Path, served_dir: Optional[Path], served_version: Optional[int], scorer: Scorer,
           metric: str, tolerance: float, baseline: Optional[BaselineArgs] = None) -> GateDecision:
    """Gate decision for a staged candidate version, for every task family.

    Both versions are scored by ``scorer`` (the same held-out rows, each through its own export);
    the candidate must not be worse than the served one on ``metric`` by more than ``tolerance``
    (the direction from :data:`HIGHER_IS_BETTER`; ``recall@10`` reads as ``recall``). With ``baseline``
    the candidate must first beat the best baseline (:func:`check_baselines`) -- also when nothing
    is served yet.
    """
    cand = scorer(candidate_dir)[metric]
    base = dict(metric=metric, candidate=cand, served_version=served_version, tolerance=tolerance,
                n_rows=scorer.n_rows)

    def finish(d: GateDecision) -> GateDecision:
        if baseline is None:
            return d
        return with_baselines(d, baseline.baselines, baseline.model_value, baseline.metric, baseline.min_lift,
                              baseline.model_name)

    if served_dir is None:
        return finish(GateDecision(promote=True, served=None, reason="nothing served yet: first version promotes",
                                   **base))
    try:
        served = scorer(served_dir)[metric]
    except Exception as exc:  # e.g. the served version was trained on other columns, or is another family
        return finish(GateDecision(promote=True, served=None,
                                   reason=f"served version {served_version} cannot score this data ({exc}); promoting",
                                   **base))
    ok = cand >= served - tolerance if _higher_is_better(metric) else cand <= served + tolerance
    word = "not worse than" if ok else "worse than"
    d = GateDecision(promote=ok, served=served,
                     reason=f"candidate {metric} {cand:.5f} is {word} served v{served_version} {served:.5f} "
                            f"(tolerance {tolerance})", **base)
    return finish(d)
