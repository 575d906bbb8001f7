"""Ranking: click models (DLRM, DCN-v2, DeepFM, Wide&Deep) scoring raw interaction rows.

raw interactions -> validated -> NVTabular (split by time, fitted workflow) -> [tune] -> model +
baselines (logistic regression, item click rate) -> merlin-systems ensemble (workflow + model) ->
gate on AUC / log loss -> served scores == offline scores.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional

import pandas as pd

from pipeline_lib.data import sources as data
from pipeline_lib.etl import history as user_history
from pipeline_lib.etl import workflow as etl
from pipeline_lib.etl.workflow import EtlOutput  # by name: the methods etl/export shadow the modules in the class
from pipeline_lib.export import ranking as export
from pipeline_lib.export.ranking import ExportOutput
from pipeline_lib.families.base import SCORE, ServedReport, TaskFamily, Trained
from pipeline_lib.features.serving import allow_user_id_requests
from pipeline_lib.features.snapshot import (has_snapshot, offline_pairs, stored_items, stored_users, unknown_id,
                                            write_snapshot)
from pipeline_lib.features.store import StoreSettings, materialize, write_pointer
from pipeline_lib.models import evaluation, tune
from pipeline_lib.models import ranking as ranking_model
from pipeline_lib.models.common import load_encoder
from pipeline_lib.paths import RunPaths
from pipeline_lib import report
from pipeline_lib.release import gate, smoke
from pipeline_lib.release.smoke import UserRequests
from pipeline_lib.validate import data as validate


log = logging.getLogger(__name__)


class RankingFamily(TaskFamily):
    name = "ranking"

    def raw_data(self, paths: RunPaths) -> Path:
        raw = data.write_raw(self.cfg.data, self.cfg.seed, paths.raw, self.cfg.columns)
        if self.cfg.online.retrain_on_feedback:  # the log plus what was shown since, labelled by feedback
            from pipeline_lib.online.retrain import append_feedback

            added = append_feedback(raw, self.cfg)
            log.info("online.retrain_on_feedback: %d shown items added (%d clicked, %d of unknown users/items left "
                     "out) since %s", added.rows, added.clicks, added.unknown, added.since or "the start")
        return raw

    def check_raw(self, paths: RunPaths, raw_path: Path) -> tuple[Path, list[str]]:
        checked = validate.validate_raw(raw_path, self.cfg.columns, self.cfg.validation)
        paths.validated.mkdir(parents=True, exist_ok=True)
        return checked.save(paths.validated / "stats.json"), list(checked.warnings)

    # -- ETL: the rules of this family --------------------------------------------------------------
    @property
    def history_length(self) -> int:
        """Length of the user's recent-positive-items list the ETL adds (0: none; ``etl.history.max_items``
        with ``etl.history.enabled``; see RetrievalFamily)."""
        h = self.cfg.etl.history
        return h.max_items if h.enabled else 0

    @property
    def history_stats(self) -> bool:
        """Whether the ETL adds the numeric user-history features (``etl.history``, pipeline_lib/etl/history.py)."""
        return self.cfg.etl.history.enabled

    def request_columns(self) -> list[str]:
        """Raw columns of one request: the serving columns, plus the history features when the ETL adds them."""
        hist = [etl.history_column(self.cfg.columns)] if self.history_length else []
        stats = list(user_history.NUMERIC) if self.history_stats else []
        return self.cfg.columns.serving_columns + stats + hist

    def etl_inputs(self) -> dict:
        cfg = self.cfg
        return {"config": cfg.model_dump(mode="json", include={"seed", "columns", "split", "etl"},
                                         exclude={"etl": {"dask"}}),
                "history": self.history_length}

    def etl(self, paths: RunPaths, raw_path: Path) -> EtlOutput:
        cfg, hist = self.cfg, self.history_length
        stats = self.history_stats
        split = etl.split_raw(raw_path, cfg.split, cfg.columns, cfg.seed, paths.split, history_length=hist,
                              history_stats=stats)
        return etl.fit_transform(cfg.columns, cfg.etl, split, paths.transformed, history=bool(hist),
                                 history_stats=stats)

    # -- model ------------------------------------------------------------------------------------
    @property
    def tunable(self) -> bool:
        return self.cfg.tune.enabled

    def tune(self, paths: RunPaths, etl_out: EtlOutput) -> tune.TuneResult:
        return tune.run_study(self.cfg, etl_out, paths.root / "tune")

    def fit(self, paths: RunPaths, etl_out: EtlOutput) -> Any:
        """The model alone (no baselines)."""
        cfg = self.cfg
        return ranking_model.train(etl_out.train_dir, etl_out.valid_dir, cfg.model, cfg.columns.label, cfg.seed,
                                   paths.model)

    def train(self, paths: RunPaths, etl_out: EtlOutput) -> Trained:
        model = self.fit(paths, etl_out)
        baselines = evaluation.compare_with_baselines(self.cfg, etl_out.split.train, etl_out.split.test, model,
                                                      etl_out.workflow_dir)
        return Trained(model, baselines)

    @property
    def selection_metric(self) -> str:
        return "auc"

    def latency_probe(self, paths: RunPaths, etl_out: EtlOutput, trained: Trained) -> Any:
        """The training-time path (workflow transform + SavedModel), both loaded once."""
        workflow, model_dir = etl.load_workflow(etl_out.workflow_dir), trained.model.model_dir
        encoder, label = load_encoder(model_dir), self.cfg.columns.label
        return lambda rows: export.offline_scores(workflow, model_dir, rows, label, encoder=encoder)

    # -- export and smoke test ----------------------------------------------------------------------
    def export(self, paths: RunPaths, etl_out: EtlOutput, trained: Trained) -> ExportOutput:
        cfg = self.cfg
        exp = export.export_ensemble(etl_out.workflow_dir, trained.model.model_dir,
                                     self.smoke_rows(etl_out, cfg.export.parity_rows), cfg.columns.label,
                                     paths.ensemble, cfg.export.model_name, 1,
                                     export.ExportOptions.from_config(cfg, self.run_info(paths, trained)))
        if cfg.features.enabled:
            self.keep_features(etl_out, exp)
        return exp

    def item_columns(self) -> list[str]:
        """The item id and the item-side features: stored per item, looked up by item id."""
        cols = self.cfg.columns
        return [cols.item_id] + [f.name for f in cols.features if f.side.value == "item"]

    def keep_features(self, etl_out: EtlOutput, exp: ExportOutput) -> None:
        """The version's feature snapshot in ``<N>/ensemble/features/`` (each training user's user and context
        columns as on the latest training row, ``etl.history`` features and recent items as the next row's; the
        item features) and user-id requests in its
        config.pbtxt (``user_id`` + ``item_id`` required, every other input optional, ``cold_start`` out)."""
        cols, items = self.cfg.columns, self.item_columns()
        user_side = [c for c in self.request_columns() if c not in items]
        hist = etl.history_column(cols) if self.history_length else None
        train = pd.read_parquet(etl_out.split.train)
        stats = user_history.next_row_history(train, cols) if self.history_stats else None
        write_snapshot(exp.version_dir / export.ENSEMBLE_SUBDIR, train, user_side, items, cols, hist,
                       self.history_length, stats)
        allow_user_id_requests(exp.config_path, cols.user_id, (cols.item_id,))

    def smoke_rows(self, etl_out: EtlOutput, n: int) -> pd.DataFrame:
        df = pd.read_parquet(etl_out.split.valid).head(n)
        return df[self.request_columns()].reset_index(drop=True)

    def offline_reference(self, etl_out: EtlOutput, exp: ExportOutput, rows: pd.DataFrame) -> Any:
        return export.offline_scores(etl.load_workflow(etl_out.workflow_dir),
                                     exp.version_dir / export.ENSEMBLE_SUBDIR / "model", rows, self.cfg.columns.label)

    def smoke(self, paths: RunPaths, etl_out: EtlOutput, exp: ExportOutput) -> Any:
        rows = self.smoke_rows(etl_out, self.cfg.serving.smoke_rows)
        return self.serve_and_compare(paths, exp, rows, self.offline_reference(etl_out, exp, rows),
                                      self.pair_requests(paths, etl_out, exp))

    def pair_requests(self, paths: RunPaths, etl_out: EtlOutput, exp: ExportOutput) -> Optional[UserRequests]:
        """With a feature snapshot: the staged version gets its own SQLite store (the candidate's snapshot) and the
        smoke test scores 4 of its users and one unknown id against 3 stored items and one unknown item, by ids
        alone; the offline scores are those of the same pairs' full rows read from the training data."""
        art = exp.version_dir / export.ENSEMBLE_SUBDIR
        if not has_snapshot(art):
            return None
        cols = self.cfg.columns
        settings = StoreSettings(paths.serving / "feature_store" / exp.model_name)
        materialize(settings, art, exp.version)
        write_pointer(exp.version_dir.parent, settings)
        users, items = stored_users(art, 4), stored_items(art, 3)
        users, items = users + [unknown_id(users)], items + [unknown_id(items)]
        pairs = [(u, i) for u in users for i in items]
        full = offline_pairs(art, [u for u, _ in pairs], [i for _, i in pairs])
        offline = self.offline_reference(etl_out, exp, full[self.request_columns()])
        return UserRequests([u for u, _ in pairs], cols.user_id, offline, [u == users[-1] for u, _ in pairs],
                            [i for _, i in pairs], cols.item_id)

    def serve_and_compare(self, paths: RunPaths, exp: ExportOutput, rows: pd.DataFrame, offline: Any,
                          user_requests: Optional[UserRequests] = None) -> Any:
        s = self.cfg.serving
        return smoke.smoke_test(exp.staged_repository, exp.model_name, rows, offline, s.smoke_atol, paths.serving,
                                s.startup_timeout_s, user_requests)

    # -- gate and summary -----------------------------------------------------------------------------
    @property
    def gate_metric(self) -> str:
        return self.cfg.gate_metric

    def gate_scorer(self, etl_out: EtlOutput, exp: Optional[ExportOutput] = None) -> gate.Scorer:
        return gate.ranking_scorer(self.gate_rows(etl_out), self.cfg.columns.label)

    def headline_metrics(self, trained: Trained) -> dict:
        """AUC and log loss of the model on the raw test rows (the gate's and the baselines' rows)."""
        t = trained.baselines.model
        return {"auc": t["auc"], "logloss": t["logloss"], "n_train": trained.model.metrics["n_train"],
                "n_test": t["n_test"]}

    def validation_metrics(self, trained: Trained) -> dict:
        return {k: trained.model.metrics[k] for k in ("auc", "logloss", "n_valid") if k in trained.model.metrics}

    def served_report(self, result: Any, rows: pd.DataFrame, summary: dict) -> ServedReport:
        table = result.table(rows)
        figures = ", ".join(f"{k} {report.num(v)}" for k, v in summary["metrics"].items() if isinstance(v, float))
        console = ("Served predictions (Triton, raw rows in, scores out):\n"
                   + pd.DataFrame(report.compact_table(table, max_rows=4, merge=SCORE)).to_string()
                   + f"\n{summary['model']} {summary.get('metrics_split', 'test')} {figures}; "
                   f"max |served - offline| = {result.max_abs_diff:.1e}")
        return ServedReport(table, report.compact_table(table, merge=SCORE),
                            "Raw rows sent to Triton; score: served over HTTP, over gRPC and computed offline (one "
                            "figure where the three agree to 4 significant digits, else HTTP / gRPC / offline)",
                            console)
