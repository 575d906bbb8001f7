"""Classical session recommenders (``session.model.type``: ``session_knn``, ``sequential_rules``).

The session baselines of the literature (Ludewig & Jannach, "Evaluation of session-based
recommendation algorithms", 2018), fitted by counting over the raw training sessions and scored
in numpy (scipy sparse matrices; no TensorFlow, no feature workflow):

- ``session_knn`` (SKNN / V-SKNN): the session's neighbours are the training sessions sharing an
  item with it, limited to the ``sample_size`` most recent of them (by first event); their cosine
  similarity to the session (binary item sets; with ``position_weighting`` the session's items weigh
  linearly from 1/n for the first to 1 for the last, V-SKNN); the ``neighbors`` most similar score
  every item they hold by the sum of their similarities;
- ``sequential_rules`` (SR): a sparse item x item matrix of rules a -> b, b following a within
  ``max_distance`` events of a training session, each occurrence weighted 1/distance; a session
  scores items by the rules of its last item, plus those of its earlier items weighted
  ``recency_decay`` ** (events before the last) when ``recency_decay`` > 0.

Items are the catalogue of the training sessions (raw ids), **ordered by training popularity**
(most frequent first, ties by first appearance): ties in a score row -- every item no neighbour or
rule reaches scores 0 -- go to the lower column of the one masked top-k
(:func:`pipeline_lib.models.retrieval.top_k_scores`), i.e. to the more popular item. A session with
no known item (unseen ids are ignored) therefore gets the most popular items.

Evaluation is the deep session model's protocol (:func:`pipeline_lib.models.session.evaluate`): the
held-out sessions minus their last event, the last item as target, the session's own items excluded
with ``session.exclude_seen``, Merlin's Recall/NDCG/MRR@k of the returned top-k list
(:func:`pipeline_lib.models.session.metrics_from_topk`, which the gate also uses); the most-popular and
co-occurrence baselines come from the deep model's own evaluation code on the same split.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd
from scipy import sparse

from pipeline_lib.config import SessionClassicalConfig, SessionColumns
from pipeline_lib.etl.sessions import prefixes
from pipeline_lib.models.common import TrainOutput, save_metrics

log = logging.getLogger(__name__)

ITEMS_FILE = "items.npz"      # ids (raw, popularity order), popularity; session_knn: session recency
MATRIX_FILE = "matrix.npz"    # scipy sparse: sequential_rules: item x item rules; session_knn: session x item
SPEC_FILE = "spec.json"       # type and options
TYPES = ("session_knn", "sequential_rules")


@dataclass
class ClassicalSessionModel:
    """A fitted classical session model over a catalogue of raw item ids (popularity order)."""

    type: str
    options: SessionClassicalConfig
    item_ids: np.ndarray                 # raw ids, most popular first
    popularity: np.ndarray               # training occurrences per catalogue row
    matrix: sparse.csr_matrix            # rules [items, items] or sessions [sessions, items] (binary)
    recency: Optional[np.ndarray] = None  # session_knn: rank of each training session by start (0 = oldest)
    index: pd.Index = field(init=False, repr=False)

    def __post_init__(self):
        self.index = pd.Index(self.item_ids)
        if self.type == "session_knn":
            self._sessions_of_item = self.matrix.T.tocsr()  # [items, sessions]
            self._session_norm = np.sqrt(np.asarray(self.matrix.sum(axis=1)).ravel()).astype(np.float64)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    def rows_of(self, ids) -> np.ndarray:
        """Catalogue rows of raw item ids in session order (unknown ids and missing lists: dropped)."""
        if ids is None or (isinstance(ids, float) and np.isnan(ids)) or not len(ids):
            return np.zeros(0, dtype=np.int64)
        arr = np.asarray(ids, dtype=object) if self.item_ids.dtype == object else np.asarray(ids)
        if self.item_ids.dtype == object:
            arr = np.array([v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in arr], dtype=object)
        rows = self.index.get_indexer(arr)
        return rows[rows >= 0].astype(np.int64)

    def scores(self, sessions: list) -> np.ndarray:
        """Next-item scores [sessions, catalogue] (float32) of sessions given as raw item id lists."""
        out = np.zeros((len(sessions), self.n_items), dtype=np.float32)
        for i, ids in enumerate(sessions):
            rows = self.rows_of(ids)
            if len(rows):
                out[i] = self.session_knn(rows) if self.type == "session_knn" else self.rules(rows)
        return out

    def rules(self, rows: np.ndarray) -> np.ndarray:
        """SR: the rules of the last item, plus the earlier items' weighted ``recency_decay`` ** steps back."""
        d = self.options.recency_decay
        if d <= 0:
            return self.matrix[rows[-1]].toarray().ravel()
        steps = np.arange(len(rows) - 1, -1, -1)
        weights = np.power(d, steps)
        keep = weights > 1e-6
        q = sparse.csr_matrix((weights[keep], (np.zeros(keep.sum(), dtype=np.int64), rows[keep])),
                              shape=(1, self.n_items))
        return np.asarray((q @ self.matrix).todense()).ravel()

    def session_knn(self, rows: np.ndarray) -> np.ndarray:
        """(V-)SKNN: item scores = sum of the cosine similarities of the k nearest recent training sessions."""
        o = self.options
        assert self.recency is not None, "session_knn holds the training sessions' recency"
        n = len(rows)
        w = np.arange(1, n + 1, dtype=np.float64) / n if o.position_weighting else np.ones(n)
        items, last = np.unique(rows[::-1], return_index=True)  # a repeated item keeps its latest weight
        weights = w[::-1][last]
        sessions, per_item = _gather(self._sessions_of_item, items)
        if not len(sessions):
            return np.zeros(self.n_items, dtype=np.float32)
        cand, inv = np.unique(sessions, return_inverse=True)
        overlap = np.bincount(inv, weights=np.repeat(weights, per_item))
        if len(cand) > o.sample_size:  # the most recent sessions sharing an item
            keep = np.argsort(-self.recency[cand], kind="stable")[: o.sample_size]
            cand, overlap = cand[keep], overlap[keep]
        sim = overlap / (self._session_norm[cand] * np.sqrt(np.sum(weights ** 2)))
        if len(cand) > o.neighbors:  # the most similar; ties: the more recent session
            order = np.lexsort((-self.recency[cand], -sim))[: o.neighbors]
            cand, sim = cand[order], sim[order]
        held, per_session = _gather(self.matrix, cand)
        return np.bincount(held, weights=np.repeat(sim, per_session), minlength=self.n_items).astype(np.float32)

    def top_k(self, sessions: list, k: int, exclude: Optional[list[np.ndarray]] = None
              ) -> tuple[np.ndarray, np.ndarray]:
        """Catalogue rows and scores of the k best items per session, ``exclude``'d rows never returned
        (-inf, last, when a session has fewer than k others); ties to the more popular item."""
        from pipeline_lib.models.retrieval import top_k_scores

        return top_k_scores(self.scores(sessions), k, exclude)

    def save(self, out_dir: Path) -> Path:
        """``items.npz``, ``matrix.npz`` (scipy sparse) and ``spec.json`` in ``out_dir``; returns it."""
        out_dir.mkdir(parents=True, exist_ok=True)
        ids = self.item_ids.astype(object) if self.item_ids.dtype == object else self.item_ids
        extra = {"recency": self.recency} if self.recency is not None else {}
        np.savez(out_dir / ITEMS_FILE, ids=ids, popularity=self.popularity, **extra)
        sparse.save_npz(out_dir / MATRIX_FILE, self.matrix)
        (out_dir / SPEC_FILE).write_text(json.dumps({"type": self.type, "options": self.options.model_dump(),
                                                     "n_items": self.n_items, "matrix_nnz": int(self.matrix.nnz),
                                                     "matrix_shape": list(self.matrix.shape)}, indent=2))
        return out_dir

    @classmethod
    def load(cls, model_dir: Path) -> "ClassicalSessionModel":
        spec = json.loads((Path(model_dir) / SPEC_FILE).read_text())
        items = np.load(Path(model_dir) / ITEMS_FILE, allow_pickle=True)
        recency = items["recency"] if "recency" in items.files else None
        return cls(spec["type"], SessionClassicalConfig(**spec["options"]), items["ids"], items["popularity"],
                   sparse.load_npz(Path(model_dir) / MATRIX_FILE).tocsr(), recency)


