"""Evaluation gate, on the test split: promote a candidate only if it beats the obvious baselines
and is not worse than the served version -- and say "inconclusive" when the difference is inside
the noise.

Baselines (``gate.require_beat_baseline``, on by default): the candidate's gate metric, on the
same test split and protocol as the baselines of its family (``pipeline_lib.models.evaluation``),
must beat the best baseline by ``gate.min_lift_over_baseline`` (relative: 0.02 = 2% above; for log
loss, 2% below); otherwise it is refused, first run of a model family included ("dlrm auc 0.70000
does not beat logistic_regression 0.71000").

Served version: both are scored on the *same* raw test rows, each through its own exported version
(its own fitted workflow + model), so the comparison is what serving would produce.

Every comparison is a paired bootstrap of the difference on the same units
(:mod:`pipeline_lib.models.intervals`: rows for AUC / log loss, queries / sessions for top-k
metrics, users for the baselines' per-user protocol). Its interval, oriented so that positive is
better, decides: above ``-tolerance`` (served) or above the required margin (baselines):
*promoted*; below it: *refused*; across it: *inconclusive*, and ``gate.on_inconclusive`` decides
(``keep`` the served version by default; with nothing served, an inconclusive comparison with the
baselines promotes: a run ends serving something).

Fail closed: a served version that cannot be scored is compared with nothing only in the one
expected case, :class:`CannotCompare` (it belongs to another family or needs columns this data does
not have); any other error scoring it refuses the candidate.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

import numpy as np
import pandas as pd

from pipeline_lib.export import ranking as export
from pipeline_lib.models import intervals
from pipeline_lib.models.baselines import best_baseline, finite
from pipeline_lib.models.ranking import ranking_metrics
from pipeline_lib.models.retrieval import retrieval_metrics
from pipeline_lib.export.recommenders import open_recommender
from pipeline_lib.export.topk import TOPK_DIR, TopKRoute

HIGHER_IS_BETTER = {"auc": True, "logloss": False, "recall": True, "ndcg": True, "mrr": True, "precision": True}


OUTCOMES = ("promoted", "refused", "inconclusive")


class CannotCompare(KeyError):
    """The one expected reason a version cannot be scored on this run's data: it belongs to another
    task family, or needs columns the data does not have. The gate then promotes without a served
    comparison (and says so); any other scoring error refuses (fail closed)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else "cannot compare"


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
    outcome: str = ""                      # promoted | refused | inconclusive ("" -> from ``promote``)
    candidate_interval: Optional[dict] = None  # the candidate's metric on the gate rows, with its interval
    served_difference: Optional[dict] = None   # paired interval of candidate - served on the same rows
    warnings: list = field(default_factory=list)  # e.g. the test split too small to mean much

    def __post_init__(self) -> None:
        if not self.outcome:
            self.outcome = "promoted" if self.promote else "refused"

    def save(self, path: Path) -> Path:
        path.write_text(json.dumps(asdict(self), indent=2, default=str))
        return path


@dataclass(frozen=True)
class GateOptions:
    """How comparisons are decided: ``on_inconclusive`` (keep | promote) and the paired bootstrap."""

    on_inconclusive: str = "keep"
    n_resamples: int = intervals.DEFAULT_RESAMPLES
    seed: int = 0
    level: float = intervals.DEFAULT_LEVEL

    @classmethod
    def from_config(cls, cfg) -> "GateOptions":
        e = cfg.evaluation
        return cls(cfg.gate.on_inconclusive, e.bootstrap_resamples, cfg.seed, e.confidence)

    @property
    def boot(self) -> dict:
        return dict(n_resamples=self.n_resamples, seed=self.seed, level=self.level)


# top-k kinds (spec.json) of the classical models -> the family whose versions they compete with
FAMILY_OF_KIND = {"classical": "retrieval", "session_classical": "session"}


def version_kind(version_dir: Path) -> Optional[str]:
    """``ranking`` (a merlin-systems ensemble), ``retrieval`` / ``session`` (a top-k version, by its
    spec.json), or None when the folder holds no version at all."""
    d = Path(version_dir)
    spec = d / TOPK_DIR / "spec.json"
    if spec.is_file():
        kind = json.loads(spec.read_text()).get("kind", "retrieval")
        return FAMILY_OF_KIND.get(kind, kind)
    if (d / export.ENSEMBLE_SUBDIR).is_dir():
        return "ranking"
    return None


