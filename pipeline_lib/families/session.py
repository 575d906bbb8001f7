"""Session-based next-item prediction (``task: session``).

raw events -> validated -> NVTabular (grouping by session + fitted feature workflow) -> sequence
model vs baselines (most popular, co-occurrence, session_knn, sequential_rules) -> top-k version
(workflow + model, the top-k route of retrieval: :mod:`pipeline_lib.export.topk`; a classical
``session.model.type``: its sparse matrices, :mod:`pipeline_lib.export.session_classical`) ->
gate on recall/NDCG/MRR@k of what a version returns -> served top-k == offline top-k.
Requests are held-out sessions minus their last event (the target).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import pandas as pd

from pipeline_lib import report
from pipeline_lib.data import sessions as session_data
from pipeline_lib.etl import sessions as session_etl
from pipeline_lib.export import ranking as export
from pipeline_lib.export import session as session_export
from pipeline_lib.export import session_classical as classical_export
from pipeline_lib.export import topk
from pipeline_lib.features.sessions import write_session_snapshot
from pipeline_lib.families.base import ServedReport, TaskFamily, Trained
from pipeline_lib.models import evaluation
from pipeline_lib.models import session as session_model
from pipeline_lib.models import session_classical
from pipeline_lib.paths import RunPaths
from pipeline_lib.release import gate
from pipeline_lib.release import session_gate as session_release
from pipeline_lib.validate import sessions as session_checks

METRICS = ("recall", "ndcg", "mrr")


class SessionFamily(TaskFamily):
    name = "session"
    title = "session run"

    def raw_data(self, paths: RunPaths) -> Path:
        return session_data.write_raw_events(self.cfg.data, self.cfg.session, self.cfg.seed, paths.raw)

    def check_raw(self, paths: RunPaths, raw_path: Path) -> tuple[Path, list[str]]:
        return session_checks.validate_events(raw_path, self.cfg.session.columns, paths.validated), []

    def etl_inputs(self) -> dict:
        return {"config": self.cfg.model_dump(
            mode="json", include={"seed": True, "split": True, "etl": True, "session": {"columns", "etl"}},
            exclude={"etl": {"dask"}})}

    def etl(self, paths: RunPaths, raw_path: Path) -> session_etl.SessionEtlOutput:
        return session_etl.run_session_etl(raw_path, self.cfg, paths.transformed, paths.split)

    def train(self, paths: RunPaths, etl_out: session_etl.SessionEtlOutput) -> Trained:
        cfg, s = self.cfg, self.cfg.session
        if s.model.is_classical:
            model = session_classical.train_and_evaluate(etl_out, cfg, paths.model)
        else:  # the classical session models are its baselines, on the same held-out sessions
            train_raw = pd.read_parquet(etl_out.split.train)
            model = session_model.train_and_evaluate(etl_out, cfg, paths.model, lambda held_out: (
                session_classical.baseline_metrics(train_raw, held_out, s.model.classical, s.columns, s.top_k,
                                                   s.exclude_seen)))
        baselines = evaluation.compare_with_baselines(self.cfg, etl_out.split.train, etl_out.split.test, model,
                                                      etl_out.workflow_dir, etl_out.train_dir)
        return Trained(model, baselines)

    @property
    def selection_metric(self) -> str:
        return f"recall@{self.cfg.session.top_k}"

    def model_label(self, trained: Trained) -> str:
        return trained.model.metrics["model"]

    def export(self, paths: RunPaths, etl_out: session_etl.SessionEtlOutput, trained: Trained) -> topk.TopKExport:
        cfg, s = self.cfg, self.cfg.session
        options = export.ExportOptions.from_config(cfg, self.run_info(paths, trained), exclude_seen=s.exclude_seen)
        if s.model.is_classical:  # numpy on raw item ids: no workflow, no SavedModel
            return classical_export.export_session_classical(
                trained.model.model_dir, self.smoke_rows(etl_out, cfg.export.parity_rows), s.columns.item_id,
                s.top_k, paths.ensemble, cfg.export.model_name, options)
        staged = session_export.export_session_topk(
            etl_out.workflow_dir, trained.model.model_dir, self.smoke_rows(etl_out, cfg.export.parity_rows),
            s.columns.item_id, s.top_k, paths.ensemble, cfg.export.model_name, options)
        if cfg.features.enabled:  # the item features, looked up by item id when a request leaves them out
            write_session_snapshot(staged, etl_out.split.train, s.columns)
        return staged

    def smoke_rows(self, etl_out: session_etl.SessionEtlOutput, n: int) -> pd.DataFrame:
        """Held-out sessions minus their last event: what a client would send."""
        return session_etl.prefixes(pd.read_parquet(etl_out.split.valid).head(n), self.cfg.session.columns)[0]

    def offline_reference(self, etl_out: session_etl.SessionEtlOutput, exp: topk.TopKExport,
                          rows: pd.DataFrame) -> Any:
        """The version's own recommender (the one export checked) on the offline path (workflow.transform +
        Merlin Loader + SavedModel; a classical model: its evaluation path)."""
        return exp.open(classical_export.recommender_class(self.cfg.session.model.type)).offline(rows)

    def serve_and_compare(self, paths: RunPaths, exp: topk.TopKExport, rows: pd.DataFrame, offline: Any) -> Any:
        s = self.cfg.serving
        return session_release.session_smoke_test(exp.staged_repository, exp.model_name, rows, offline, s.smoke_atol,
                                                  paths.serving, s.startup_timeout_s)

    @property
    def gate_metric(self) -> str:
        return f"{self.cfg.session.gate_metric}@{self.cfg.session.top_k}"

    def gate_scorer(self, etl_out: session_etl.SessionEtlOutput, exp: Optional[topk.TopKExport] = None) -> gate.Scorer:
        """Recall/NDCG/MRR@k of what a version returns; the candidate through the recommender export checked."""
        s = self.cfg.session
        valid = self.gate_rows(etl_out)
        return gate.Scorer(lambda version_dir: session_release.score_version(
            version_dir, valid, s.columns, s.top_k, rec=topk.loaded_recommender(exp, version_dir)), len(valid))

    def headline_metrics(self, trained: Trained) -> dict:
        """Recall/NDCG/MRR@k on the held-out test sessions (per session; ties by item index)."""
        k, t = self.cfg.session.top_k, trained.baselines.model
        return {**{key: t[key] for key in (f"{m}@{k}" for m in METRICS) if key in t},
                "n_train": trained.model.metrics["n_train"], "n_test": t.get("n_test")}

    def validation_metrics(self, trained: Trained) -> dict:
        k, m = self.cfg.session.top_k, trained.model.metrics
        return {key: m[key] for key in (*(f"{x}@{k}" for x in METRICS), "n_valid") if key in m}

    def summary_fields(self, trained: Trained, exp: topk.TopKExport) -> dict:
        return {"task": "session", **super().summary_fields(trained, exp)}

    def metrics_table(self, trained: Trained) -> tuple[list[dict], str]:
        """Model vs baselines on the test sessions, one row each, every figure with its interval."""
        k, b = self.cfg.session.top_k, trained.baselines
        methods = {"model": (b.model_name, b.model), **{n: (n, v) for n, v in b.baselines.items()}}
        rows = [{"method": label, **{f"{m}@{k}": b.interval_text(key, f"{m}@{k}") or report.num(vals.get(f"{m}@{k}"))
                                      for m in METRICS}}
                for key, (label, vals) in methods.items()]
        v = self.validation_metrics(trained)
        rows.append({"method": f"{b.model_name} (validation)", **{f"{m}@{k}": report.num(v.get(f"{m}@{k}"))
                                                                for m in METRICS}})
        return rows, (f"next-item metrics on the held-out {b.split} sessions (k={k}) with "
                      f"{self.cfg.evaluation.confidence:.0%} intervals (bootstrap over sessions); last row: validation")

    def served_fields(self, result: Any) -> dict:
        return super().served_fields(result) | {"served_topk_equals_offline": True}

    def served_report(self, result: Any, rows: pd.DataFrame, summary: dict) -> ServedReport:
        s, k = self.cfg.session, self.cfg.session.top_k
        preds = result.table(rows)
        shown = preds.drop(columns=[s.columns.timestamp], errors="ignore")  # 10-digit lists: too wide
        artifact = report.compact_table(shown, merge=("top-k", report.SCORE_COLUMNS),
                                        tail=[c for c in shown.columns if c not in report.SCORE_COLUMNS])
        item, m = s.columns.item_id, summary["metrics"]
        last = pd.DataFrame({f"{item} (last 5 of the session)": preds[item].map(lambda v: list(v)[-5:]),
                             "served_grpc top-k": preds["served_grpc"], "offline top-k": preds["offline"]})
        console = ("Served top-k (Triton, raw sessions in, next item ids out):\n" + last.head(4).to_string()
                   + f"\n{summary['model']} test recall@{k} {m[f'recall@{k}']:.4f}, ndcg@{k} {m[f'ndcg@{k}']:.4f}; "
                   "served top-k == offline")
        return ServedReport(preds, artifact,
                            "Raw sessions sent to Triton (their last 4 events; timestamps not shown) and the top-k "
                            "item ids: served over HTTP, over gRPC and offline (one list where the three agree; "
                            "first 4 shown)", console)
