"""Stage 5 (classical retrieval: ``ease``, ``item_knn``) -- item-item weights + user histories -> a top-k Triton model.

A version directory (served by the one top-k ``model.py``, spec.json ``kind: classical``)::

    <N>/topk/spec.json          kind, k, request_columns ([user id]), user/item columns, the model's spec
    <N>/topk/items.npz          the catalogue's raw item ids in training-popularity order + their popularity
    <N>/topk/weights.npy|.npz   the item-item weights (EASE dense, item_knn scipy.sparse)
    <N>/topk/mlp.npz            or an autoencoder's layers (mult_dae / mult_vae; a numpy forward pass, no TensorFlow)
    <N>/topk/seen.npz           each training user's positive items (:func:`~pipeline_lib.export.topk.write_seen`):
                                the user's history that is scored, and the items never returned (``exclude_seen``)

A request is the user id column (+ the optional ``exclude_item_ids`` list). A known user's history row is
scored through the weights (``scores = history @ W``, float64), the user's training items (``exclude_seen``) and
the row's ``exclude_item_ids`` are masked, ties go to the more popular item, and the k best ids and their scores
come back. An unknown user gets the most popular items (score = training users of the item), with the row's
exclusions. A row with fewer than k items left is padded with :func:`pad_id` (-1, or "" for string ids) at score
-inf: an excluded item is never returned. This is, item for item, the computation of the baselines' top-k protocol
(:class:`pipeline_lib.models.baselines.TopKProtocol`) that scored the model in training.

There is no workflow to run (the request is the raw user id), so there is no compiled transform either.

User-id requests from the feature store (``features.enabled``; docs/serving.md "User-id requests"): the version
also keeps a feature snapshot (``<N>/topk/features/``, :func:`pipeline_lib.features.classical.write_classical_snapshot`,
written by the family after export) whose user rows hold
:data:`HISTORY_INPUT`, each user's positive items of train + validation (the row ``seen.npz`` holds, the history
the test-time evaluation scores from), plus a two-stage version's ranker user/context columns. The version then
takes :data:`HISTORY_INPUT` as an optional list input: a request that carries it is scored from it (and excludes
it), a request without it gets it looked up by user id in the store
(:class:`pipeline_lib.features.lookup.UserLookup`, the same lookup as the deep top-k versions), with the ranker's
user features. Without a snapshot the history comes from ``seen.npz`` as before.
"""
from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pipeline_lib.export.staging import ExportOptions, StagedVersion
from pipeline_lib.export.topk import (EXCLUDE_INPUT, SEEN_FILE, RequestInput, TopKExport, TopKRecommender,
                                      TopKRoute, TopKSettings, check_version, decode_ids, fresh_artifact_dir,
                                      arrays_to_frame, request_columns, request_inputs, rerank, seen_frame,
                                      stage_version, write_seen)
from pipeline_lib.etl.fast_transform import Unsupported
from pipeline_lib.etl.workflow import history_column, load_workflow
from pipeline_lib.models import classical, retrieval
from pipeline_lib.models.common import load_encoder
from pipeline_lib.models.baselines import DEFAULT_BLOCK_ELEMENTS, mask_rows, topk_indices

HISTORY_INPUT = "history_item_ids"  # optional list input: the user's positive items (train + validation)
NO_TRANSFORM = {"enabled": False, "reason": "classical model: the request is the raw user id, no workflow to compile"}


@dataclass(frozen=True)
class ClassicalSpec:
    """The columns of a classical version: the query is the user id alone."""

    user_id: str
    item_id: str

    @property
    def query_columns(self) -> list[str]:
        return [self.user_id]


def pad_id(item_ids: np.ndarray):
    """The id that fills a row with fewer than k returnable items: "" for string ids, -1 otherwise."""
    return "" if item_ids.dtype.kind in "OUS" else -1