def _gather(m: sparse.csr_matrix, rows: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """The column indices of ``rows`` of a CSR matrix, concatenated, and how many each row holds."""
    starts, ends = m.indptr[rows], m.indptr[rows + 1]
    counts = ends - starts
    total = int(counts.sum())
    if not total:
        return np.zeros(0, dtype=np.int64), counts
    offsets = np.repeat(starts - np.concatenate([[0], np.cumsum(counts)[:-1]]), counts)
    return m.indices[offsets + np.arange(total)].astype(np.int64), counts


# --- fitting ------------------------------------------------------------------------------------------


def catalogue(train_lists: pd.Series) -> tuple[np.ndarray, np.ndarray, list[np.ndarray]]:
    """(raw item ids most popular first, their training counts, each session as catalogue rows); ids as
    int64 when every id is an integer, else as strings (the id types of the session top-k versions)."""
    lens = train_lists.map(len).to_numpy()
    flat = np.concatenate([np.asarray(v, dtype=object) for v in train_lists]) if len(lens) else np.zeros(0, object)
    if len(flat) and all(isinstance(v, (int, np.integer)) for v in flat):
        flat = flat.astype(np.int64)
    else:
        flat = np.array([str(v) for v in flat], dtype=object)
    codes, uniques = pd.factorize(flat)  # first-appearance order
    counts = np.bincount(codes, minlength=len(uniques))
    order = np.argsort(-counts, kind="stable")
    rank = np.empty_like(order)
    rank[order] = np.arange(len(order))
    rows = rank[codes].astype(np.int64)
    ids = np.asarray(uniques)[order]
    return ids.astype(object) if ids.dtype.kind in "OUS" else ids, counts[order].astype(np.int64), \
        np.split(rows, np.cumsum(lens)[:-1])


def rules_matrix(sessions: list[np.ndarray], n_items: int, max_distance: int) -> sparse.csr_matrix:
    """rules[a, b] = sum over training sessions of 1/d for every b d <= ``max_distance`` events after a."""
    flat = np.concatenate(sessions) if sessions else np.zeros(0, np.int64)
    sid = np.repeat(np.arange(len(sessions)), [len(s) for s in sessions])
    src, dst, val = [], [], []
    for d in range(1, max_distance + 1):
        same = sid[:-d] == sid[d:]
        if not same.any():
            break
        src.append(flat[:-d][same])
        dst.append(flat[d:][same])
        val.append(np.full(int(same.sum()), 1.0 / d, dtype=np.float32))
    if not src:
        return sparse.csr_matrix((n_items, n_items), dtype=np.float32)
    m = sparse.coo_matrix((np.concatenate(val), (np.concatenate(src), np.concatenate(dst))), shape=(n_items, n_items))
    return m.tocsr().astype(np.float32)  # duplicates summed


def sessions_matrix(sessions: list[np.ndarray], n_items: int) -> sparse.csr_matrix:
    """Binary [training sessions, items]: which items each session holds."""
    flat = np.concatenate(sessions) if sessions else np.zeros(0, np.int64)
    sid = np.repeat(np.arange(len(sessions)), [len(s) for s in sessions])
    m = sparse.coo_matrix((np.ones(len(flat), np.float32), (sid, flat)), shape=(len(sessions), n_items)).tocsr()
    m.data[:] = 1.0  # duplicates summed: back to 0/1
    return m


def fit(train: pd.DataFrame, kind: str, options: SessionClassicalConfig, cols: SessionColumns) -> ClassicalSessionModel:
    """Fit ``kind`` on raw training sessions (one row per session, list columns as the session ETL writes them)."""
    if kind not in TYPES:
        raise ValueError(f"session.model.type '{kind}' is not a classical session type ({', '.join(TYPES)})")
    ids, pop, sessions = catalogue(train[cols.item_id])
    if kind == "sequential_rules":
        return ClassicalSessionModel(kind, options, ids, pop, rules_matrix(sessions, len(ids), options.max_distance))
    start = train[cols.timestamp].map(lambda v: v[0] if len(v) else 0).to_numpy()
    recency = np.empty(len(start), dtype=np.int64)
    recency[np.argsort(start, kind="stable")] = np.arange(len(start))
    return ClassicalSessionModel(kind, options, ids, pop, sessions_matrix(sessions, len(ids)), recency)


# --- evaluation (the deep session model's protocol) -----------------------------------------------------


def session_exclusions(model: ClassicalSessionModel, sessions: list, exclude_seen: bool) -> Optional[list[np.ndarray]]:
    """Per session, the catalogue rows never to return: its own items (``session.exclude_seen``)."""
    return [np.unique(model.rows_of(s)) for s in sessions] if exclude_seen else None


def topk_metrics_of(model: ClassicalSessionModel, valid: pd.DataFrame, cols: SessionColumns, k: int,
                    exclude_seen: bool = True, units: bool = False) -> dict:
    """Recall/NDCG/MRR@k of ``model`` on held-out sessions: prefix in, last item as target, the prefix's own
    items excluded with ``exclude_seen`` (a target unseen in training is a miss). ``units``: the result
    also holds ``units``, per-session recall/NDCG/MRR@k (:func:`pipeline_lib.models.intervals.rank_units`)."""
    from pipeline_lib.models import intervals
    from pipeline_lib.models.session import metrics_from_topk

    req, targets = prefixes(valid, cols)
    sessions = req[cols.item_id].tolist()
    idx, _ = model.top_k(sessions, k, session_exclusions(model, sessions, exclude_seen))
    target_rows = np.array([r[0] if len(r) else -1 for r in (model.rows_of([t]) for t in targets)], dtype=np.int64)
    out = metrics_from_topk(idx, None, target_rows, k)
    if units:
        hit = (idx == target_rows[:, None]) & (target_rows[:, None] >= 0)
        ranks = np.where(hit.any(axis=1), hit.argmax(axis=1), -1)
        out["units"] = {key: v for key, v in intervals.rank_units(ranks, k).items() if not key.startswith("precision")}
    return out


def baseline_metrics(train: pd.DataFrame, valid: pd.DataFrame, options: SessionClassicalConfig, cols: SessionColumns,
                     k: int, exclude_seen: bool, skip: str = "", units: bool = False) -> dict[str, dict]:
    """Every classical type but ``skip``, fitted on ``train`` and scored on ``valid``: the session
    baselines of the deep models (and of the other classical type), under the same protocol."""
    return {kind: topk_metrics_of(fit(train, kind, options, cols), valid, cols, k, exclude_seen, units)
            for kind in TYPES if kind != skip}


def train_and_evaluate(etl_out, cfg, out_dir: Path) -> TrainOutput:
    """Fit ``session.model.type`` (classical) on the raw training sessions, score it and the baselines
    (most popular, co-occurrence: the deep model's code; the other classical type) on the held-out
    sessions, save the model (``out_dir/model``) and metrics.json."""
    from pipeline_lib.etl.workflow import load_workflow
    from pipeline_lib.models import session as session_model

    s, kind = cfg.session, cfg.session.model.type
    k, opts = s.top_k, s.model.classical
    train, valid = pd.read_parquet(etl_out.split.train), pd.read_parquet(etl_out.split.valid)
    t0 = time.perf_counter()
    model = fit(train, kind, opts, s.columns)
    train_s = time.perf_counter() - t0
    model_dir = model.save(Path(out_dir) / "model")
    t0 = time.perf_counter()
    own = topk_metrics_of(model, valid, s.columns, k, s.exclude_seen)
    eval_s = time.perf_counter() - t0
    workflow = load_workflow(etl_out.workflow_dir)
    n_vocab = int(workflow.output_schema[s.columns.item_id].int_domain.max) + 1
    train_tf = pd.read_parquet(sorted(Path(etl_out.train_dir).glob("*.parquet"))[0])
    results = session_model.evaluate(workflow, None, valid, train_tf, s.columns, k, n_vocab, s.exclude_seen)
    baselines = {n: results[n] for n in ("most_popular", "cooccurrence")}
    baselines.update(baseline_metrics(train, valid, opts, s.columns, k, s.exclude_seen, skip=kind))
    metrics = {
        "model": kind, **{f"{m}@{k}": own[f"{m}@{k}"] for m in ("recall", "ndcg", "mrr")},
        "baselines": baselines, "n_train": int(len(train)), "n_valid": results["n_sessions"],
        "n_items": model.n_items, "target_oov_rate": results["target_oov_rate"], "exclude_seen": s.exclude_seen,
        "target_in_prefix_rate": results["target_in_prefix_rate"], "epochs_run": 0, "best_epoch": None,
        "train_seconds": round(train_s, 2), "eval_seconds": round(eval_s, 2), "matrix_nnz": int(model.matrix.nnz),
        "options": opts.model_dump(),
    }
    metrics_path = save_metrics(Path(out_dir), metrics, {})
    log.info("%s: recall@%d %.4f ndcg@%d %.4f (most popular %.4f, co-occurrence %.4f)", kind, k, metrics[f"recall@{k}"],
             k, metrics[f"ndcg@{k}"], baselines["most_popular"][f"recall@{k}"], baselines["cooccurrence"][f"recall@{k}"])
    return TrainOutput(model_dir, metrics, {}, metrics_path)
