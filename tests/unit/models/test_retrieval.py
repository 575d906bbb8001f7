"""Retrieval pieces: top-k order and exclusions, Merlin's metrics on known ranks, config rules, and one small training against most-popular."""
import json
import numpy as np
import pandas as pd
import pytest
from pipeline_lib.etl import workflow as etl
from pipeline_lib.models import retrieval
from pipeline_lib.export import topk
from pipeline_lib.config import load_config


def test_top_k_orders_by_score_and_breaks_ties_by_catalogue_row():
    query = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    items = np.array([[0.5, 0.0], [2.0, 0.0], [0.5, 1.0], [0.0, 3.0]], dtype=np.float32)
    idx, scores = retrieval.top_k(query, items, 3)
    assert idx.tolist() == [[1, 0, 2], [3, 2, 0]]
    np.testing.assert_allclose(scores, [[2.0, 0.5, 0.5], [3.0, 1.0, 0.0]])
    ids, ranked = topk.rerank(np.array([[7, 8, 9]]), np.array([[0.1, 0.9, 0.5]]), 2)
    assert ids.tolist() == [[8, 9]] and ranked[0].tolist() == pytest.approx([0.9, 0.5])


def test_top_k_never_returns_excluded_rows():
    query = np.array([[1.0, 0.0], [0.0, 1.0]], dtype=np.float32)
    items = np.array([[0.5, 0.0], [2.0, 0.0], [0.5, 1.0], [0.0, 3.0]], dtype=np.float32)
    idx, scores = retrieval.top_k(query, items, 2, exclude=[np.array([1]), np.array([], dtype=np.int64)])
    assert idx.tolist() == [[0, 2], [3, 2]]  # row 0 loses item 1, row 1 is unchanged
    idx, scores = retrieval.top_k(query, items, 3, exclude=[np.array([0, 1, 2]), np.array([3])])
    assert idx[0, 0] == 3 and np.isneginf(scores[0, 1:]).all()  # too few left: excluded ones last, at -inf


def test_masked_top_k_equals_a_stable_full_sort_with_ties_exclusions_and_short_catalogues():
    """The partition-based selection (models.baselines.top_columns) returns exactly what a stable descending
    sort of the masked scores does: ties to the lower column, excluded columns last, never more than exist."""
    rng = np.random.default_rng(7)
    for trial in range(200):
        b, n, k = rng.integers(1, 6), rng.integers(1, 40), rng.integers(1, 50)
        scores = rng.integers(0, 4, size=(b, n)).astype(np.float32)  # few distinct values: many ties
        excl = [rng.choice(n, size=rng.integers(0, n + 1), replace=False) for _ in range(b)] if trial % 2 else None
        masked = retrieval.mask_rows(scores.copy(), excl, -np.inf)
        want = np.argsort(-masked, axis=1, kind="stable")[:, :k]
        idx, best = retrieval.top_k_scores(scores.copy(), k, excl)
        assert np.array_equal(idx, want), (trial, idx, want)
        assert np.array_equal(best, np.take_along_axis(masked, want, axis=1))


def test_retrieval_metrics_match_hand_computed_values():
    item_ids = np.array([100, 101, 102, 103])
    # query 0: target ranked 1st; query 1: ranked 3rd; query 2: not in the top 2; query 3: unknown item
    scores = np.array([[4, 3, 2, 1], [4, 3, 2, 1], [4, 3, 2, 1], [4, 3, 2, 1]], dtype=np.float32)
    targets = np.array([100, 102, 103, 999])
    m = retrieval.retrieval_metrics(scores, item_ids, targets, k=3)
    assert m["target_in_catalogue"] == 0.75
    assert m["recall"] == pytest.approx(2 / 4)  # hits at rank 1 and 3 out of 4 queries
    assert m["precision"] == pytest.approx((1 / 3 + 1 / 3) / 4)
    assert m["mrr"] == pytest.approx((1 + 1 / 3) / 4)
    assert m["ndcg"] == pytest.approx((1 + 1 / np.log2(4)) / 4)


def test_config_rejects_a_ranking_metric_for_a_retrieval_model_and_rerank_without_retrieval():
    with pytest.raises(ValueError, match="does not apply"):
        load_config(None, {"model": {"type": "mf"}, "gate": {"metric": "auc"}})
    with pytest.raises(ValueError, match="rerank_with applies to retrieval"):
        load_config(None, {"model": {"type": "dlrm", "retrieval": {"rerank_with": "dlrm"}}})
    assert load_config(None, {"model": {"type": "two_tower"}}).gate_metric == "recall"
    assert load_config(None, {}).gate_metric == "auc"


def test_dynamic_batching_is_refused_for_top_k_models():
    with pytest.raises(ValueError, match="dynamic_batching applies to ranking models"):
        load_config(None, {"model": {"type": "two_tower"}, "serving": {"dynamic_batching": {"enabled": True}}})