class ClassicalRecommender(TopKRoute):
    """ease / item_knn / mult_dae / mult_vae: raw user ids (+ ``exclude_item_ids``) -> top-k item ids and scores."""

    kind = "classical"

    def __init__(self, artifact_dir: Path):
        super().__init__(artifact_dir)
        m = self.meta
        self.spec = ClassicalSpec(m["user_id"], m["item_id"])
        self.user_column: str = m["user_id"]
        self.exclude_seen = bool(m.get("exclude_seen", True))
        self.history_input: Optional[str] = m.get("history_input")  # set when the version keeps a feature snapshot
        self.weights = classical.load_weights(self.dir)
        z = np.load(self.dir / SEEN_FILE, allow_pickle=True)
        self.seen_users = pd.Index(z["users"])
        self.seen_indptr, self.seen_indices = z["indptr"].astype(np.int64), z["indices"].astype(np.int64)
        # users per item of the version's history (= items.npz's training popularity without a history)
        self.popularity = np.bincount(self.seen_indices, minlength=len(self.item_ids)).astype(np.float64)
        self.ranker_columns: Optional[list[str]] = m.get("ranker_columns")
        self.candidates: int = m.get("candidates", self.k)
        self.ranker_fn = None
        if self.ranker_columns:  # two-stage: the run's workflow + ranking model re-score the candidates
            import nvtabular as nvt

            self.label = m["label"]
            self.workflow_with_label = nvt.Workflow.load(str(self.dir / "workflow"))
            self.workflow = self.workflow_with_label.remove_inputs([self.label])
            self.workflow_inputs = list(self.workflow.input_schema.column_names)
            self.ranker_fn = load_encoder(self.dir / "ranker")
            self.item_features = pd.read_parquet(self.dir / "item_features.parquet").set_index(m["item_id"], drop=False)

    def compile_fast(self):
        return None

    def recommend_columns(self, cols: dict) -> tuple[np.ndarray, np.ndarray]:
        raise Unsupported("a classical version has no compiled transform")

    @property
    def lookup_columns(self) -> list[str]:
        """The request columns + the history list input (looked up in the store when a request leaves it out)."""
        return self.request_columns + ([self.history_input] if self.history_input else [])

    def recommend_tensors(self, arrays: dict[str, np.ndarray], ragged: set[str]) -> tuple[np.ndarray, np.ndarray]:
        """Checked request tensors -> top-k (with the request's history list when it carries one)."""
        extra = [c for c in (self.history_input, EXCLUDE_INPUT) if c and c in ragged]
        return self.recommend(arrays_to_frame(arrays, self.request_columns + extra, ragged))

    def history(self, users, lists: Optional[list] = None) -> tuple[sp.csr_matrix, np.ndarray]:
        """The binary history rows [n, catalogue] of raw ``users`` (their ``seen.npz`` rows: train + validation
        positives; empty for unknown users) or, given, of the raw item id ``lists`` (one per row: a user-id
        request's history from the store); and which rows are known users (a non-empty row)."""
        if lists is not None:
            return self._rows_of(lists)
        pos = self.seen_users.get_indexer(decode_ids(np.asarray(users)))
        known = pos >= 0
        p = np.where(known, pos, 0)
        starts, ends = self.seen_indptr[p], np.where(known, self.seen_indptr[p + 1], self.seen_indptr[p])
        lens = ends - starts
        indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        take = np.concatenate([np.arange(s, e) for s, e in zip(starts, ends)]) if lens.sum() else np.zeros(0, np.int64)
        rows = sp.csr_matrix((np.ones(len(take)), self.seen_indices[take], indptr), shape=(len(pos), len(self.item_ids)))
        return rows, known

    def _rows_of(self, lists: list) -> tuple[sp.csr_matrix, np.ndarray]:
        """Binary catalogue rows of raw item id lists (ids outside the catalogue and repeats ignored)."""
        rows = [np.unique(self.catalogue_rows(h)) for h in lists]
        lens = np.array([len(r) for r in rows], dtype=np.int64)
        indptr = np.concatenate([[0], np.cumsum(lens)]).astype(np.int64)
        indices = np.concatenate(rows).astype(np.int64) if lens.sum() else np.zeros(0, np.int64)
        hist = sp.csr_matrix((np.ones(len(indices)), indices, indptr), shape=(len(rows), len(self.item_ids)))
        return hist, lens > 0

    def top_k(self, users, extra: Optional[list], n: Optional[int] = None, lists: Optional[list] = None
              ) -> tuple[np.ndarray, np.ndarray]:
        """Raw ids and scores [rows, k] for raw ``users`` and their ``exclude_item_ids`` (``extra``, or None), a
        block of rows at a time (a dense rows x catalogue float64 block of at most ``DEFAULT_BLOCK_ELEMENTS``).
        ``lists``: each row's history (raw item ids) instead of the users' ``seen.npz`` rows."""
        users, n = np.asarray(users), n or self.k
        step = max(1, DEFAULT_BLOCK_ELEMENTS // max(1, len(self.item_ids)))
        if len(users) <= step:
            return self._top_k(users, extra, n, lists)
        parts = [self._top_k(users[i:i + step], extra[i:i + step] if extra is not None else None, n,
                             lists[i:i + step] if lists is not None else None)
                 for i in range(0, len(users), step)]
        return np.concatenate([p[0] for p in parts]), np.concatenate([p[1] for p in parts])

    def _top_k(self, users: np.ndarray, extra: Optional[list], n: int, lists: Optional[list] = None
               ) -> tuple[np.ndarray, np.ndarray]:
        hist, known = self.history(users, lists)
        s = classical.scores(hist, self.weights)
        s[~known] = self.popularity          # unknown users: the most popular items (same order as a zero row)
        seen = [hist.indices[hist.indptr[i]:hist.indptr[i + 1]] for i in range(hist.shape[0])] \
            if self.exclude_seen else None
        mask_rows(s, self.exclude_rows(seen, extra, len(known)), -np.inf)
        idx = topk_indices(s, n)
        found = idx >= 0
        scores = np.where(found, np.take_along_axis(s, np.where(found, idx, 0), axis=1), -np.inf).astype(np.float32)
        ids = self.item_ids[np.where(found, idx, 0)]
        ids = np.where(found, ids, pad_id(self.item_ids)).astype(self.item_ids.dtype)
        return ids, scores

    def retrieve(self, raw: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """The classical top-k (the ``candidates`` of a two-stage version): raw ids and scores."""
        if self.user_column not in raw.columns:
            raise KeyError(f"request lacks the user id column '{self.user_column}'")
        n = self.candidates if self.ranker_fn else self.k
        lists = raw[self.history_input].tolist() if self.history_input and self.history_input in raw.columns else None
        return self.top_k(raw[self.user_column].to_numpy(), self.extra_of(raw), n, lists)

    def recommend(self, raw: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        ids, scores = self.retrieve(raw)
        if not self.ranker_fn:
            return ids, scores
        from merlin.io import Dataset

        frame, pad = self._rank_frame(raw, ids)
        rows = Dataset(frame[self.ranker_columns].reset_index(drop=True), cpu=True)
        transformed = self.workflow.transform(rows).to_ddf().compute()
        return self._reranked(ids, retrieval.encode(self.ranker_fn, transformed), pad)

    def offline(self, raw: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """The training-time scorer (:func:`pipeline_lib.models.classical.scores` over the user's training row, the
        protocol's masking and top-k); a two-stage version's candidates then go through the ranking pipeline's
        offline path (:func:`pipeline_lib.export.ranking.offline_scores`)."""
        ids, scores = self.retrieve(raw)
        if not self.ranker_fn:
            return ids, scores
        frame, pad = self._rank_frame(raw, ids)
        from pipeline_lib.export import ranking as ranking_export  # TensorFlow: two-stage versions only

        rank = ranking_export.offline_scores(self.workflow_with_label, self.dir / "ranker", frame[self.ranker_columns],
                                             self.label, encoder=self.ranker_fn)
        return self._reranked(ids, rank, pad)

    def _rank_frame(self, raw: pd.DataFrame, ids: np.ndarray) -> tuple[pd.DataFrame, np.ndarray]:
        """The ranker's rows of each (request row, candidate) and which candidates are padding (scored -inf)."""
        pad = ids == pad_id(self.item_ids)
        return TopKRecommender.rank_frame(self, raw,  # type: ignore[arg-type]  # shares its item-feature join
                                           np.where(pad, self.item_ids[0], ids)), pad

    def _reranked(self, ids: np.ndarray, rank: np.ndarray, pad: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        rank = np.asarray(rank, dtype=np.float32).reshape(ids.shape)
        return rerank(ids, np.where(pad, -np.inf, rank).astype(np.float32), self.k)


def export_classical(model_dir: Path, raw_train: Path, sample_raw: pd.DataFrame, settings: TopKSettings,
                     staging_dir: Path, model_name: str, options: Optional[ExportOptions] = None,
                     workflow_dir: Optional[Path] = None, raw_history: Optional[Path] = None,
                     features: bool = False) -> TopKExport:
    """Write a classical top-k version into ``staging_dir/<model_name>/1`` and check its in-process answers on
    ``sample_raw`` (and the same rows with an ``exclude_item_ids`` list each) against the offline path.
    ``settings.ranker_dir`` (two-stage): the ranking model trained on the run's ETL output (``workflow_dir``)
    re-scores ``settings.candidates`` classical candidates per row. ``features`` (``features.enabled``): the
    version takes the optional :data:`HISTORY_INPUT` list (the snapshot that fills it for user-id requests:
    :func:`pipeline_lib.features.classical.write_classical_snapshot`); the rows answered from that list must equal
    the rows answered from ``seen.npz``."""
    o, c = options or ExportOptions(), settings.columns
    if settings.ranker_dir is not None and workflow_dir is None:
        raise ValueError("a two-stage classical version needs the run's workflow (workflow_dir)")
    art = fresh_artifact_dir(staging_dir / model_name / "1")
    model_dir = Path(model_dir)
    for f in (classical.ITEMS_FILE, classical.DENSE_WEIGHTS, classical.SPARSE_WEIGHTS, classical.MLP_WEIGHTS):
        if (model_dir / f).is_file():
            shutil.copyfile(model_dir / f, art / f)
    model_spec = json.loads((model_dir / classical.SPEC_FILE).read_text())
    ids, _ = classical.load_items(model_dir)
    train_raw = pd.read_parquet(raw_train)
    item_side = [c.item_id] + [f.name for f in c.features if f.side.value == "item"]
    ranker_columns = list(c.serving_columns) if settings.ranker_dir else None
    hist = history_column(c)
    if ranker_columns is not None and workflow_dir is not None and hist not in ranker_columns \
            and hist in load_workflow(workflow_dir).input_schema.column_names:
        ranker_columns.append(hist)  # the run's ETL has the user-history feature (a history-reading candidate)
    meta = {"kind": ClassicalRecommender.kind, "model": model_spec, "k": settings.k,
            "request_columns": request_columns(ClassicalSpec(c.user_id, c.item_id),  # type: ignore[arg-type]
                                               ranker_columns, item_side),
            "user_id": c.user_id, "item_id": c.item_id, "label": c.label, "exclude_seen": bool(settings.exclude_seen),
            "unknown_users": "popular", "n_items": int(len(ids)), "item_id_dtype": str(ids.dtype),
            "pad_id": pad_id(ids), "fast_transform": NO_TRANSFORM, "ranker_columns": ranker_columns,
            "candidates": settings.candidates if settings.ranker_dir else settings.k,
            "history_input": HISTORY_INPUT if features else None}
    if settings.ranker_dir is not None:
        if workflow_dir is None:
            raise ValueError("a two-stage classical version needs the run's fitted workflow (workflow_dir)")
        shutil.copytree(settings.ranker_dir, art / "ranker")
        shutil.copytree(workflow_dir, art / "workflow")
        spec = retrieval.RetrievalSpec("classical", c.item_id, [c.user_id], [x for x in item_side if x in train_raw])
        retrieval.catalogue(train_raw, spec).to_parquet(art / "item_features.parquet", index=False)
    # the users' history (scored through the weights, excluded) and the popularity: train [+ validation]
    meta["seen"] = write_seen(seen_frame(train_raw, raw_history), c.user_id, c.item_id, c.label, ids, art / SEEN_FILE)
    (art / "spec.json").write_text(json.dumps(meta, indent=2, default=str))
    rec = ClassicalRecommender(art)
    sample = sample_raw[meta["request_columns"]].reset_index(drop=True)
    excl = sample.assign(**{EXCLUDE_INPUT: [list(ids[i % len(ids):i % len(ids) + 3]) for i in range(len(sample))]})
    samples, known = [sample, excl], {}
    if features:  # the history sent as a list (what a user-id request gets from the store) == seen.npz's rows
        samples.append(sample.assign(**{HISTORY_INPUT: seen_lists(rec, sample[c.user_id])}))
        known[2] = rec.offline(sample)
    diff, _ = check_version(rec, samples, [], o.atol, fast_transform=False, offline=known)
    if rec.ranker_fn is not None:  # typed as the workflow reads them
        inputs = request_inputs(rec.workflow.input_schema, meta["request_columns"], c.item_id,
                                [hist] if hist in meta["request_columns"] else [])
    else:
        inputs = [RequestInput(c.user_id, train_raw[c.user_id].dtype, False),
                  RequestInput(EXCLUDE_INPUT, train_raw[c.item_id].dtype, True)]
    if features:
        inputs.insert(-1, RequestInput(HISTORY_INPUT, train_raw[c.item_id].dtype, True))
    return stage_version(rec, meta, inputs, StagedVersion(staging_dir, model_name, 1), o,
                         {"max_abs_score_diff": diff, "rows": len(sample), "ann": None})


def seen_lists(rec: ClassicalRecommender, users) -> list[list]:
    """The raw item ids of each user's ``seen.npz`` row (train + validation positives; [] for unknown users)."""
    hist, _ = rec.history(np.asarray(users))
    return [rec.item_ids[hist.indices[hist.indptr[i]:hist.indptr[i + 1]]].tolist() for i in range(hist.shape[0])]