def require_kind(version_dir: Path, expected: str) -> None:
    """:class:`CannotCompare` when ``version_dir`` is a version of another family (a folder that holds
    no version is not that case: it raises FileNotFoundError, and the gate refuses)."""
    kind = version_kind(version_dir)
    if kind is None:
        raise FileNotFoundError(f"{version_dir} holds no model version (no {export.ENSEMBLE_SUBDIR}/ or {TOPK_DIR}/)")
    if kind != expected:
        raise CannotCompare(f"version {Path(version_dir).name} is a {kind} model, this run's candidate a {expected} one")


def score_version(version_dir: Path, raw: pd.DataFrame, label: str, batch: int = 8192) -> dict:
    """AUC / log loss of a ranking version's ensemble on raw rows, with their per-row ``units``."""
    require_kind(version_dir, "ranking")
    ens = export.load_version(version_dir)
    cols = ens.input_schema.column_names
    missing = [c for c in cols if c not in raw.columns]
    if missing:
        raise CannotCompare(f"the test data lacks column(s) {missing} that version {Path(version_dir).name} needs")
    scores = np.concatenate([export.ensemble_scores(ens, raw.iloc[i:i + batch]) for i in range(0, len(raw), batch)])
    y = raw[label].to_numpy()
    p = np.clip(np.asarray(scores, dtype=np.float64), 1e-7, 1 - 1e-7)
    return ranking_metrics(y, scores) | {"units": {"auc": intervals.AucUnits(y > 0, p),
                                                   "logloss": intervals.logloss_units(y > 0, p)}}