@pytest.mark.parametrize("model_type", ["two_tower"])
def test_trained_retrieval_model_beats_most_popular_on_default_generated_data(tmp_path, model_type):
    """Small data from the default generator (exposure follows taste), the default retrieval
    settings (model.type set, batches of 256 for the small data): the model's per-user recall@10 with seen items excluded
    (its best epoch) clearly beats most-popular-without-seen on the same split."""
    from pipeline_lib.models import baselines as bl
    from pipeline_lib.data import sources as data

    cfg = load_config(None, {"data": {"synthetic": {"n_users": 500, "n_items": 300, "n_interactions": 20_000}},
                             "model": {"type": model_type, "batch_size": 256}})  # small data: more steps
    raw = data.write_raw(cfg.data, cfg.seed, tmp_path / "raw", cfg.columns)
    split = etl.split_raw(raw, cfg.split, cfg.columns, cfg.seed, tmp_path / "split")
    e = etl.fit_transform(cfg.columns, cfg.etl, split, tmp_path / "etl")
    out = retrieval.train(e.workflow_dir, e.train_dir, split.train, split.valid, cfg.columns, cfg.model, cfg.seed,
                          tmp_path / "model")
    base = bl.retrieval_baselines(pd.read_parquet(split.train), pd.read_parquet(split.valid), "user_id", "item_id",
                                  10, label="click")
    model, mp = out.metrics["user_recall@10"], base["most_popular"]["recall@10"]
    print(model_type, round(model, 4), {n: round(r["recall@10"], 4) for n, r in base.items()}, out.history["val_recall"])
    assert model > 1.2 * mp
    saved = json.loads((tmp_path / "model" / "metrics.json").read_text())
    assert saved["history"]["val_recall"][saved["metrics"]["best_epoch"] - 1] == model == max(saved["history"]["val_recall"])
    # evaluated in memory; the encoders saved without Keras' layer traces (common.save_model), whose serving
    # signatures -- what export, the gate and serving call -- give the same metrics, to the last bit
    assert_saved_encoders_score_like_in_memory(cfg, e, split, out)


def assert_saved_encoders_score_like_in_memory(cfg, e, split, out):
    import tensorflow as tf

    loaded = tf.saved_model.load(str(out.model_dir / retrieval.QUERY_ENCODER))
    assert not callable(loaded) and set(loaded.signatures) == {"serving_default"}  # no traces
    r = cfg.model.retrieval
    spec = retrieval.RetrievalSpec.from_config(cfg.columns, cfg.model.type, r.query_history, r.query_user_id)
    workflow = etl.load_workflow(e.workflow_dir).remove_inputs([cfg.columns.label])
    train, valid = pd.read_parquet(split.train), pd.read_parquet(split.valid)
    filler = retrieval.filler_row(train, workflow.input_schema.column_names)
    ids, emb = retrieval.item_embeddings(workflow, out.model_dir, spec, retrieval.catalogue(train, spec), filler)
    pos = valid[valid[cfg.columns.label] == 1]
    q = retrieval.query_embeddings(workflow, out.model_dir, spec, pos, filler)
    got = retrieval.retrieval_metrics(q @ emb.T, ids, pos[cfg.columns.item_id].to_numpy(), cfg.model.retrieval.k)
    assert got == {name: out.metrics[name] for name in got}


def test_two_tower_with_the_users_history_as_a_query_feature_trains_exports_and_matches_offline(tmp_path):
    """``model.retrieval.query_history``: the ETL adds the history list, the query tower reads it (mean of its
    embeddings) -- here without the user id (``query_user_id: false``) --, the saved encoders score like the
    in-memory model, and the exported version takes the list as a request input (and the user id, for the seen
    items) and answers like the offline path (an empty history included)."""
    from pipeline_lib.data import sources as data
    from pipeline_lib.families import get_family

    cfg = load_config(None, {"task": "retrieval",
                             "data": {"synthetic": {"n_users": 200, "n_items": 120, "n_interactions": 6000}},
                             "model": {"type": "two_tower", "batch_size": 256,
                                       "retrieval": {"epochs": 2, "query_history": True, "history_length": 5,
                                                     "query_user_id": False}}})
    hist = etl.history_column(cfg.columns)
    assert get_family(cfg).history_length == 5
    spec = retrieval.RetrievalSpec.from_config(cfg.columns, "two_tower", True, False)
    assert hist in spec.query_columns and spec.query_history == hist and spec.history is None
    assert "user_id" not in spec.query_columns and "user_id" in retrieval.RetrievalSpec.from_config(
        cfg.columns, "two_tower", True).query_columns
    raw = data.write_raw(cfg.data, cfg.seed, tmp_path / "raw", cfg.columns)
    split = etl.split_raw(raw, cfg.split, cfg.columns, cfg.seed, tmp_path / "split", history_length=5)
    e = etl.fit_transform(cfg.columns, cfg.etl, split, tmp_path / "etl", history=True)
    out = retrieval.train(e.workflow_dir, e.train_dir, split.train, split.valid, cfg.columns, cfg.model, cfg.seed,
                          tmp_path / "model")
    assert out.metrics["user_recall@10"] > 0
    assert_saved_encoders_score_like_in_memory(cfg, e, split, out)
    valid = pd.read_parquet(split.valid)
    sample = pd.concat([valid.head(6), valid.head(1).assign(**{hist: [[]]})], ignore_index=True)
    exp = topk.export_topk(e.workflow_dir, out.model_dir, split.train, sample,
                           topk.TopKSettings.from_config(cfg), tmp_path / "staging", "recsys",
                           raw_history=split.valid)
    assert exp.recommender.request_columns[:2] == ["user_id", hist] and exp.parity["max_abs_score_diff"] <= 1e-5
    ids, _ = exp.recommender.recommend(sample[exp.recommender.request_columns])
    np.testing.assert_array_equal(ids, exp.recommender.offline(sample[exp.recommender.request_columns])[0])
    seen = pd.concat([pd.read_parquet(split.train), valid]).query("click > 0").groupby("user_id")["item_id"].apply(set)
    assert all(not (set(row) & seen.get(u, set())) for u, row in zip(sample["user_id"], ids.tolist()))
