"""The model beside the obvious baselines, on the run's own train/validation split.

One call per run, for every model family (``compare_with_baselines``): it computes the baselines
of the family on the same split as the model, puts them next to the model's metrics in the
model's ``metrics.json`` (``baselines``, ``lift``, ``baseline_comparison``), redraws the learning
curve with the baselines as horizontal reference lines, and returns a :class:`BaselineReport`
(the flow copies it into the run summary, the Prefect ``metrics`` artifact and the gate).

- ranking (dlrm, dcn, deepfm, wide_deep): ``logistic_regression`` (one-hot user id, item id and
  categorical features) and ``item_click_rate``, fitted on the raw training split and scored on the
  raw validation split (:func:`pipeline_lib.models.baselines.ranking_baselines`); compared on AUC (and
  log loss) with the model's validation metrics, which are computed on the same rows.
- retrieval (two_tower, youtube_dnn, mf, ease, item_knn): ``most_popular``, ``item_cooccurrence`` and ``ease``
  under the standard top-k protocol (:class:`pipeline_lib.models.baselines.TopKProtocol`: full
  catalogue, the user's training positives excluded, Recall@k / NDCG@k per user, averaged over
  users), and the retrieval model under the *same* protocol: one query per evaluated user (the
  query columns of the user's first positive validation row), scored against every catalogue
  item. Those model metrics are added as ``user_recall@k`` / ``user_ndcg@k`` ("per user, seen
  items excluded") beside the existing per-query metrics, which are kept as they are. In a
  two-stage run this is the retrieval stage, before re-ranking. A classical model (ease, item_knn) is
  scored by its saved weights under the same protocol (the figure its training reported), and the
  baseline of the same name (``ease``) is left out of the comparison: it is the model itself.
- session (``task: session``): ``most_popular`` and ``cooccurrence`` are already scored on the
  held-out sessions by :mod:`pipeline_lib.models.session`, with the model's exclusion of the
  session's own items (``session.exclude_seen``); they are reported in the same shape.

``BaselineReport.metric`` is the key compared (``auc``, ``recall@10``), ``model`` the model's
values under the baselines' protocol, ``baselines`` ``{name: {metric: value}}`` and ``lift`` one
sentence (:func:`pipeline_lib.models.baselines.lift_sentence`).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from pipeline_lib.config import FeatureKind, RunConfig
from pipeline_lib.etl import history as user_history
from pipeline_lib.etl.workflow import load_workflow
from pipeline_lib.models import baselines as bl
from pipeline_lib.models import classical, intervals
from pipeline_lib.models import ranking as ranking_model
from pipeline_lib.models import retrieval
from pipeline_lib.models.common import plot_learning_curve

log = logging.getLogger(__name__)

# keys of the per-baseline dicts that are bookkeeping, not metrics (kept out of tables and plots)
_INFO_KEYS = {"n_train", "n_valid", "n_test", "n_users", "n_items", "n_features", "seconds", "predictions",
              "auc_reason", "skipped", "n_positives", "units"}


@dataclass
class BaselineReport:
    family: str                          # ranking | retrieval | session
    model_name: str
    metric: str                          # the compared key, as in the baseline dicts ("auc", "recall@10")
    higher_is_better: bool
    model: dict                          # the model under the baselines' protocol, same keys as a baseline
    baselines: dict[str, dict]           # {name: {metric: value}} (or {name: {"skipped": reason}})
    lift: str
    protocol: dict = field(default_factory=dict)
    split: str = "test"                  # the split every figure here is measured on
    unit: str = "rows"                   # what the intervals resample: rows | users | sessions
    intervals: dict = field(default_factory=dict)   # {"model" | baseline name: {metric: Interval.to_json()}}
    lift_interval: Optional[dict] = None  # paired bootstrap of model - best baseline on ``metric``
    warnings: list = field(default_factory=list)     # the split too small to mean much, ...
    units: dict = field(default_factory=dict, repr=False)  # {"model": {metric: Units}, "baselines": {name: {...}}}

    def best(self, metric: Optional[str] = None) -> tuple[Optional[str], Optional[float]]:
        """The best baseline on ``metric`` (default: the compared one) and its value; (None, None)
        when no baseline has a finite value."""
        _, name, value = bl.best_baseline(self.baselines, metric or self.metric, self.higher_is_better)
        return name, value

    @property
    def label(self) -> str:
        """The model's name with the protocol when it differs from the run's headline metrics."""
        return f"{self.model_name} (per user, seen items excluded)" if self.family == "retrieval" else self.model_name

    @property
    def model_value(self) -> float:
        return float(self.model.get(self.metric, float("nan")))

    def model_units(self, metric: Optional[str] = None):
        """The model's per-unit data on ``metric`` (:mod:`pipeline_lib.models.intervals`), or None."""
        return (self.units.get("model") or {}).get(metric or self.metric)

    def baseline_units(self, name: str, metric: Optional[str] = None):
        """Baseline ``name``'s per-unit data on ``metric`` (same units as :meth:`model_units`), or None."""
        return ((self.units.get("baselines") or {}).get(name) or {}).get(metric or self.metric)

    def to_json(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "units"}
        return json.loads(json.dumps(d, default=_json_default))

    def table(self) -> list[dict]:
        """One row per method (the model first) and per metric: ``{"method", metric...}``."""
        keys = [k for k in self.model if k not in _INFO_KEYS and bl.finite(self.model[k])]
        rows = [{"method": f"{self.model_name} (model)", **{k: self.model[k] for k in keys}}]
        for name, r in self.baselines.items():
            if "skipped" in r:
                rows.append({"method": name, "skipped": r["skipped"]})
            else:
                rows.append({"method": name, **{k: r.get(k) for k in keys}})
        return rows

    def num_text(self, metric: str) -> str:
        v = self.model.get(metric)
        return f"{v:.4f}" if bl.finite(v) else "n/a"

    def interval_text(self, method: str, metric: str, digits: int = 4) -> Optional[str]:
        """``0.8120 [0.8010, 0.8230]`` of ``method`` ("model" or a baseline) on ``metric``, or None."""
        iv = (self.intervals.get(method) or {}).get(metric)
        if not iv:
            return None
        value, lo, hi = (float("nan") if iv[k] is None else float(iv[k]) for k in ("value", "lo", "hi"))
        return intervals.Interval(value, lo, hi, iv["n"], iv["level"]).text(digits)


