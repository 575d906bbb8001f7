"""Classical retrieval models (``model.type: ease | item_knn``): item-item weights fitted in closed form on the
raw training split's positive user-item pairs, scored per user as ``history_row @ W``.

- ``ease``: Steck's EASE (:func:`pipeline_lib.models.baselines.ease_weights`, ``model.classical.ease_lambda``):
  a dense n_items x n_items matrix, refused above ``model.classical.ease_max_items`` catalogue items with an
  error naming that limit (use ``item_knn``);
- ``item_knn``: item-item cosine on the binary user x item matrix with shrinkage
  (:func:`pipeline_lib.models.baselines.cosine_similarity_matrix`), each item's ``knn_neighbours`` most similar
  items kept: a sparse matrix, for catalogues of millions.

The catalogue, the positives rule (``columns.label > 0``), the seen-item exclusion and the popularity tie-break
are those of the baselines' :class:`~pipeline_lib.models.baselines.TopKProtocol`, and the validation metrics are
computed by that protocol (per user, seen items excluded): ``user_recall@k`` / ``user_ndcg@k`` (also reported as
``recall`` / ``ndcg``: these models have no per-query evaluation of their own). A user without training positives
scores zero everywhere, so the tie-break gives the most popular items (what the served version answers too).

``model_dir`` holds ``spec.json`` (type, columns, parameters), ``items.npz`` (the catalogue's raw ids in
popularity order + their popularity) and the weights (``weights.npy`` dense for EASE, ``weights.npz``
scipy.sparse for item_knn); export adds each training user's positive items (the user's history, also the
seen items) and serves it with :class:`pipeline_lib.export.classical.ClassicalRecommender`.
"""
from __future__ import annotations

import json
import logging
import time
from pathlib import Path
from typing import Callable, Optional, Union

import numpy as np
import pandas as pd
import scipy.sparse as sp

from pipeline_lib.config import ColumnsConfig, ModelConfig
from pipeline_lib.models import autoencoder
from pipeline_lib.models import baselines as bl
from pipeline_lib.models.autoencoder import HistoryMLP
from pipeline_lib.models.common import TrainOutput, save_metrics

log = logging.getLogger(__name__)

Weights = Union[np.ndarray, sp.csr_matrix, HistoryMLP]  # HistoryMLP: mult_dae / mult_vae (models/autoencoder.py)
SPEC_FILE, ITEMS_FILE = "spec.json", "items.npz"
DENSE_WEIGHTS, SPARSE_WEIGHTS, MLP_WEIGHTS = "weights.npy", "weights.npz", autoencoder.MLP_FILE


class CatalogueTooLarge(ValueError):
    """EASE asked to fit a catalogue above ``model.classical.ease_max_items``."""


def keep_top_n(sim: sp.csr_matrix, n: Optional[int]) -> sp.csr_matrix:
    """Each row's ``n`` largest entries (ties to the lower column); every entry when ``n`` is None."""
    sim = sp.csr_matrix(sim)
    if n is None or not sim.nnz:
        return sim
    rows = np.repeat(np.arange(sim.shape[0]), np.diff(sim.indptr))
    order = np.lexsort((sim.indices, -sim.data, rows))           # per row: value desc, column asc
    start = sim.indptr[rows[order]]
    keep = order[np.arange(len(order)) - start < n]
    out = sp.csr_matrix((sim.data[keep], (rows[keep], sim.indices[keep])), shape=sim.shape)
    out.sort_indices()
    return out


def fit_weights(x: sp.spmatrix, model_type: str, cfg) -> Weights:
    """Item-item weights of ``model_type`` on the binary user x item matrix ``x`` (``cfg``: ``ClassicalConfig``)."""
    n_items = x.shape[1]
    if model_type == "ease":
        if n_items > cfg.ease_max_items:
            raise CatalogueTooLarge(
                f"model.type ease: the catalogue holds {n_items} items, above model.classical.ease_max_items="
                f"{cfg.ease_max_items} (EASE inverts a dense {n_items} x {n_items} float64 matrix); use model.type "
                "item_knn (sparse), or raise model.classical.ease_max_items if the memory allows")
        return bl.ease_weights(x, cfg.ease_lambda)
    if model_type == "item_knn":
        return keep_top_n(bl.cosine_similarity_matrix(x, cfg.knn_shrinkage), cfg.knn_neighbours)
    raise ValueError(f"'{model_type}' is not a classical retrieval model (ease, item_knn)")


def scores(history: sp.csr_matrix, weights: Weights) -> np.ndarray:
    """Dense float64 scores [users, catalogue] of binary history rows: ``history @ W`` (an autoencoder: its
    forward pass over the rows, :meth:`HistoryMLP.scores`)."""
    if isinstance(weights, HistoryMLP):
        return weights.scores(history)
    s = history @ weights
    return np.asarray(s.toarray() if sp.issparse(s) else s, dtype=np.float64)


def protocol_scorer(weights: Weights) -> Callable[[np.ndarray, sp.csr_matrix], np.ndarray]:
    """A :meth:`TopKProtocol.evaluate_scores` score function of the weights (catalogue in the protocol's order)."""
    return lambda rows, xb: scores(xb, weights)


