"""Retrieval models (two-tower, YouTube DNN, MF), top-k serving and the two-stage endpoint.

The unit tests check the pieces (user history, top-k order, Merlin's metrics on known ranks); the
integration tests run the whole Prefect flow for each retrieval model on small synthetic data and
query the published versions through a real Triton server.
"""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tritonclient.utils import InferenceServerException

from pipeline_lib.etl import workflow as etl
from pipeline_lib.models import retrieval
from pipeline_lib.export import topk
from pipeline_lib.serving.client import BadRequestError, RecsysClient, RequestError
from pipeline_lib.config import ColumnsConfig, load_config
from pipeline_lib.serving.server import TritonServer

from .conftest import SMALL


def test_user_history_holds_only_earlier_positive_items_in_time_order():
    df = pd.DataFrame({"user_id": [1, 1, 2, 1, 2, 1], "item_id": [10, 11, 12, 13, 14, 15],
                       "click": [1, 0, 1, 1, 1, 0], "timestamp": [1, 2, 1, 3, 0, 4]})
    out = etl.add_user_history(df, ColumnsConfig(), length=2)
    assert out["item_id_history"].tolist() == [[], [10], [14], [10], [], [10, 13]]
    short = etl.add_user_history(df, ColumnsConfig(), length=1)
    assert short["item_id_history"].tolist()[5] == [13]  # the most recent one is kept


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


# -- the flow, per retrieval model, and the published versions served by one Triton ----------------

RUNS = {
    "recsys_mf": {"type": "mf"},
    "recsys_youtube": {"type": "youtube_dnn", "retrieval": {"epochs": 1, "num_sampled": 20}},
    "recsys_two_stage": {"type": "two_tower", "retrieval": {"epochs": 1, "rerank_with": "dlrm", "candidates": 30}},
}


@pytest.fixture(scope="module")
def retrieval_runs(prefect_harness, tmp_path_factory):
    from flows.pipeline import pipeline

    tmp = tmp_path_factory.mktemp("retrieval")
    repo = tmp / "model_repository"
    summaries = {}
    for name, model in RUNS.items():
        overrides = {**SMALL, "seed": 5, "runs_dir": str(tmp / "runs"), "run_name": name,
                     "model": {**SMALL["model"], **model},
                     "export": {**SMALL["export"], "model_repository": str(repo), "model_name": name}}
        summaries[name] = pipeline(overrides=overrides)
    return tmp, repo, summaries