def _json_default(o):
    if isinstance(o, (np.integer,)):
        return int(o)
    if isinstance(o, (np.floating,)):
        return float(o)
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    return str(o)


def _clean(results: dict[str, dict]) -> dict[str, dict]:
    """Baseline results without per-row arrays, plain floats/ints."""
    out = {}
    for name, r in results.items():
        out[name] = {k: (float(v) if isinstance(v, (float, np.floating)) else int(v) if isinstance(v, (np.integer,)) else v)
                     for k, v in r.items() if k != "predictions"}
    return out


# -------------------------------------------------------------------------------------------------
# per family
# -------------------------------------------------------------------------------------------------

def _interval_fields(cfg: RunConfig, units: dict, metric: str, higher_is_better: bool, baselines: dict,
                     unit: str) -> tuple[dict, Optional[dict], Optional[str]]:
    """Intervals of every method and metric, and the paired interval of model - best baseline on
    ``metric`` (with its sentence); the bootstrap is seeded with the run's seed."""
    e = cfg.evaluation
    boot: dict[str, Any] = dict(n_resamples=e.bootstrap_resamples, seed=cfg.seed, level=e.confidence)
    out = {"model": {m: intervals.interval(u, **boot).to_json() for m, u in units.get("model", {}).items()}}
    for name, per in units.get("baselines", {}).items():
        out[name] = {m: intervals.interval(u, **boot).to_json() for m, u in per.items()}
    _, best, _ = bl.best_baseline(baselines, metric, higher_is_better)
    mu = units.get("model", {}).get(metric)
    bu = units.get("baselines", {}).get(best, {}).get(metric) if best else None
    if mu is None or bu is None:
        return out, None, None
    d = intervals.paired_difference(mu, bu, **boot)
    text = (f"Difference to {best}: {d.text()} ({e.confidence:.0%} interval, paired bootstrap over {d.n} {unit} "
            "of the test split).")
    return out, d.to_json() | {"baseline": best}, text


