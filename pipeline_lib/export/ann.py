"""Approximate top-k retrieval with a FAISS index (large catalogues), same contract as exact top-k.

The index is an IVF-Flat on inner product (``faiss.IndexIVFFlat``, ``METRIC_INNER_PRODUCT``):
k-means (seeded, so the index file is deterministic) cuts the catalogue into ``nlist`` lists and a
query scans the ``nprobe`` lists nearest to it. Why IVF-Flat and not HNSW: the vectors are stored
unchanged, so ``nprobe = nlist`` is exact (recall 1.0, a testable bound) and recall is tuned by
one search-time knob; training and building take seconds for 1M items and the build is
deterministic (HNSW's graph depends on insertion threads); memory is the raw embeddings plus the
list ids (HNSW adds ~2*M ints per item).

:func:`search` keeps :func:`pipeline_lib.models.retrieval.top_k`'s contract: catalogue rows and scores
[n, k] best first, ties to the lower row, per-row ``exclude`` rows never returned. It asks the
index for k + (most rows excluded in any request row) candidates, re-scores them with the
embeddings (the scores are the same dot products as exact search), drops excluded ones and keeps
the k best. A row the index cannot fill with k allowed items (its probed lists hold too few) is
answered by exact search, so "fewer than k left: excluded ones last at -inf" holds as well.

At export (:func:`export_index`) the index is built from the version's item embeddings, its
recall@k against exact top-k is measured on held-out query rows (with their exclusions), and
it is saved as ``topk/items.faiss`` unless the recall is below ``min_recall`` -- then the version
is exported without it (exact search) and the reason is recorded and logged. Served and offline
top-k both search the same saved index, so served == offline holds either way.
"""
from __future__ import annotations

import logging
import math
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np

from pipeline_lib.models import retrieval
from pipeline_lib.config import AnnConfig

log = logging.getLogger(__name__)

INDEX_FILE = "items.faiss"
KMEANS_ITERATIONS = 10
POINTS_PER_LIST = 64  # k-means trains on at most this many (seeded, sampled) items per list
EXACT_CHUNK_ROWS = 16  # query rows per exact top-k call when measuring recall (memory: rows x items)


def _faiss():
    import faiss

    return faiss


def wants_index(cfg: AnnConfig, n_items: int) -> bool:
    """faiss: always; exact: never; auto: when the catalogue has more than ``min_items`` items."""
    return cfg.mode == "faiss" or (cfg.mode == "auto" and n_items > cfg.min_items)


