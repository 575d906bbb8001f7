"""Retrieval and two-stage: top-k items per raw query row (two-tower, YouTube DNN, MF; optionally
re-ranked by a ranking model trained on the same ETL output), and the classical ease / item_knn
(closed form on the raw training positives, served by user id; :mod:`pipeline_lib.models.classical`) and the
autoencoders mult_dae / mult_vae (trained on the same raw positives, served the same way).

The same raw data, validation and ETL as ranking, with one rule of its own: YouTube DNN reads the
user's recent positive items, so its ETL adds that list feature and requests carry it.
Export writes a top-k version (query encoder + item embeddings [+ FAISS index] [+ ranker]); the gate
and the smoke test compare what versions *return* (ids in order, scores).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional, cast

import pandas as pd

from pipeline_lib.etl import workflow as etl
from pipeline_lib.export import ranking as export
from pipeline_lib.export import topk
from pipeline_lib.export.classical import ClassicalRecommender, export_classical
from pipeline_lib.families.base import TaskFamily, Trained
from pipeline_lib.features.classical import write_classical_snapshot
from pipeline_lib.features.serving import allow_user_id_requests
from pipeline_lib.features.snapshot import (has_snapshot, offline_rows, stored_users, unknown_id,
                                            write_snapshot)
from pipeline_lib.features.store import StoreSettings, materialize, write_pointer
from pipeline_lib.families.ranking import RankingFamily
from pipeline_lib.models import ranking as ranking_model
from pipeline_lib.models import classical, evaluation, retrieval
from pipeline_lib.paths import RunPaths
from pipeline_lib.release import gate, smoke
from pipeline_lib.release.smoke import UserRequests


class RetrievalFamily(RankingFamily):
    name = "retrieval"

    @property
    def history_length(self) -> int:
        """YouTube DNN (and two_tower with ``retrieval.query_history``) reads the user's recent positive items: the
        ETL adds that list feature (also when such a model is one of the run's candidates: one ETL output serves
        them all)."""
        r = self.cfg.model.retrieval
        from pipeline_lib.families.candidates import candidate_run_config

        models = [self.cfg.model] + [candidate_run_config(self.cfg, c).model for c in self.cfg.candidates or []]
        reads = any(m.type == "youtube_dnn" or (m.type == "two_tower" and m.retrieval.query_history) for m in models)
        return r.history_length if reads else 0

    @property
    def history_stats(self) -> bool:
        """The numeric history features (``etl.history``) are ranking features: not added to retrieval runs."""
        return False

    @property
    def selection_metric(self) -> str:
        """Per-user recall@k with seen items excluded (the baselines' protocol)."""
        return f"user_recall@{self.cfg.model.retrieval.k}"

    latency_probe = TaskFamily.latency_probe  # the staged top-k version's recommender, not the ranking path

    def fit(self, paths: RunPaths, etl_out: etl.EtlOutput) -> Any:
        cfg = self.cfg
        if cfg.model.scores_history:  # on the raw training positives (the ETL output is not read)
            return classical.train(etl_out.split.train, etl_out.split.valid, cfg.columns, cfg.model, paths.model,
                                   cfg.seed)
        return retrieval.train(etl_out.workflow_dir, etl_out.train_dir, etl_out.split.train, etl_out.split.valid,
                               cfg.columns, cfg.model, cfg.seed, paths.model)

    def train(self, paths: RunPaths, etl_out: etl.EtlOutput) -> Trained:
        """The model (fitted and early-stopped on train / validation), then it and the baselines on the test
        split with the validation positives as the users' history besides train (they precede the test
        period: scored from and excluded, as the served version does; docs/evaluation.md)."""
        model = self.fit(paths, etl_out)
        s = etl_out.split
        baselines = evaluation.compare_with_baselines(self.cfg, s.train, s.test, model, etl_out.workflow_dir,
                                                      valid_path=s.valid)
        return Trained(model, baselines)

    @property
    def has_ranker(self) -> bool:
        return bool(self.cfg.model.retrieval.rerank_with)

    def train_ranker(self, paths: RunPaths, etl_out: etl.EtlOutput) -> ranking_model.TrainOutput:
        """Two-stage: the ranking model that re-scores the retrieved candidates (same ETL output)."""
        cfg = self.cfg
        ranker_cfg = cfg.model.model_copy(update={"type": cfg.model.retrieval.rerank_with})
        return ranking_model.train(etl_out.train_dir, etl_out.valid_dir, ranker_cfg, cfg.columns.label, cfg.seed,
                                   paths.model / "ranker")

    def learning_curves(self, trained: Trained) -> list[tuple[str, Optional[Path]]]:
        curves = super().learning_curves(trained)
        if trained.ranker is not None:
            curves.append((f"re-ranker {self.cfg.model.retrieval.rerank_with}", trained.ranker.metrics_path))
        return curves

    def smoke_rows(self, etl_out: etl.EtlOutput, n: int) -> pd.DataFrame:
        """``n`` held-out requests of ``n`` different users (a top-k answer is per user: the first rows of a split by
        time are often one user's)."""
        df = pd.read_parquet(etl_out.split.valid)
        uid = self.cfg.columns.user_id
        df = df.drop_duplicates(uid) if uid in df.columns else df
        return df.head(n)[self.request_columns()].reset_index(drop=True)

    def export(self, paths: RunPaths, etl_out: etl.EtlOutput, trained: Trained) -> topk.TopKExport:
        cfg = self.cfg
        ranker_dir = trained.ranker.model_dir if trained.ranker is not None else None
        if cfg.model.scores_history:
            staged = export_classical(trained.model.model_dir, etl_out.split.train,
                                      self.smoke_rows(etl_out, cfg.export.parity_rows),
                                      topk.TopKSettings.from_config(cfg, ranker_dir), paths.ensemble,
                                      cfg.export.model_name,
                                      export.ExportOptions.from_config(cfg, self.run_info(paths, trained)),
                                      etl_out.workflow_dir, raw_history=etl_out.split.valid,
                                      features=cfg.features.enabled)
            if cfg.features.enabled:  # the users' train + validation positives (+ a ranker's user features)
                write_classical_snapshot(staged, etl_out.split.train, etl_out.split.valid, cfg.columns,
                                         self.history_length)
            return staged
        exp = topk.export_topk(etl_out.workflow_dir, trained.model.model_dir, etl_out.split.train,
                               self.smoke_rows(etl_out, cfg.export.parity_rows),
                               topk.TopKSettings.from_config(cfg, ranker_dir), paths.ensemble, cfg.export.model_name,
                               export.ExportOptions.from_config(cfg, self.run_info(paths, trained)),
                               raw_history=etl_out.split.valid)
        if cfg.features.enabled:
            self.write_features(etl_out, exp)
        return exp

    def write_features(self, etl_out: etl.EtlOutput, exp: topk.TopKExport) -> None:
        """The version's feature snapshot (user features, recent items, item features) and user-id requests in its
        config.pbtxt (pipeline_lib/features/)."""
        cols, rec = self.cfg.columns, cast(topk.TopKRecommender, exp.open(topk.TopKRecommender))
        item_side = [cols.item_id] + [f.name for f in cols.features if f.side.value == "item"]
        write_snapshot(rec.dir, pd.read_parquet(etl_out.split.train), rec.request_columns, item_side, cols,
                       rec.spec.history, self.history_length)
        allow_user_id_requests(exp.config_path, cols.user_id)

    @property
    def recommender(self) -> type[topk.TopKRoute]:
        """The recommender class of this run's versions (deep: query encoder + embeddings; classical: weights)."""
        return ClassicalRecommender if self.cfg.model.scores_history else topk.TopKRecommender

    def offline_reference(self, etl_out: etl.EtlOutput, exp: topk.TopKExport, rows: pd.DataFrame) -> Any:
        """The version's own recommender (the one export checked) on the offline path (workflow.transform
        + encoders + exact search)."""
        return exp.open(self.recommender).offline(rows)

    def smoke(self, paths: RunPaths, etl_out: etl.EtlOutput, exp: topk.TopKExport) -> Any:
        """Only the version's request columns are sent (and compared)."""
        rec = exp.open(self.recommender)
        rows = self.smoke_rows(etl_out, self.cfg.serving.smoke_rows)[rec.request_columns]
        return self.serve_and_compare(paths, exp, rows, rec.offline(rows), self.user_requests(paths, exp, rec))

    def user_requests(self, paths: RunPaths, exp: topk.TopKExport, rec: topk.TopKRoute
                      ) -> Optional[UserRequests]:
        """With a feature snapshot: the staged version gets its own SQLite store (the candidate's snapshot) and
        the smoke test asks 8 of its users by id, plus one id the store does not know (cold start)."""
        if not has_snapshot(rec.dir):
            return None
        uid = self.cfg.columns.user_id
        settings = StoreSettings(paths.serving / "feature_store" / exp.model_name)
        materialize(settings, rec.dir, exp.version)
        write_pointer(exp.version_dir.parent, settings)
        known = stored_users(rec.dir, 8)
        ids = known + [unknown_id(known)]
        # the offline answer of the users' rows; a classical version's history not from the snapshot but from the
        # training data (seen.npz: train + validation), as the offline evaluation scores it
        full = offline_rows(rec.dir, ids)[rec.request_columns]
        return UserRequests(ids, uid, rec.offline(full), [False] * len(known) + [True])

    def serve_and_compare(self, paths: RunPaths, exp: topk.TopKExport, rows: pd.DataFrame, offline: Any,
                          user_requests: Optional[UserRequests] = None) -> Any:
        s = self.cfg.serving
        return smoke.smoke_test_topk(exp.staged_repository, exp.model_name, rows, offline, s.smoke_atol,
                                     paths.serving, s.startup_timeout_s, user_requests)

    def gate_scorer(self, etl_out: etl.EtlOutput, exp: Optional[topk.TopKExport] = None) -> gate.Scorer:
        """Recall/NDCG/... of what a version returns; the candidate through the recommender export checked."""
        raw, label = self.gate_rows(etl_out), self.cfg.columns.label
        return gate.Scorer(lambda version_dir: gate.score_topk_version(
            version_dir, raw, label, rec=topk.loaded_recommender(exp, version_dir)), len(raw))

    def headline_metrics(self, trained: Trained) -> dict:
        """Per-user recall/NDCG@k on the test split (the baselines' protocol: one query per user, the
        user's training positives excluded, the whole catalogue); the per-query figures are validation."""
        t, k = trained.baselines.model, self.cfg.model.retrieval.k
        out = {key: t[key] for key in (f"recall@{k}", f"ndcg@{k}") if key in t}
        out.update(n_train=trained.model.metrics["n_train"], n_test_users=t.get("n_users"))
        return out

    def validation_metrics(self, trained: Trained) -> dict:
        """The model's per-query figures on the validation split (one query per positive row, nothing
        excluded: the early-stopping protocol), and the re-ranker's validation AUC."""
        m, k = trained.model.metrics, self.cfg.model.retrieval.k
        per_query = not self.cfg.model.scores_history  # a history-scored model's figures are per user only
        out = {f"per_query_{name}@{k}": m[name] for name in ("recall", "precision", "ndcg", "mrr") if per_query and name in m}
        out.update({key: m[key] for key in (f"user_recall@{k}", f"user_ndcg@{k}") if key in m})
        out.update(n_queries=m.get("n_queries"))
        if trained.ranker is not None:
            out.update({f"ranker_{name}": trained.ranker.metrics[name] for name in ("auc", "logloss")})
        return out

    def summary_fields(self, trained: Trained, exp: topk.TopKExport) -> dict:
        # exact or FAISS top-k, and the index's recall measured at export (docs/ann.md)
        return super().summary_fields(trained, exp) | {"ann": exp.parity.get("ann")}