def _finish(report: BaselineReport, cfg: RunConfig) -> BaselineReport:
    """Intervals, the lift's paired interval and the test split's size warnings on ``report``."""
    report.intervals, report.lift_interval, text = _interval_fields(
        cfg, report.units, report.metric, report.higher_is_better, report.baselines, report.unit)
    if text:
        report.lift = f"{report.lift.rstrip()} {text}"
    mu = report.model_units()
    if mu is not None and report.unit != "rows":  # rows: the positives are counted per split (families.split_report)
        w = intervals.too_small(f"{report.split} split", mu.n, cfg.evaluation.min_units, f"evaluated {report.unit}")
        if w:
            report.warnings.append(w)
    return report


def ranking_report(cfg: RunConfig, train_path: Path, test_path: Path, model_metrics: dict,
                   model_scores: np.ndarray) -> BaselineReport:
    """Logistic regression + item click rate fitted on the raw training split, and the model
    (``model_scores``: its scores of the raw ``test_path`` rows), all scored on the same test rows."""
    c = cfg.columns
    train = pd.read_parquet(train_path)
    test = pd.read_parquet(test_path)
    cats = [c.user_id, c.item_id] + [f.name for f in c.of_kind(FeatureKind.categorical)]
    cats = [x for x in dict.fromkeys(cats) if x in train.columns]
    # the user-history features (etl.history) reach the logistic regression too: a fair comparison
    numeric = [x for x in user_history.NUMERIC if x in train.columns]
    lists = [x for x in [user_history.history_column(c)] if cfg.etl.history.enabled and x in train.columns]
    full = bl.ranking_baselines(train, test, c.label, cats, item_col=c.item_id, seed=cfg.seed, return_predictions=True,
                                numeric=numeric, log_numeric=user_history.LOGGED, lists=lists)
    y = (test[c.label].to_numpy() > 0).astype(np.int64)
    scores = np.clip(np.asarray(model_scores, dtype=np.float64).reshape(-1), 1e-7, 1 - 1e-7)
    if len(scores) != len(y):
        raise ValueError(f"{len(scores)} model scores for {len(y)} test rows")
    units: dict = {"model": {"auc": intervals.AucUnits(y, scores), "logloss": intervals.logloss_units(y, scores)},
                   "baselines": {}}
    for bname, r in full.items():
        if "predictions" in r:
            p = np.clip(np.asarray(r["predictions"], dtype=np.float64), 1e-7, 1 - 1e-7)
            units["baselines"][bname] = {"auc": intervals.AucUnits(y, p), "logloss": intervals.logloss_units(y, p)}
    res = _clean(full)
    name = model_metrics.get("model", cfg.model.type)
    model = {m: intervals.point(u) for m, u in units["model"].items()}
    model.update(n_test=int(len(test)), n_positives=int(y.sum()))
    metric = cfg.gate_metric if cfg.gate_metric in ("auc", "logloss") else "auc"
    report = BaselineReport("ranking", name, metric, metric != "logloss", model, res,
                            bl.lift_sentence(name, model.get(metric, float("nan")), res, metric),
                            {"features": cats + numeric + lists, "n_test": int(len(test)), "n_positives": int(y.sum())},
                            unit="rows", units=units)
    return _finish(report, cfg)


def retrieval_model_scorer(cfg: RunConfig, model_dir: Path, workflow_dir: Path, train: pd.DataFrame,
                           valid: pd.DataFrame, protocol: bl.TopKProtocol):
    """A ``TopKProtocol`` score function for a trained retrieval model: one query per evaluated
    user (the query columns of the user's first positive held-out row) . every catalogue item."""
    c = cfg.columns
    r = cfg.model.retrieval
    spec = retrieval.RetrievalSpec.from_config(c, cfg.model.type, r.query_history, r.query_user_id)
    workflow = load_workflow(workflow_dir).remove_inputs([c.label])
    filler = retrieval.filler_row(train, workflow.input_schema.column_names)
    cat_raw = retrieval.catalogue(train, spec)
    ids, emb = retrieval.item_embeddings(workflow, Path(model_dir), spec, cat_raw, filler)
    row = pd.Series(np.arange(len(ids)), index=ids)
    emb = np.asarray(emb, dtype=np.float32)[row.reindex(protocol.item_ids).to_numpy().astype(np.int64)]
    queries = retrieval.first_positive_rows(valid, c.label, c.user_id, protocol.users)
    q = retrieval.query_embeddings(workflow, Path(model_dir), spec, queries, filler).astype(np.float32)

    cold = np.asarray(protocol.train_matrix.sum(axis=1)).ravel() == 0  # users without training positives
    popular = cfg.unknown_users == "popular" and cold.any()

    def score(rows: np.ndarray, xb) -> np.ndarray:
        s = q[rows] @ emb.T
        if popular:  # what the served version answers them (model.retrieval.unknown_users)
            s[cold[rows]] = protocol.popularity.astype(s.dtype)
        return s
    return score