def default_nlist(n_items: int) -> int:
    """sqrt(items) lists (1,000 for 1M items), at most one per 39 items (FAISS's minimum training
    points per list). FAISS suggests 4-16 * sqrt(items) for a fixed scan budget; sqrt keeps the
    k-means build of a 1M catalogue to seconds on a CPU, and the lists scanned stay few in share."""
    return max(1, min(int(round(math.sqrt(n_items))), n_items // 39))


def build_index(items: np.ndarray, nlist: int, seed: int = 0):
    """An IVF-Flat inner-product index over ``items`` (rows = catalogue rows), k-means seeded."""
    faiss = _faiss()
    x = np.ascontiguousarray(items, dtype=np.float32)
    nlist = max(1, min(nlist, len(x)))
    quantizer = faiss.IndexFlatIP(x.shape[1])
    index = faiss.IndexIVFFlat(quantizer, x.shape[1], nlist, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    index.cp.niter = KMEANS_ITERATIONS
    index.cp.max_points_per_centroid = POINTS_PER_LIST
    index.cp.min_points_per_centroid = 1
    index.train(x)
    index.add(x)  # faiss's python wrapper keeps ``quantizer`` alive as long as ``index``
    return index


def set_nprobe(index, nprobe: int) -> int:
    index.nprobe = max(1, min(nprobe, index.nlist))
    return int(index.nprobe)


def save_index(index, path: Path) -> None:
    _faiss().write_index(index, str(path))


def read_index(path: Path, nprobe: Optional[int] = None):
    index = _faiss().read_index(str(path))
    if nprobe is not None:
        set_nprobe(index, nprobe)
    return index


def search(index, query: np.ndarray, items: np.ndarray, k: int,
           exclude: Optional[list[np.ndarray]] = None) -> tuple[np.ndarray, np.ndarray]:
    """Approximate :func:`retrieval.top_k`: (catalogue rows [n, k], scores [n, k]) best first."""
    q = np.ascontiguousarray(query, dtype=np.float32)
    k = min(k, len(items))
    width = max((len(e) for e in exclude), default=0) if exclude is not None else 0
    _, cand = index.search(q, min(k + width, len(items)))
    rows = np.where(cand >= 0, cand, 0)
    scores = np.einsum("nd,nkd->nk", q, np.asarray(items, dtype=np.float32)[rows])
    drop = cand < 0
    if width:
        for i, e in enumerate(exclude):  # type: ignore[arg-type]  # width > 0: not None
            if len(e):
                drop[i] |= np.isin(cand[i], e)
    scores[drop] = -np.inf
    order = np.lexsort((rows, -scores), axis=-1)[:, :k]  # best first, ties to the lower row
    idx, top = np.take_along_axis(rows, order, 1), np.take_along_axis(scores, order, 1)
    short = np.nonzero(np.isneginf(top).any(axis=1))[0]  # fewer than k allowed candidates found
    if len(short):
        sub = [exclude[i] for i in short] if exclude is not None else None
        idx[short], top[short] = retrieval.top_k(q[short], items, k, sub)
    return idx, top


def top_k(index, query: np.ndarray, items: np.ndarray, k: int,
          exclude: Optional[list[np.ndarray]] = None) -> tuple[np.ndarray, np.ndarray]:
    """The index's top-k when a version has one, else exact :func:`retrieval.top_k`."""
    if index is None:
        return retrieval.top_k(query, items, k, exclude)
    return search(index, query, items, k, exclude)


def exact_top_k(query: np.ndarray, items: np.ndarray, k: int,
                exclude: Optional[list[np.ndarray]] = None) -> np.ndarray:
    """Exact top-k rows in chunks of query rows (a [rows, items] score matrix per chunk)."""
    parts = []
    for s in range(0, len(query), EXACT_CHUNK_ROWS):
        sub = exclude[s:s + EXACT_CHUNK_ROWS] if exclude is not None else None
        parts.append(retrieval.top_k(query[s:s + EXACT_CHUNK_ROWS], items, k, sub)[0])
    return np.concatenate(parts) if parts else np.zeros((0, min(k, len(items))), dtype=np.int64)


def ann_recall(exact_idx: np.ndarray, ann_idx: np.ndarray) -> float:
    """Mean over query rows of |ANN top-k & exact top-k| / k (1.0 = the same sets)."""
    if not len(exact_idx):
        return 1.0
    hits = [len(np.intersect1d(e, a)) for e, a in zip(exact_idx, ann_idx)]
    return float(np.mean(hits) / exact_idx.shape[1])


def no_index_info(cfg: AnnConfig, n_items: int) -> dict[str, Any]:
    """spec.json's ``ann`` of a version ``cfg`` gives no index (exact search)."""
    return {"mode": cfg.mode, "n_items": int(n_items), "min_items": cfg.min_items, "index": "exact",
            "reason": f"mode {cfg.mode}, {n_items} items (auto: an index above {cfg.min_items})"}


def export_index(art_dir: Path, items: np.ndarray, queries: np.ndarray, exclude: Optional[list[np.ndarray]],
                 k: int, cfg: AnnConfig) -> dict[str, Any]:
    """Build, check and save the version's index (``art_dir/items.faiss``) when ``cfg`` asks for one.

    Returns what goes to spec.json's ``ann``: ``index`` (``faiss`` or ``exact``), the parameters,
    ``recall_at_k`` on the held-out ``queries`` and, when exact is kept, the reason."""
    n = int(len(items))
    info: dict[str, Any] = {"mode": cfg.mode, "n_items": n, "min_items": cfg.min_items}
    if not wants_index(cfg, n):
        return no_index_info(cfg, n)
    t0 = time.perf_counter()
    index = build_index(items, cfg.nlist or default_nlist(n), cfg.seed)
    nprobe = set_nprobe(index, cfg.nprobe)
    build_s = time.perf_counter() - t0
    exact = exact_top_k(queries, items, k, exclude)
    recall = ann_recall(exact, search(index, queries, items, k, exclude)[0])
    info.update(kind="IVFFlat/IP", nlist=int(index.nlist), nprobe=nprobe, seed=cfg.seed, k=int(exact.shape[1]),
                queries=int(len(queries)), recall_at_k=round(recall, 6), min_recall=cfg.min_recall,
                build_seconds=round(build_s, 3))
    if recall < cfg.min_recall:
        reason = f"recall@{info['k']} {recall:.4f} < min_recall {cfg.min_recall} on {len(queries)} held-out rows"
        log.warning("ANN index not used, the version searches exactly: %s", reason)
        return {**info, "index": "exact", "reason": reason}
    save_index(index, Path(art_dir) / INDEX_FILE)
    log.info("ANN index %s: recall@%d %.4f on %d held-out rows", INDEX_FILE, info["k"], recall, len(queries))
    return {**info, "index": "faiss", "file": INDEX_FILE}


def load_version_index(art_dir: Path, meta: Optional[dict]):
    """The saved index of a version whose spec.json ``ann`` says ``index: faiss``; else None (exact)."""
    if not meta or meta.get("index") != "faiss":
        return None
    return read_index(Path(art_dir) / meta.get("file", INDEX_FILE), meta.get("nprobe"))