def score_topk_version(version_dir: Path, raw: pd.DataFrame, label: str, batch: int = 4096,
                       rec: Optional[TopKRoute] = None) -> dict:
    """Recall/Precision/NDCG/MRR@k of what a top-k version *returns* for the held-out positives
    (its own k; the two-stage output when it has a ranker), over its item catalogue. ``rec``: the
    version's recommender when already loaded (the staged candidate's, from export)."""

    art = Path(version_dir) / TOPK_DIR
    if rec is None:
        require_kind(version_dir, "retrieval")
    rec = rec or open_recommender(art)
    missing = [c for c in rec.request_columns if c not in raw.columns]
    if missing:
        raise CannotCompare(f"the test data lacks column(s) {missing} that version {Path(version_dir).name} needs")
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
    targets = pos[rec.spec.item_id].to_numpy()  # type: ignore[attr-defined]
    out = retrieval_metrics(pred, rec.item_ids, targets, rec.k)
    # per query: the target's place among the returned items (-1: not returned)
    target_col = row.reindex(targets).to_numpy()
    ranks = np.full(len(targets), -1, dtype=np.int64)
    known = ~np.isnan(target_col)
    if known.any():
        got = pred[np.flatnonzero(known), target_col[known].astype(np.int64)]
        ranks[np.flatnonzero(known)] = np.where(got > 0, rec.k - got, -1).astype(np.int64)
    unit_values = intervals.rank_units(ranks, rec.k)
    return out | {"units": {f"{m}@{rec.k}": intervals.MeanUnits(unit_values[f"{m}@{rec.k}"])
                            for m in ("recall", "precision", "ndcg", "mrr")} |
                  {m: intervals.MeanUnits(unit_values[f"{m}@{rec.k}"]) for m in ("recall", "precision", "ndcg", "mrr")}}


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
    protocol, on ``metric``) must beat the best of ``baselines`` (``{name: {metric: value}}``) by ``min_lift``.
    ``model_units`` / ``baseline_units`` (``{name: Units}``, the same units in the same order): the
    per-unit data for a paired bootstrap of the difference; without them the point values decide."""

    baselines: Mapping[str, Mapping]
    model_value: float
    metric: str
    min_lift: float = 0.0
    model_name: str = "candidate"
    model_units: Any = None
    baseline_units: Optional[Mapping[str, Any]] = None
    unit: str = "units"


@dataclass(frozen=True)
class Scorer:
    """How a family scores a version on its held-out data: ``score(version_dir) -> {metric: value}``
    over ``n_rows`` rows (ranking: AUC/log loss of the ensemble; top-k: recall/NDCG/... of what it
    returns), with the per-unit data of each metric under ``"units"`` (paired bootstrap)."""

    score: Callable[[Path], dict]
    n_rows: int

    def __call__(self, version_dir: Path) -> dict:
        return self.score(version_dir)


def ranking_scorer(raw: pd.DataFrame, label: str) -> Scorer:
    """Ranking ensembles (AUC, log loss) on raw test rows (top-k versions: :func:`score_topk_version`)."""
    return Scorer(lambda version_dir: score_version(version_dir, raw, label), len(raw))


def baseline_args(gate_cfg, report) -> Optional[BaselineArgs]:
    """The baseline requirement for a run's ``GateConfig`` and ``evaluation.BaselineReport``
    (none when the report is missing or ``require_beat_baseline`` is off), with the report's
    per-unit data on the test split."""
    if report is None or not gate_cfg.require_beat_baseline:
        return None
    units = {n: report.baseline_units(n) for n in report.baselines if report.baseline_units(n) is not None}
    return BaselineArgs(report.baselines, report.model_value, report.metric, gate_cfg.min_lift_over_baseline,
                        report.label, report.model_units(), units, report.unit)


def _oriented(d: intervals.Interval, higher_is_better: bool) -> intervals.Interval:
    """``d`` (a - b) turned so that positive means a is better."""
    if higher_is_better:
        return d
    return intervals.Interval(-d.value, -d.hi, -d.lo, d.n, d.level)


def _judge(d: intervals.Interval, threshold: float, ties_pass: bool = False) -> str:
    """promoted when the whole (oriented) interval is above ``threshold``, refused when it is below
    it, inconclusive when it spans it (or is undefined). A bound exactly at the threshold passes with
    ``ties_pass`` ("not worse than the served version": the same answers are not a regression) and
    fails without it ("beats the baseline": a tie does not beat)."""
    if not (math.isfinite(d.lo) and math.isfinite(d.hi)):
        return "inconclusive"
    if d.lo > threshold or (ties_pass and d.lo >= threshold):
        return "promoted"
    if d.hi < threshold or (not ties_pass and d.hi <= threshold):
        return "refused"
    return "inconclusive"


def baseline_outcome(check: dict, args: BaselineArgs, options: "GateOptions") -> tuple[str, str]:
    """(outcome, sentence) of the baseline requirement: a paired bootstrap of model - best baseline
    on the same units when both have them, else the point check (:func:`check_baselines`)."""
    best = check.get("best")
    bu = (args.baseline_units or {}).get(best) if best else None
    if best is None or args.model_units is None or bu is None or args.model_units.n != bu.n:
        return ("promoted" if check["passed"] else "refused"), check["reason"]
    hib = _higher_is_better(args.metric)
    d = _oriented(intervals.paired_difference(args.model_units, bu, **options.boot), hib)
    margin = abs(check["best_value"]) * args.min_lift
    outcome = _judge(d, margin)
    check["difference"] = d.to_json() | {"oriented": "positive = the model is better", "margin": margin}
    check["outcome"] = outcome
    ci = f"difference {d.text(5)} ({d.level:.0%} interval, paired over {d.n} {args.unit})"
    if outcome == "promoted":
        return outcome, f"{check['reason']}; {ci}"
    if outcome == "refused":
        if check["passed"]:  # ahead on the point value but not by the margin with confidence
            return outcome, f"{args.model_name} {args.metric} does not beat {best} with confidence: {ci}"
        return outcome, f"{check['reason']}; {ci}"
    return outcome, (f"{args.model_name} {args.metric} {_fmt(check['model'])} against {best} "
                     f"{check['best_value']:.5f}: inside the noise, {ci} spans {margin:g}")


def _fmt(v: Optional[float]) -> str:
    return "nan" if v is None or not finite(v) else f"{float(v):.5f}"


def with_baselines(decision: GateDecision, baselines: Optional[Mapping[str, Mapping]], model_value: float,
                   metric: str, min_lift: float = 0.0, model_name: str = "candidate") -> GateDecision:
    """``decision`` after the (point) baseline check: refused (with the check's reason first) when the
    model does not beat the best baseline; unchanged, with the check recorded, otherwise."""
    if baselines is None:
        return decision
    check = check_baselines(model_name, metric, model_value, baselines, min_lift)
    decision.baseline_check = check
    if check["passed"]:
        decision.reason = f"{check['reason']}; {decision.reason}"
    else:
        decision.promote, decision.outcome = False, "refused"
        # the comparison's own "... promotes/promoting" no longer holds: say what stays served instead
        context = ("nothing is served yet" if decision.served_version is None
                   else decision.reason.replace("; promoting", ""))
        decision.reason = f"{check['reason']}: not promoted (gate.require_beat_baseline); {context}"
    return decision


def served_outcome(cand: dict, served_dir: Path, served_version: Optional[int], scorer: Scorer, metric: str,
                   tolerance: float, options: "GateOptions") -> tuple[str, str, Optional[float], Optional[dict]]:
    """(outcome, sentence, served value, paired difference) of the candidate against the served version.

    Fail closed: :class:`CannotCompare` (another family, other columns) -> promoted, said so; any
    other error scoring the served version -> refused."""
    v = served_version
    try:
        served = scorer(served_dir)
    except CannotCompare as exc:
        return ("promoted", f"served version {v} cannot be compared with this candidate ({exc}): the expected "
                "case of another family or other columns, so it is replaced without a served comparison", None, None)
    except Exception as exc:  # noqa: BLE001 - fail closed: anything unexpected refuses
        return ("refused", f"scoring served version {v} failed ({type(exc).__name__}: {exc}): not promoted (the "
                "gate fails closed on any error but another family or other columns); check the served version "
                "(recsys rollback) and rerun", None, None)
    sv, cv = served[metric], cand[metric]
    hib = _higher_is_better(metric)
    cu, su = (cand.get("units") or {}).get(metric), (served.get("units") or {}).get(metric)
    if cu is None or su is None or cu.n != su.n:
        ok = cv >= sv - tolerance if hib else cv <= sv + tolerance
        word = "not worse than" if ok else "worse than"
        return ("promoted" if ok else "refused",
                f"candidate {metric} {cv:.5f} is {word} served v{v} {sv:.5f} (tolerance {tolerance})", sv, None)
    d = _oriented(intervals.paired_difference(cu, su, **options.boot), hib)
    outcome = _judge(d, -tolerance, ties_pass=True)
    ci = f"difference {d.text(5)} ({d.level:.0%} interval, paired over {d.n} units, tolerance {tolerance})"
    word = {"promoted": "not worse than", "refused": "worse than",
            "inconclusive": "inside the noise against"}[outcome]
    return outcome, f"candidate {metric} {cv:.5f} is {word} served v{v} {sv:.5f}: {ci}", sv, \
        d.to_json() | {"oriented": "positive = the candidate is better"}


def decide(candidate_dir: Path, served_dir: Optional[Path], served_version: Optional[int], scorer: Scorer,
           metric: str, tolerance: float, baseline: Optional[BaselineArgs] = None,
           options: Optional["GateOptions"] = None, warnings: Sequence[str] = ()) -> GateDecision:
    """Gate decision for a staged candidate version, for every task family (module docstring).

    Both versions are scored by ``scorer`` (the same held-out test rows, each through its own export);
    the candidate must not be worse than the served one on ``metric`` by more than ``tolerance``
    (the direction from :data:`HIGHER_IS_BETTER`; ``recall@10`` reads as ``recall``), judged on the
    paired interval of the difference. With ``baseline`` the candidate must also beat the best
    baseline (:func:`check_baselines`, with its paired interval) -- also when nothing is served yet.
    ``warnings`` (e.g. a test split too small to mean much) are added to the reason.
    """
    o = options or GateOptions()
    cand = scorer(candidate_dir)
    cu = (cand.get("units") or {}).get(metric)
    civ = intervals.interval(cu, **o.boot).to_json() if cu is not None else None
    parts: list[tuple[str, str]] = []
    check = None
    if baseline is not None:
        check = check_baselines(baseline.model_name, baseline.metric, baseline.model_value, baseline.baselines,
                                baseline.min_lift)
        parts.append(baseline_outcome(check, baseline, o))
    served_value = diff = None
    if served_dir is None:
        parts.append(("promoted", "nothing served yet: first version promotes"))
    else:
        outcome, text, served_value, diff = served_outcome(cand, served_dir, served_version, scorer, metric,
                                                           tolerance, o)
        parts.append((outcome, text))
    outcomes = [p[0] for p in parts]
    if "refused" in outcomes:
        outcome, promote, tail = "refused", False, ""
        kept = f"version {served_version} keeps serving" if served_dir is not None else "nothing is served"
        tail = f"not promoted; {kept}"
    elif "inconclusive" in outcomes:
        outcome = "inconclusive"
        if o.on_inconclusive == "promote":
            promote, tail = True, "inconclusive: promoted anyway (gate.on_inconclusive: promote)"
        elif served_dir is None:
            parts = [p for p in parts if not p[1].startswith("nothing served yet")]
            promote, tail = True, ("inconclusive, and nothing is served yet: promoted, since a run must end "
                                   "serving something (gate.on_inconclusive applies once a version serves)")
        else:
            promote, tail = False, (f"inconclusive: version {served_version} keeps serving "
                                    "(gate.on_inconclusive: keep)")
    else:
        outcome, promote, tail = "promoted", True, ""
    if baseline is not None and outcomes[0] == "refused" and check is not None and not check["passed"]:
        parts[0] = ("refused", f"{parts[0][1]}: not promoted (gate.require_beat_baseline)")
        tail = tail.replace("not promoted; ", "")
    reason = "; ".join([p[1] for p in parts] + ([tail] if tail else []) + list(warnings))
    return GateDecision(promote=promote, metric=metric, candidate=cand[metric], served=served_value,
                        served_version=served_version, tolerance=tolerance, n_rows=scorer.n_rows, reason=reason,
                        baseline_check=check, outcome=outcome, candidate_interval=civ, served_difference=diff,
                        warnings=list(warnings))
