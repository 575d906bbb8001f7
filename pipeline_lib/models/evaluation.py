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
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from pipeline_lib.config import FeatureKind, RunConfig
from pipeline_lib.etl.workflow import load_workflow
from pipeline_lib.models import baselines as bl
from pipeline_lib.models import classical, retrieval
from pipeline_lib.models.common import plot_learning_curve

log = logging.getLogger(__name__)

# keys of the per-baseline dicts that are bookkeeping, not metrics (kept out of tables and plots)
_INFO_KEYS = {"n_train", "n_valid", "n_users", "n_items", "n_features", "seconds", "predictions", "auc_reason",
              "skipped"}


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

    def to_json(self) -> dict:
        return json.loads(json.dumps(asdict(self), default=_json_default))

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

def ranking_report(cfg: RunConfig, train_path: Path, valid_path: Path, model_metrics: dict) -> BaselineReport:
    """Logistic regression + item click rate on the raw split, against the model's AUC/log loss."""
    c = cfg.columns
    train = pd.read_parquet(train_path)
    valid = pd.read_parquet(valid_path)
    cats = [c.user_id, c.item_id] + [f.name for f in c.of_kind(FeatureKind.categorical)]
    cats = [x for x in dict.fromkeys(cats) if x in train.columns]
    res = _clean(bl.ranking_baselines(train, valid, c.label, cats, item_col=c.item_id, seed=cfg.seed))
    name = model_metrics.get("model", cfg.model.type)
    model = {k: float(model_metrics[k]) for k in ("auc", "logloss") if k in model_metrics}
    model["n_valid"] = int(model_metrics.get("n_valid", len(valid)))
    metric = cfg.gate_metric if cfg.gate_metric in ("auc", "logloss") else "auc"
    return BaselineReport("ranking", name, metric, metric != "logloss", model, res,
                          bl.lift_sentence(name, model.get(metric, float("nan")), res, metric),
                          {"features": cats, "n_valid": int(len(valid))})


def retrieval_model_scorer(cfg: RunConfig, model_dir: Path, workflow_dir: Path, train: pd.DataFrame,
                           valid: pd.DataFrame, protocol: bl.TopKProtocol):
    """A ``TopKProtocol`` score function for a trained retrieval model: one query per evaluated
    user (the query columns of the user's first positive validation row) . every catalogue item."""
    c = cfg.columns
    spec = retrieval.RetrievalSpec.from_config(c, cfg.model.type)
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
    """A ``TopKProtocol`` score function of a saved ease / item_knn model (its weights over the user's training row)."""
    ids, _ = classical.load_items(model_dir)
    return classical.protocol_scorer(classical.aligned(classical.load_weights(model_dir), ids, protocol.item_ids))


def retrieval_report(cfg: RunConfig, train_path: Path, valid_path: Path, model_metrics: dict,
                     model_dir: Optional[Path], workflow_dir: Optional[Path]) -> BaselineReport:
    """most_popular / item_cooccurrence / ease and the model, all under the standard top-k protocol."""
    c = cfg.columns
    k = cfg.model.retrieval.k
    train = pd.read_parquet(train_path)
    valid = pd.read_parquet(valid_path)
    p = bl.TopKProtocol.build(train, valid, c.user_id, c.item_id, c.label)
    res = _clean(bl.retrieval_baselines(train, valid, c.user_id, c.item_id, k, label=c.label, protocol=p))
    name = model_metrics.get("model", cfg.model.type)
    model: dict = {}
    if model_dir is not None and cfg.model.is_classical:
        model = bl.TopKProtocol.evaluate_scores(p, classical_model_scorer(model_dir, p), k)
        model["n_items"] = len(p.item_ids)
        if cfg.model.type in res:  # the run's own model is no baseline to beat (same closed form)
            res[cfg.model.type] = {"skipped": f"this run's model is {cfg.model.type} (model.type)"}
    elif model_dir is not None and workflow_dir is not None:
        model = bl.TopKProtocol.evaluate_scores(p, retrieval_model_scorer(cfg, model_dir, workflow_dir, train, valid, p), k)
        model["n_items"] = len(p.item_ids)
    metric = f"{cfg.gate_metric}@{k}" if cfg.gate_metric in ("recall", "ndcg") else f"recall@{k}"
    return BaselineReport("retrieval", name, metric, True, model, res,
                          bl.lift_sentence(f"{name} (per user, seen items excluded)", model.get(metric, float("nan")),
                                           res, metric),
                          {"k": k, "exclude_seen": True, **p.stats})


