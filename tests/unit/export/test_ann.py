"""ANN (FAISS IVF-Flat) top-k: the index against exact brute force, its files, its config, and one
retrieval version exported with an index by the real flow and served by a real Triton."""
import json

import numpy as np
import pytest
from pydantic import ValidationError

from pipeline_lib.export import ann
from pipeline_lib.models import retrieval
from pipeline_lib.config import AnnConfig, load_config


def _catalogue(n: int, dim: int = 16, clusters: int = 0, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    if not clusters:
        return rng.normal(size=(n, dim)).astype(np.float32)
    centres = rng.normal(size=(clusters, dim))
    return (centres[rng.integers(0, clusters, n)] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)


def _exclusions(n_rows: int, n_items: int, seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [np.sort(rng.choice(n_items, size=rng.integers(0, 30), replace=False)) for _ in range(n_rows)]


def test_nprobe_equal_to_nlist_is_exact_search_with_the_same_contract():
    items, q = _catalogue(3000), _catalogue(40, seed=5)
    ex = _exclusions(40, 3000)
    index = ann.build_index(items, 30, seed=0)
    assert ann.set_nprobe(index, 1000) == 30  # capped at nlist
    for exclude in (None, ex):
        idx, scores = ann.search(index, q, items, 10, exclude)
        want_idx, want_scores = retrieval.top_k(q, items, 10, exclude)
        np.testing.assert_array_equal(idx, want_idx)
        np.testing.assert_allclose(scores, want_scores, atol=1e-5, rtol=0)
        assert ann.ann_recall(want_idx, idx) == 1.0
    idx, _ = ann.search(index, q, items, 10, ex)
    assert not any(set(r) & set(e) for r, e in zip(idx.tolist(), ex))


def test_default_parameters_keep_high_recall_and_scan_a_fraction_of_the_lists():
    items = _catalogue(20_000, clusters=200)
    rng = np.random.default_rng(3)
    q = items[rng.integers(0, len(items), 100)] + 0.1 * rng.normal(size=(100, 16)).astype(np.float32)
    cfg = AnnConfig()
    index = ann.build_index(items, ann.default_nlist(len(items)), cfg.seed)
    assert index.nlist == 141 and ann.set_nprobe(index, cfg.nprobe) == 64
    exact = ann.exact_top_k(q, items, 10)
    assert ann.ann_recall(exact, ann.search(index, q, items, 10)[0]) >= 0.97
    ann.set_nprobe(index, 1)  # one list of 141: approximate, and still a valid top-k of distinct rows
    idx, scores = ann.search(index, q, items, 10)
    assert ann.ann_recall(exact, idx) < 1.0
    assert (np.diff(scores, axis=1) <= 0).all() and all(len(set(r)) == 10 for r in idx.tolist())


def test_rows_the_index_cannot_fill_get_excluded_items_last_at_minus_inf_like_exact_search():
    items, q = _catalogue(60), _catalogue(3, seed=9)
    ex = [np.arange(55), np.array([], dtype=np.int64), np.arange(0, 60, 2)]
    index = ann.build_index(items, 6, seed=0)
    ann.set_nprobe(index, 1)  # a probed list holds ~10 items: fewer than k + excluded
    idx, scores = ann.search(index, q, items, 10, ex)
    want_idx, want_scores = retrieval.top_k(q, items, 10, ex)
    np.testing.assert_array_equal(idx[0], want_idx[0])  # 5 items left, then excluded ones at -inf
    assert np.isneginf(scores[0, 5:]).all() and np.isfinite(scores[0, :5]).all()
    assert not set(idx[2].tolist()) & set(ex[2].tolist()) and np.isfinite(scores).sum() == 25
    assert ann.search(index, q, items, 100)[0].shape == (3, 60)  # k above the catalogue: every row


def test_index_is_deterministic_and_survives_a_save_load_round_trip(tmp_path):
    import faiss

    items, q = _catalogue(5000, clusters=50), _catalogue(20, seed=2)
    a, b = ann.build_index(items, 40, seed=7), ann.build_index(items, 40, seed=7)
    assert np.array_equal(faiss.serialize_index(a), faiss.serialize_index(b))
    ann.set_nprobe(a, 4)
    ann.save_index(a, tmp_path / ann.INDEX_FILE)
    loaded = ann.read_index(tmp_path / ann.INDEX_FILE, nprobe=4)
    assert loaded.nprobe == 4 and loaded.ntotal == 5000
    for got, want in zip(ann.search(loaded, q, items, 10), ann.search(a, q, items, 10)):
        np.testing.assert_array_equal(got, want)


def test_export_keeps_the_index_only_when_its_recall_reaches_min_recall(tmp_path):
    items, q = _catalogue(4000), _catalogue(50, seed=4)
    ex = _exclusions(50, 4000)
    small = ann.export_index(tmp_path, items, q, ex, 10, AnnConfig())  # auto, 4,000 <= 100,000 items
    assert small["index"] == "exact" and not (tmp_path / ann.INDEX_FILE).exists()
    assert ann.load_version_index(tmp_path, small) is None
    low = AnnConfig(mode="faiss", nlist=64, nprobe=1, min_recall=0.99)
    out = ann.export_index(tmp_path, items, q, ex, 10, low)
    assert out["index"] == "exact" and out["recall_at_k"] < 0.99 and "min_recall" in out["reason"]
    assert not (tmp_path / ann.INDEX_FILE).exists()
    ok = ann.export_index(tmp_path, items, q, ex, 10, low.model_copy(update={"min_recall": 0.0}))
    assert ok["index"] == "faiss" and ok["recall_at_k"] == out["recall_at_k"] and ok["nprobe"] == 1
    index = ann.load_version_index(tmp_path, json.loads(json.dumps(ok)))
    assert index.nlist == 64 and index.nprobe == 1


def test_ann_config_defaults_threshold_and_validation():
    cfg = load_config(None, {"model": {"type": "two_tower"}}).model.retrieval.ann
    assert cfg == AnnConfig() and cfg.mode == "auto" and cfg.min_items == 100_000
    assert not ann.wants_index(cfg, 100_000) and ann.wants_index(cfg, 100_001)
    assert ann.wants_index(AnnConfig(mode="faiss"), 10) and not ann.wants_index(AnnConfig(mode="exact"), 10**7)
    assert ann.default_nlist(1_000_000) == 1000 and ann.default_nlist(150) == 3 and ann.default_nlist(10) == 1
    over = load_config(None, {"model": {"type": "mf", "retrieval": {"ann": {"mode": "faiss", "nprobe": 8}}}})
    assert over.model.retrieval.ann.nprobe == 8
    for bad in ({"mode": "hnsw"}, {"min_recall": 1.5}, {"nprobe": 0}, {"nlist": 0}, {"nprobes": 3}):
        with pytest.raises((ValidationError, ValueError)):
            load_config(None, {"model": {"type": "mf", "retrieval": {"ann": bad}}})


# -- one retrieval version exported with a (deliberately coarse) index by the real flow, served by Triton --