def save_weights(model_dir: Path, weights: Weights) -> Path:
    if isinstance(weights, HistoryMLP):
        return weights.save(model_dir / MLP_WEIGHTS)
    if sp.issparse(weights):
        sp.save_npz(model_dir / SPARSE_WEIGHTS, sp.csr_matrix(weights))
        return model_dir / SPARSE_WEIGHTS
    np.save(model_dir / DENSE_WEIGHTS, np.asarray(weights, dtype=np.float64))
    return model_dir / DENSE_WEIGHTS


def load_weights(model_dir: Path) -> Weights:
    """The weights saved by :func:`save_weights` (dense EASE, sparse item_knn or an autoencoder's layers)."""
    if (Path(model_dir) / MLP_WEIGHTS).is_file():
        return HistoryMLP.load(Path(model_dir) / MLP_WEIGHTS)
    dense = Path(model_dir) / DENSE_WEIGHTS
    return np.load(dense) if dense.is_file() else sp.load_npz(Path(model_dir) / SPARSE_WEIGHTS).tocsr()


def load_items(model_dir: Path) -> tuple[np.ndarray, np.ndarray]:
    """The catalogue's raw item ids (popularity order) and their popularity (training users per item)."""
    z = np.load(Path(model_dir) / ITEMS_FILE, allow_pickle=True)
    return z["ids"], z["popularity"]


def aligned(weights: Weights, model_ids: np.ndarray, ids: np.ndarray) -> Weights:
    """The weights re-indexed from the model's catalogue order to ``ids`` (the same items; no copy when equal)."""
    if len(model_ids) == len(ids) and np.array_equal(model_ids, ids):
        return weights
    pos = pd.Index(model_ids).get_indexer(ids)
    if (pos < 0).any() or len(ids) != len(model_ids):
        raise ValueError("the model's catalogue differs from the evaluation catalogue")
    return weights.aligned(pos) if isinstance(weights, HistoryMLP) else weights[pos][:, pos]


def parameter_count(weights: Weights) -> int:
    """Non-zero weights of a matrix; every parameter of an autoencoder."""
    if isinstance(weights, HistoryMLP):
        return int(sum(w.size for w in weights.kernels) + sum(b.size for b in weights.biases))
    return int(sp.csr_matrix(weights).nnz) if sp.issparse(weights) else int(np.count_nonzero(weights))


def train(raw_train: Path, raw_valid: Path, columns: ColumnsConfig, cfg: ModelConfig, out_dir: Path,
          seed: int = 0) -> TrainOutput:
    """Fit ``cfg.type`` on the raw training positives, score it on the raw validation split under the
    baselines' top-k protocol (per user, ``model.retrieval.exclude_seen``), save it into ``out_dir/model``
    and its metrics into ``out_dir/metrics.json``. An autoencoder (mult_dae / mult_vae) trains for epochs
    (``seed``) and keeps the epoch with the best validation figure of that protocol."""
    t0 = time.perf_counter()
    train_df, valid_df = pd.read_parquet(raw_train), pd.read_parquet(raw_valid)
    k = cfg.retrieval.k
    p = bl.TopKProtocol.build(train_df, valid_df, columns.user_id, columns.item_id, columns.label,
                              exclude_seen=cfg.retrieval.exclude_seen)
    history: dict = {}
    extra: dict = {}
    weights: Weights
    if cfg.type in autoencoder.TYPES:
        weights, history, extra = autoencoder.fit(
            p.full_train_matrix, cfg.type, cfg.autoencoder, seed,
            lambda m: p.evaluate_scores(protocol_scorer(m), k)[f"recall@{k}"])
    else:
        weights = fit_weights(p.full_train_matrix, cfg.type, cfg.classical)
    fit_s = time.perf_counter() - t0
    res = p.evaluate_scores(protocol_scorer(weights), k)
    model_dir = out_dir / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    save_weights(model_dir, weights)
    np.savez(model_dir / ITEMS_FILE, ids=_ids_array(p.item_ids), popularity=p.popularity)
    nnz = parameter_count(weights)
    params = cfg.autoencoder if cfg.type in autoencoder.TYPES else cfg.classical
    spec = {"model_type": cfg.type, "user_id": columns.user_id, "item_id": columns.item_id, "label": columns.label,
            "params": params.model_dump(mode="json"), "n_items": int(len(p.item_ids)), "weights_nnz": nnz}
    (model_dir / SPEC_FILE).write_text(json.dumps(spec, indent=2))
    rk, nk = res[f"recall@{k}"], res[f"ndcg@{k}"]
    metrics = {"model": cfg.type, "k": k, "protocol": "per user, seen items excluded (TopKProtocol)",
               "recall": rk, "ndcg": nk, f"user_recall@{k}": rk, f"user_ndcg@{k}": nk,
               "n_queries": int(res["n_users"]), "n_train": int(p.full_train_matrix.nnz), "n_items": int(len(p.item_ids)),
               "weights_nnz": nnz, "fit_seconds": fit_s,
               "seconds": time.perf_counter() - t0, **extra, **p.stats}
    metrics_path = save_metrics(out_dir, metrics, history)
    log.info("%s: per-user validation recall@%d %.4f ndcg@%d %.4f over %d users, %d items (%d weights, %.1f s)",
             cfg.type, k, rk, k, nk, res["n_users"], len(p.item_ids), nnz, metrics["seconds"])
    return TrainOutput(model_dir=model_dir, metrics=metrics, history=history, metrics_path=metrics_path)


def _ids_array(ids: np.ndarray) -> np.ndarray:
    return ids.astype(object) if ids.dtype.kind in "OUS" else ids