@pytest.mark.integration
@pytest.mark.parametrize("name", list(RUNS))
def test_flow_trains_exports_and_publishes_each_retrieval_model(retrieval_runs, name):
    tmp, repo, summaries = retrieval_runs
    s = summaries[name]
    assert s["model"] == RUNS[name]["type"] and s["model_version"] == 1 and s["gate"]["promote"]
    assert s["gate"]["metric"] == "recall"
    assert s["max_abs_diff_served_vs_offline"] <= 1e-5  # the smoke test compared served and offline top-k
    m = s["metrics"]
    for key in ("recall@10", "precision@10", "ndcg@10", "mrr@10"):
        assert 0.0 <= m[key] <= 1.0, key
    if name == "recsys_youtube":  # the history makes it learnable in one epoch: well above random (10/150)
        assert m["recall@10"] > 0.2
    # the standard protocol (per user, training items excluded): the model and three baselines
    assert set(s["baselines"]) == {"most_popular", "item_cooccurrence", "ease"}
    for b in s["baselines"].values():
        assert 0.0 <= b["recall@10"] <= 1.0 and 0.0 <= b["ndcg@10"] <= 1.0 and b["n_items"] > 0
    assert 0.0 <= m["user_recall@10"] <= 1.0 and 0.0 <= m["user_ndcg@10"] <= 1.0
    assert s["lift"].startswith(f"{RUNS[name]['type']} (per user, seen items excluded) recall@10 {m['user_recall@10']:.4f}")
    run = tmp / "runs" / name
    saved = json.loads((run / "model" / "metrics.json").read_text())
    assert len(saved["history"]["val_recall"]) == saved["metrics"]["epochs_run"]
    assert (run / "model" / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    art = repo / name / "1" / topk.TOPK_DIR
    for f in ("spec.json", "items.npz", "workflow/workflow.pkl", "query_encoder/saved_model.pb"):
        assert (art / f).exists(), f
    assert ("train-ranker" in s["stage_seconds"]) == ("rerank_with" in RUNS[name].get("retrieval", {}))
    table = s["predictions"]
    assert len(table) == SMALL.get("serving", {}).get("smoke_rows", 8)
    assert all(len(items) == 10 for items in table["top_items"])
    rec = topk.TopKRecommender(art)  # the table shows what was sent: the request columns only
    assert list(table.columns) == rec.request_columns + ["top_items", "top_scores"]
    if name == "recsys_mf":
        assert rec.request_columns == ["user_id"]


@pytest.fixture(scope="module")
def served(retrieval_runs):
    tmp, repo, _ = retrieval_runs
    server = TritonServer.on_free_ports(repo, log_file=tmp / "triton.log")
    with server.start(timeout_s=300, models=list(RUNS)):
        yield server


def _rows(runs, name, rec, n=24):
    # the ETL (and its split) may come from an earlier run's cache: take the folder the run used
    split = Path(runs[2][name]["etl_from"]).parent / "split" / "valid.parquet"
    df = pd.read_parquet(split).iloc[40:40 + n]
    return df[rec.request_columns].reset_index(drop=True)


def _seen(runs, name) -> dict:
    """Each training user's positive items, from the split the run trained on."""
    train = pd.read_parquet(Path(runs[2][name]["etl_from"]).parent / "split" / "train.parquet")
    return train[train["click"] > 0].groupby("user_id")["item_id"].apply(set).to_dict()


@pytest.mark.integration
@pytest.mark.parametrize("name", list(RUNS))
def test_served_top_k_equals_offline_top_k_for_the_same_raw_request(retrieval_runs, served, name):
    tmp, repo, _ = retrieval_runs
    rec = topk.TopKRecommender(repo / name / "1" / topk.TOPK_DIR)
    assert rec.exclude_seen  # model.retrieval.exclude_seen is on by default
    rows = _rows(retrieval_runs, name, rec)
    rows.loc[0, "user_id"] = 987654321  # a user the model never saw
    seen = _seen(retrieval_runs, name)
    assert sum(len(seen.get(u, ())) for u in rows["user_id"]) > 0  # known users with training items
    want_ids, want_scores = rec.offline(rows)
    # unknown users (model.retrieval.unknown_users: auto): MF's query is the user id alone, so the
    # most popular items; two-tower (user and context features) and youtube_dnn (history) ask the tower
    assert rec.popular_fallback == (name == "recsys_mf")
    if rec.popular_fallback and not rec.ranker_fn:
        np.testing.assert_array_equal(want_ids[0], rec.item_ids[np.argsort(-rec.popularity, kind="stable")[:10]])
        assert want_scores[0].tolist() == sorted(rec.popularity, reverse=True)[:10]
    # the same rows with a few more items excluded per request (optional input exclude_item_ids)
    more = rows.assign(**{topk.EXCLUDE_INPUT: [list(r[:3]) for r in want_ids.tolist()]})
    want_more = rec.offline(more)
    for url, protocol in ((served.http_url, "http"), (served.grpc_url, "grpc")):
        with RecsysClient(url, protocol, name) as client:
            ids, scores = client.recommend(rows)
            more_ids, more_scores = client.recommend(more)
        assert ids.shape == (len(rows), 10)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(scores, want_scores, atol=1e-5, rtol=0)
        assert (np.diff(scores, axis=1) <= 0).all()  # best first
        assert all(len(set(r)) == 10 for r in ids.tolist())  # no item twice
        assert set(ids.reshape(-1)) <= set(rec.item_ids)  # raw catalogue ids, decoded
        # a known user never gets its training items back
        for user, items in zip(rows["user_id"], ids.tolist()):
            assert not set(items) & seen.get(user, set()), (protocol, user)
        np.testing.assert_array_equal(more_ids, want_more[0])
        np.testing.assert_allclose(more_scores, want_more[1], atol=1e-5, rtol=0)
        for items, dropped, user in zip(more_ids.tolist(), more[topk.EXCLUDE_INPUT], rows["user_id"]):
            assert not set(items) & (set(dropped) | seen.get(user, set()))


@pytest.mark.parametrize("name", list(RUNS))
def test_the_compiled_transform_serves_every_retrieval_version_like_nvtabular(retrieval_runs, name):
    """Every version (MF; YouTube DNN with its jointly encoded history; two-tower + DLRM) was exported
    with the compiled transform verified on; per request it gives what the NVTabular path gives,
    including rows with unseen users, unseen history items and empty histories."""
    from pipeline_lib.export.ranking import raw_to_columns

    tmp, repo, _ = retrieval_runs
    rec = topk.TopKRecommender(repo / name / "1" / topk.TOPK_DIR)
    assert rec.fast_status["enabled"] is True and rec.fast is not None, rec.fast_status
    rows = _rows(retrieval_runs, name, rec, n=6)
    rows.loc[0, "user_id"] = 987654321
    if rec.spec.history:
        rows[rec.spec.history] = [[], [987654], *rows[rec.spec.history].iloc[2:]]
    ids, scores = rec.recommend_columns(raw_to_columns(rows))
    want_ids, want_scores = rec.recommend(rows)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(scores, want_scores, atol=1e-6, rtol=0)
    # the unknown user gets no seen-item exclusion; the known ones do
    excluded = rec.excluded(rows["user_id"].to_numpy())
    assert excluded is not None and len(excluded[0]) == 0 and any(len(e) for e in excluded[1:])
    seen = _seen(retrieval_runs, name)
    assert {rec.item_ids[i] for i in excluded[1]} == seen.get(rows["user_id"].iloc[1], set()) & set(rec.item_ids)


@pytest.mark.integration
def test_two_stage_returns_k_candidates_ordered_by_the_ranking_score(retrieval_runs, served):
    tmp, repo, _ = retrieval_runs
    name = "recsys_two_stage"
    rec = topk.TopKRecommender(repo / name / "1" / topk.TOPK_DIR)
    rows = _rows(retrieval_runs, name, rec, n=4)
    with RecsysClient(served.grpc_url, "grpc", name) as client:
        ids, scores = client.recommend(rows)
    # retrieval's own candidates for these rows, and the ranking model's score for every candidate
    cand_idx, _ = retrieval.top_k(rec.query_embeddings(rows), rec.item_emb, rec.candidates,
                                  rec.excluded(rows["user_id"].to_numpy()))  # the user's training items excluded
    cands = rec.item_ids[cand_idx]
    from pipeline_lib.export import ranking as export

    frame = rec.rank_frame(rows, cands)
    rank = export.offline_scores(rec.workflow_with_label, rec.dir / "ranker", frame[rec.ranker_columns],
                                 "click").reshape(cands.shape)
    for i in range(len(rows)):
        by_rank = sorted(zip(rank[i], cands[i]), key=lambda t: -t[0])[:10]
        assert ids[i].tolist() == [c for _, c in by_rank]  # the k best candidates by ranking score
        np.testing.assert_allclose(scores[i], [s for s, _ in by_rank], atol=1e-5)
        assert set(ids[i]) <= set(cands[i])  # only retrieved candidates are returned


@pytest.mark.integration
def test_bad_top_k_requests_get_a_clear_error_and_the_server_keeps_answering(retrieval_runs, served):
    tmp, repo, _ = retrieval_runs
    name = "recsys_youtube"
    rec = topk.TopKRecommender(repo / name / "1" / topk.TOPK_DIR)
    rows = _rows(retrieval_runs, name, rec, n=2)
    with RecsysClient(served.http_url, "http", name) as client:
        with pytest.raises(RequestError, match="item_id_history"):
            client.recommend(rows.drop(columns=["item_id_history"]))
    # the model's own checks answer invalid-argument (HTTP 400 / gRPC INVALID_ARGUMENT), message kept
    for protocol, url, status in (("http", served.http_url, "400"), ("grpc", served.grpc_url, "StatusCode.INVALID_ARGUMENT")):
        with RecsysClient(url, protocol, name) as client:
            arrays = client.to_arrays(rows)
            arrays["item_id_history__offsets"] = np.array([0, 5, 1], dtype=np.int32)
            with pytest.raises(InferenceServerException, match="item_id_history__offsets") as err:
                client._client.infer(name, client.inputs_from_arrays(arrays))  # plain tritonclient
            assert err.value.status() == status
            assert err.value.message() == "bad request: input 'item_id_history__offsets' must be non-decreasing"
            half = client.to_arrays(rows)  # the optional exclude_item_ids list without its offsets
            half[f"{topk.EXCLUDE_INPUT}__values"] = np.array([1], dtype=np.int64)
            with pytest.raises(InferenceServerException, match="exclude_item_ids__values' without its other half") as err:
                client._client.infer(name, client.inputs_from_arrays(half))
            assert err.value.status() == status
            with pytest.raises(BadRequestError, match=r"bad request: empty batch") as err:
                client.recommend(rows.head(0))
            assert err.value.status() == status
            unseen = rows.assign(item_id_history=[[987654, 987655], []])  # unknown items: OOV, still answered
            ids, _ = client.recommend(unseen)
            assert ids.shape == (2, 10)
            np.testing.assert_array_equal(client.recommend(rows)[0], rec.offline(rows)[0])


def test_dynamic_batching_is_refused_for_top_k_models():
    with pytest.raises(ValueError, match="dynamic_batching applies to ranking models"):
        load_config(None, {"model": {"type": "two_tower"}, "serving": {"dynamic_batching": {"enabled": True}}})


def test_time_split_with_history_keeps_the_latest_rows_for_validation(tmp_path):
    """The history ETL shuffles the rows before writing them: the split must move with them."""
    from pipeline_lib.config import SplitConfig

    n = 400
    df = pd.DataFrame({"user_id": np.arange(n) % 37, "item_id": np.arange(n) % 23, "click": np.arange(n) % 2,
                       "timestamp": np.arange(n)})
    df.to_parquet(tmp_path / "raw.parquet")
    paths = etl.split_raw(tmp_path / "raw.parquet", SplitConfig(method="time", valid_fraction=0.25), ColumnsConfig(),
                          0, tmp_path / "split", history_length=5)
    train, valid = pd.read_parquet(paths.train), pd.read_parquet(paths.valid)
    assert sorted(valid["timestamp"]) == list(range(300, n)) and train["timestamp"].max() == 299
    assert not train["timestamp"].is_monotonic_increasing     # the rows were shuffled all the same


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