def session_report(cfg: RunConfig, model_metrics: dict) -> BaselineReport:
    """The session baselines already scored by ``session_model.evaluate`` (same held-out sessions)."""
    k = cfg.session.top_k
    metric = f"{cfg.session.gate_metric}@{k}"
    keys = [f"{m}@{k}" for m in ("recall", "ndcg", "mrr")]
    model = {key: float(model_metrics[key]) for key in keys if key in model_metrics}
    res = {n: dict(v) for n, v in model_metrics.get("baselines", {}).items()}
    name = model_metrics.get("model", "session")
    return BaselineReport("session", name, metric, True, model, res,
                          bl.lift_sentence(name, model.get(metric, float("nan")), res, metric),
                          {"k": k, "n_valid": model_metrics.get("n_valid"), "exclude_seen": model_metrics.get("exclude_seen")})


# -------------------------------------------------------------------------------------------------
# one call for every family
# -------------------------------------------------------------------------------------------------

def compare_with_baselines(cfg: RunConfig, train_path: Optional[Path], valid_path: Optional[Path], model,
                           workflow_dir: Optional[Path] = None) -> BaselineReport:
    """Baselines of the run's model family on its split, beside the model.

    ``model`` is the train stage's output (:class:`pipeline_lib.models.common.TrainOutput`:
    ``model_dir``, ``metrics``, ``history``, ``metrics_path``).
    ``train_path`` / ``valid_path``: the raw split parquet files (unused for sessions, whose
    baselines come from the model's own evaluation). ``workflow_dir``: the fitted workflow
    (retrieval: to score the model under the standard protocol).

    Side effects: ``model.metrics`` gains ``baselines``, ``lift`` (and for retrieval
    ``user_recall@k`` / ``user_ndcg@k``); the model's ``metrics.json`` is rewritten with them and
    its ``learning_curve.png`` redrawn with the baselines as horizontal lines.
    """
    metrics = model.metrics
    if cfg.task == "session":
        report = session_report(cfg, metrics)
    elif cfg.model.is_retrieval:
        report = retrieval_report(cfg, train_path, valid_path, metrics, model.model_dir, workflow_dir)  # type: ignore[arg-type]
        k = cfg.model.retrieval.k
        for m in ("recall", "ndcg"):
            if f"{m}@{k}" in report.model:
                metrics[f"user_{m}@{k}"] = report.model[f"{m}@{k}"]
    else:
        report = ranking_report(cfg, train_path, valid_path, metrics)  # type: ignore[arg-type]
    metrics["baselines"] = report.baselines
    metrics["lift"] = report.lift
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
        for name, r in report.baselines.items():
            if bl.finite(r.get(metric)):
                label = name if report.family != "retrieval" else f"{name} (per user, seen excl.)"
                lines[label] = float(r[metric])
        if report.family != "ranking" and bl.finite(report.model.get(metric)):  # no per-epoch curve of it
            suffix = " (per user, seen excl.)" if report.family == "retrieval" else " (final)"
            lines[f"{report.model_name}{suffix}"] = float(report.model[metric])
        if lines:
            out[key] = lines
    return out


def _replot(cfg: RunConfig, model, report: BaselineReport, path: Path) -> None:
    history = getattr(model, "history", None) or {}
    m = model.metrics
    if report.family == "ranking":
        keys: tuple[str, ...] = ("loss", "auc")
        title = f"{report.model_name}: validation AUC {m['auc']:.4f}"
    elif report.family == "retrieval":
        k = cfg.model.retrieval.k
        keys = ("loss", "recall", "ndcg")
        title = f"{report.model_name}: validation recall@{k} {m['recall']:.4f}"
    else:
        k = cfg.session.top_k
        keys = ("loss", "recall")
        title = f"{report.model_name}: recall@{k} {m[f'recall@{k}']:.4f} (held-out sessions)"
    if not history:  # a model fitted without epochs (classical session types): the baseline lines only
        keys = tuple(k for k in keys if k != "loss")
    try:
        plot_learning_curve(history, path, title=title, keys=keys, references=reference_lines(report, keys))
    except Exception as exc:  # a plot never fails a run
        log.warning("learning curve with baselines not drawn: %s", exc)