def classical_model_scorer(model_dir: Path, protocol: bl.TopKProtocol):
    """A ``TopKProtocol`` score function of a saved ease / item_knn / mult_dae / mult_vae model (its weights over the
    user's history row)."""
    ids, _ = classical.load_items(model_dir)
    return classical.protocol_scorer(classical.aligned(classical.load_weights(model_dir), ids, protocol.item_ids))


def _mean_units(values: dict) -> dict:
    return {m: intervals.MeanUnits(v) for m, v in values.items()}


def retrieval_report(cfg: RunConfig, train_path: Path, test_path: Path, model_metrics: dict,
                     model_dir: Optional[Path], workflow_dir: Optional[Path],
                     valid_path: Optional[Path] = None) -> BaselineReport:
    """most_popular / item_cooccurrence / ease and the model, all under the standard top-k protocol
    on the test split (per-user values: the units of the intervals). ``valid_path``: the validation
    split, which precedes the test split: its positives are the users' history too (scored from and
    excluded, like the training positives; every model and baseline is still fitted on train only --
    docs/evaluation.md, "History at test time")."""
    c = cfg.columns
    k = cfg.model.retrieval.k
    train = pd.read_parquet(train_path)
    test = pd.read_parquet(test_path)
    history = pd.read_parquet(valid_path) if valid_path is not None else None
    p = bl.TopKProtocol.build(train, test, c.user_id, c.item_id, c.label, history=history)
    full = bl.retrieval_baselines(train, test, c.user_id, c.item_id, k, label=c.label, protocol=p, units=True)
    units: dict = {"model": {}, "baselines": {n: _mean_units(r.pop("units")) for n, r in full.items() if "units" in r}}
    res = _clean(full)
    name = model_metrics.get("model", cfg.model.type)
    model: dict = {}
    scorer = None
    if model_dir is not None and cfg.model.scores_history:
        scorer = classical_model_scorer(model_dir, p)
        if cfg.model.type in res:  # the run's own model is no baseline to beat (same closed form)
            res[cfg.model.type] = {"skipped": f"this run's model is {cfg.model.type} (model.type)"}
            units["baselines"].pop(cfg.model.type, None)
    elif model_dir is not None and workflow_dir is not None:
        scorer = retrieval_model_scorer(cfg, model_dir, workflow_dir, train, test, p)
    if scorer is not None:
        model = bl.TopKProtocol.evaluate_scores(p, scorer, k, units=True)
        units["model"] = _mean_units(model.pop("units"))
        model["n_items"] = len(p.item_ids)
    metric = f"{cfg.gate_metric}@{k}" if cfg.gate_metric in ("recall", "ndcg") else f"recall@{k}"
    report = BaselineReport("retrieval", name, metric, True, model, res,
                            bl.lift_sentence(f"{name} (per user, seen items excluded)",
                                             model.get(metric, float("nan")), res, metric),
                            {"k": k, "exclude_seen": True, **p.stats}, unit="users", units=units)
    return _finish(report, cfg)


def session_report(cfg: RunConfig, model_metrics: dict, train_dir: Optional[Path] = None,
                   test_path: Optional[Path] = None, model_dir: Optional[Path] = None,
                   workflow_dir: Optional[Path] = None, train_path: Optional[Path] = None) -> BaselineReport:
    """The model (its SavedModel, ``model_dir``, or a classical model's matrices) and the session baselines on the held-out test sessions
    (``test_path``; prefix in, last item as target), per session. Without them: the figures
    ``session_model.evaluate`` already put in ``model_metrics`` (validation, no intervals)."""
    from pipeline_lib.models import session as session_model
    from pipeline_lib.models import session_classical

    s, k = cfg.session, cfg.session.top_k
    metric = f"{s.gate_metric}@{k}"
    keys = [f"{m}@{k}" for m in ("recall", "ndcg", "mrr")]
    name = model_metrics.get("model", "session")
    units: dict = {}
    split, n_eval = "validation", model_metrics.get("n_valid")
    if (test_path is not None and model_dir is not None and workflow_dir is not None and train_dir is not None
            and train_path is not None):
        workflow = load_workflow(workflow_dir)
        n_items = int(workflow.output_schema[s.columns.item_id].int_domain.max) + 1
        train_tf = pd.read_parquet(sorted(Path(train_dir).glob("*.parquet"))[0])
        test = pd.read_parquet(test_path)
        classical = s.model.is_classical
        results = session_model.evaluate(workflow, None, test, train_tf, s.columns, k, n_items, s.exclude_seen,
                                         model_dir=None if classical else model_dir, units=True)
        train_raw = pd.read_parquet(train_path)  # the raw training sessions: the classical baselines' fit
        results.update(session_classical.baseline_metrics(train_raw, test, s.model.classical, s.columns, k,
                                                          s.exclude_seen, skip=s.model.type, units=True))
        if classical:  # the run's own model: its saved matrices on the same test sessions
            own = session_classical.ClassicalSessionModel.load(model_dir)
            results["model"] = session_classical.topk_metrics_of(own, test, s.columns, k, s.exclude_seen, units=True)
        units = {"model": _mean_units(results["model"]["units"]),
                 "baselines": {n: _mean_units(results[n]["units"]) for n in
                               ("most_popular", "cooccurrence", *session_classical.TYPES) if n in results}}
        model = {key: intervals.point(units["model"][key]) for key in keys}
        res = {n: {key: intervals.point(u[key]) for key in keys} for n, u in units["baselines"].items()}
        split, n_eval = "test", results["n_sessions"]
        model["n_test"] = n_eval
    else:
        model = {key: float(model_metrics[key]) for key in keys if key in model_metrics}
        res = {n: dict(v) for n, v in model_metrics.get("baselines", {}).items()}
    report = BaselineReport("session", name, metric, True, model, res,
                            bl.lift_sentence(name, model.get(metric, float("nan")), res, metric),
                            {"k": k, f"n_{'test' if split == 'test' else 'valid'}": n_eval,
                             "exclude_seen": model_metrics.get("exclude_seen")},
                            split=split, unit="sessions", units=units)
    return _finish(report, cfg) if units else report


# -------------------------------------------------------------------------------------------------
# one call for every family
# -------------------------------------------------------------------------------------------------

def compare_with_baselines(cfg: RunConfig, train_path: Optional[Path], test_path: Optional[Path], model,
                           workflow_dir: Optional[Path] = None, train_dir: Optional[Path] = None,
                           valid_path: Optional[Path] = None) -> BaselineReport:
    """Baselines of the run's model family fitted on train, beside the model, all on the test split.

    ``model`` is the train stage's output (:class:`pipeline_lib.models.common.TrainOutput`:
    ``model_dir``, ``metrics``, ``history``, ``metrics_path``).
    ``train_path`` / ``test_path``: the raw split parquet files (sessions: the raw session lists);
    ``valid_path`` (retrieval): the validation split, the users' history at test time besides train.
    ``workflow_dir``: the fitted workflow (to score the model on raw test rows); ``train_dir``
    (sessions): the transformed training sessions (the baselines' counts).

    Every figure carries a confidence interval (``report.intervals``, a bootstrap over the
    natural unit) and the lift the paired interval of model - best baseline.

    Side effects: ``model.metrics`` gains ``baselines``, ``lift``, ``test`` (the model's test
    figures) and ``test_intervals`` (and for retrieval ``user_recall@k`` / ``user_ndcg@k``); the
    model's ``metrics.json`` is rewritten with them and its ``learning_curve.png`` redrawn with the
    baselines' test figures as horizontal lines.
    """
    metrics = model.metrics
    if cfg.task == "session":
        report = session_report(cfg, metrics, train_dir, test_path, model.model_dir, workflow_dir, train_path)
    elif train_path is None or test_path is None:
        raise ValueError("compare_with_baselines: ranking and retrieval need the raw train and test splits")
    elif cfg.model.is_retrieval:
        # the test figures go to metrics["test"] below; the validation ``user_recall@k`` stays what it is:
        # candidates are chosen on it
        report = retrieval_report(cfg, train_path, test_path, metrics, model.model_dir, workflow_dir, valid_path)
    else:
        if workflow_dir is None:
            raise ValueError("compare_with_baselines: a ranking model needs workflow_dir to score the raw test rows")
        raw = pd.read_parquet(test_path)
        scores = ranking_model.raw_scores(load_workflow(workflow_dir), model.model_dir, raw, cfg.columns.label)
        report = ranking_report(cfg, train_path, test_path, metrics, scores)
    metrics["baselines"] = report.baselines
    metrics["lift"] = report.lift
    metrics["test"] = {k: v for k, v in report.model.items()}
    metrics["test_intervals"] = report.intervals.get("model", {})
    log.info("%s", report.lift)
    path = getattr(model, "metrics_path", None)
    if path is not None and Path(path).is_file():
        saved = json.loads(Path(path).read_text())
        saved["metrics"] = metrics
        saved["baseline_comparison"] = report.to_json()
        Path(path).write_text(json.dumps(saved, indent=2, default=_json_default))
        _replot(cfg, model, report, Path(path).parent / "learning_curve.png")
    return report


def reference_lines(report: BaselineReport, keys: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """``{panel key: {label: value}}`` of the baselines (and, for retrieval, the model under the
    baselines' protocol) to draw as horizontal lines on the learning-curve panels ``keys``."""
    out: dict[str, dict[str, float]] = {}
    for key in keys:
        lines: dict[str, float] = {}
        if report.family == "ranking":
            metric = "logloss" if key == "loss" else key  # Keras' loss of BinaryOutput is the log loss
        elif key == "loss":
            continue
        else:
            k = report.metric.split("@")[-1]
            metric = f"{key}@{k}"
        where = f", {report.split}" if report.split != "validation" else ""
        for name, r in report.baselines.items():
            if bl.finite(r.get(metric)):
                label = f"{name} ({report.split})" if report.family != "retrieval" else \
                    f"{name} (per user, seen excl.{where})"
                lines[label] = float(r[metric])
        if bl.finite(report.model.get(metric)):  # no per-epoch curve of it
            suffix = f" (per user, seen excl.{where})" if report.family == "retrieval" else f" (final, {report.split})"
            lines[f"{report.model_name}{suffix}"] = float(report.model[metric])
        if lines:
            out[key] = lines
    return out


def _test_text(report: BaselineReport, metric: str) -> str:
    text = report.interval_text("model", metric) or report.num_text(metric)
    return f"{report.split} {metric} {text}"


def _replot(cfg: RunConfig, model, report: BaselineReport, path: Path) -> None:
    history = getattr(model, "history", None) or {}
    m = model.metrics
    if report.family == "ranking":
        keys: tuple[str, ...] = ("loss", "auc")
        title = f"{report.model_name}: validation AUC {m['auc']:.4f}; {_test_text(report, 'auc')}"
    elif report.family == "retrieval":
        k = cfg.model.retrieval.k
        keys = ("loss", "recall", "ndcg")
        title = f"{report.model_name}: validation recall@{k} {m['recall']:.4f}; {_test_text(report, report.metric)}"
    else:
        k = cfg.session.top_k
        keys = ("loss", "recall")
        title = f"{report.model_name}: {_test_text(report, f'recall@{k}')} (held-out sessions)"
    if not history:  # a model fitted without epochs (classical session types): the baseline lines only
        keys = tuple(k for k in keys if k != "loss")
    try:
        plot_learning_curve(history, path, title=title, keys=keys, references=reference_lines(report, keys))
    except Exception as exc:  # a plot never fails a run
        log.warning("learning curve with baselines not drawn: %s", exc)
