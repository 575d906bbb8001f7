"""Retrieval models (two-tower, YouTube DNN, MF), top-k serving and the two-stage endpoint.

The whole Prefect flow for each retrieval model on small synthetic data, and the published versions
queried through one real Triton server; the MF version carries a (deliberately coarse) FAISS index,
so its served top-k goes through ANN search. The pieces are checked in tests/unit/models/test_retrieval.py
and tests/unit/export/test_ann.py.
"""
import json
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from tritonclient.utils import InferenceServerException

from pipeline_lib.models import retrieval
from pipeline_lib.export import ann, topk
from pipeline_lib.export import ranking as export
from pipeline_lib.export.ranking import raw_to_columns
from pipeline_lib.online import impressions
from pipeline_lib.serving.client import BadRequestError, RecsysClient, RequestError
from pipeline_lib.serving.server import TritonServer

from tests.conftest import SMALL

pytestmark = pytest.mark.integration


# -- the flow, per retrieval model, and the published versions served by one Triton ----------------

ANN = {"mode": "faiss", "nlist": 8, "nprobe": 2, "min_recall": 0.0}  # coarse: ANN really differs from exact
RUNS = {
    "recsys_mf": {"type": "mf", "retrieval": {"epochs": 1, "ann": ANN}},
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


class Published(dict):
    """Model name -> its published version 1 (a ``TopKRecommender``), loaded on first use, once per module:
    loading the encoders, ranker and workflow costs seconds. Tests only read it."""

    def __init__(self, repo: Path):
        super().__init__()
        self.repo = repo

    def __missing__(self, name: str) -> topk.TopKRecommender:
        self[name] = rec = topk.TopKRecommender(self.repo / name / "1" / topk.TOPK_DIR)
        return rec


@pytest.fixture(scope="module")
def published(retrieval_runs) -> Published:
    return Published(retrieval_runs[1])


@pytest.mark.integration
@pytest.mark.parametrize("name", list(RUNS))
def test_flow_trains_exports_and_publishes_each_retrieval_model(retrieval_runs, published, name):
    tmp, repo, summaries = retrieval_runs
    s = summaries[name]
    assert s["model"] == RUNS[name]["type"] and s["model_version"] == 1 and s["gate"]["promote"]
    assert s["gate"]["metric"] == "recall"
    assert s["max_abs_diff_served_vs_offline"] <= 1e-5  # the smoke test compared served and offline top-k
    m, v = s["metrics"], s["validation_metrics"]  # test (per user) and validation (per query) figures
    for key in ("recall@10", "precision@10", "ndcg@10", "mrr@10"):
        assert 0.0 <= v[f"per_query_{key}"] <= 1.0, key
    if name == "recsys_youtube":  # the history makes it learnable in one epoch: well above random (10/150)
        assert v["per_query_recall@10"] > 0.2
    assert s["metrics_split"] == "test" and s["intervals"]["recall@10"].startswith(f"{m['recall@10']:.4f} [")
    assert s["gate"]["outcome"] in ("promoted", "inconclusive")  # nothing served yet: both promote
    # the standard protocol (per user, training items excluded): the model and three baselines
    assert set(s["baselines"]) == {"most_popular", "item_cooccurrence", "ease"}
    for b in s["baselines"].values():
        assert 0.0 <= b["recall@10"] <= 1.0 and 0.0 <= b["ndcg@10"] <= 1.0 and b["n_items"] > 0
    assert 0.0 <= m["recall@10"] <= 1.0 and 0.0 <= m["ndcg@10"] <= 1.0 and m["n_test_users"] > 0
    assert s["lift"].startswith(f"{RUNS[name]['type']} (per user, seen items excluded) recall@10 {m['recall@10']:.4f}")
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
    rec = published[name]  # the table shows what was sent: the request columns only
    assert list(table.columns) == rec.request_columns + ["top_items", "top_scores"]
    if name == "recsys_mf":
        assert rec.request_columns == ["user_id"]


REDIS_MODEL = "recsys_youtube"  # served from a Redis online store when redis-server is installed


@pytest.fixture(scope="module")
def redis_store(retrieval_runs):
    """A real redis-server on a free loopback port holding REDIS_MODEL's features (the flow filled SQLite; the
    served model is pointed at Redis before Triton starts); None when redis-server is not installed."""
    import shutil
    import subprocess
    import time

    from pipeline_lib.features.store import StoreSettings, materialize, write_pointer
    from pipeline_lib.serving.server import free_port

    exe = shutil.which("redis-server")
    if exe is None:
        yield None
        return
    tmp, repo, _ = retrieval_runs
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        settings = StoreSettings(tmp / "redis_fs" / REDIS_MODEL, "redis", f"127.0.0.1:{port}")
        materialize(settings, repo / REDIS_MODEL / "1" / topk.TOPK_DIR, 1)
        write_pointer(repo / REDIS_MODEL, settings)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)


@pytest.fixture(scope="module")
def served(retrieval_runs, redis_store):
    tmp, repo, _ = retrieval_runs
    log_env = impressions.server_env(tmp / "impressions", 0.2, ["user_id"], "item_id")  # the impression log on
    server = TritonServer.on_free_ports(repo, log_file=tmp / "triton.log", env=log_env)
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
def test_served_top_k_equals_offline_top_k_for_the_same_raw_request(retrieval_runs, published, served, name):
    rec = published[name]
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
def test_the_compiled_transform_serves_every_retrieval_version_like_nvtabular(retrieval_runs, published, name):
    """Every version (MF; YouTube DNN with its jointly encoded history; two-tower + DLRM) was exported
    with the compiled transform verified on; per request it gives what the NVTabular path gives,
    including rows with unseen users, unseen history items and empty histories."""

    rec = published[name]
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
def test_two_stage_returns_k_candidates_ordered_by_the_ranking_score(retrieval_runs, published, served):
    name = "recsys_two_stage"
    rec = published[name]
    rows = _rows(retrieval_runs, name, rec, n=4)
    with RecsysClient(served.grpc_url, "grpc", name) as client:
        ids, scores = client.recommend(rows)
    # retrieval's own candidates for these rows, and the ranking model's score for every candidate
    cand_idx, _ = retrieval.top_k(rec.query_embeddings(rows), rec.item_emb, rec.candidates,
                                  rec.excluded(rows["user_id"].to_numpy()))  # the user's training items excluded
    cands = rec.item_ids[cand_idx]

    frame = rec.rank_frame(rows, cands)
    rank = export.offline_scores(rec.workflow_with_label, rec.dir / "ranker", frame[rec.ranker_columns],
                                 "click").reshape(cands.shape)
    for i in range(len(rows)):
        by_rank = sorted(zip(rank[i], cands[i]), key=lambda t: -t[0])[:10]
        assert ids[i].tolist() == [c for _, c in by_rank]  # the k best candidates by ranking score
        np.testing.assert_allclose(scores[i], [s for s, _ in by_rank], atol=1e-5)
        assert set(ids[i]) <= set(cands[i])  # only retrieved candidates are returned


@pytest.mark.integration
def test_bad_top_k_requests_get_a_clear_error_and_the_server_keeps_answering(retrieval_runs, published, served):
    name = "recsys_youtube"
    rec = published[name]
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


def test_the_mf_version_carries_its_faiss_index_and_serves_through_it(retrieval_runs, published, served):
    """model.retrieval.ann: the index is built at export, its recall against exact search is recorded
    in the version, and the served version searches with it (served == offline through the index is
    test_served_top_k_equals_offline_top_k_for_the_same_raw_request[recsys_mf])."""

    _, repo, summaries = retrieval_runs
    art = repo / "recsys_mf" / "1" / topk.TOPK_DIR
    meta = json.loads((art / "spec.json").read_text())["ann"]
    assert meta["index"] == "faiss" and meta["nlist"] == 8 and meta["nprobe"] == 2
    assert (art / ann.INDEX_FILE).is_file() and summaries["recsys_mf"]["ann"] == meta
    assert 0.0 <= meta["recall_at_k"] <= 1.0 and meta["queries"] == SMALL["export"]["parity_rows"]
    rec = published["recsys_mf"]
    assert rec.dir == art and rec.index is not None and rec.index.nprobe == 2
    for name in ("recsys_youtube", "recsys_two_stage"):  # exact search, the default below 100,000 items
        assert json.loads((repo / name / "1" / topk.TOPK_DIR / "spec.json").read_text())["ann"]["index"] == "exact"


@pytest.mark.parametrize("name", list(RUNS))
def test_exclusions_leaving_fewer_than_k_items_answer_only_valid_items(retrieval_runs, published, served, name):
    """exclude_item_ids leaving a row 2 allowed items (k is 10): the answer holds exactly those 2, best first,
    ``count`` 2, then the sentinel id -1 and score 0 -- never an excluded (or seen) id, never a -inf score;
    a row with every item excluded answers count 0. Exact, FAISS (MF) and two-stage (the re-ranker) alike."""
    rec = published[name]
    rows = _rows(retrieval_runs, name, rec, n=3)
    rows.loc[0, "user_id"] = 987654321  # unknown: no seen items
    seen = _seen(retrieval_runs, name)
    catalogue = rec.item_ids.tolist()
    allowed = [[i for i in catalogue if i not in seen.get(u, set())][:2] for u in rows["user_id"]]
    excl = [[i for i in catalogue if i not in keep] for keep in allowed]
    excl[2] = catalogue  # nothing left at all
    req = rows.assign(**{topk.EXCLUDE_INPUT: excl})
    for url, protocol in ((served.http_url, "http"), (served.grpc_url, "grpc")):
        with RecsysClient(url, protocol, name) as client:
            ids, scores, count = client.recommend(req, with_count=True)
        assert count.tolist() == [2, 2, 0], (protocol, count)
        assert np.isfinite(scores).all(), scores
        for i in range(2):
            assert sorted(ids[i, :2].tolist()) == sorted(allowed[i]) and scores[i, 0] >= scores[i, 1]
            assert ids[i, 2:].tolist() == [topk.PAD_INT_ID] * 8 and (scores[i, 2:] == topk.PAD_SCORE).all()
        assert ids[2].tolist() == [topk.PAD_INT_ID] * 10
        # what the valid part holds equals the in-process recommender's own answer
        want_ids, want_scores = rec.offline(req)
        np.testing.assert_array_equal(ids[:2, :2], want_ids[:2, :2])


def test_k_per_request_up_to_the_exported_k_and_out_of_range_refused(retrieval_runs, published, served):
    """The optional ``k`` input: 1..the exported k answers the first k items (the same as without k); 0 or
    more than the exported k is invalid-argument naming ``k``, on both protocols."""
    name = "recsys_youtube"
    rec = published[name]
    rows = _rows(retrieval_runs, name, rec, n=4)
    for url, protocol, status in ((served.http_url, "http", "400"),
                                  (served.grpc_url, "grpc", "StatusCode.INVALID_ARGUMENT")):
        with RecsysClient(url, protocol, name) as client:
            full_ids, full_scores, _ = client.recommend(rows, with_count=True)
            ids, scores, count = client.recommend(rows, k=3, with_count=True)
            assert ids.shape == scores.shape == (4, 3) and count.tolist() == [3] * 4
            np.testing.assert_array_equal(ids, full_ids[:, :3])
            np.testing.assert_allclose(scores, full_scores[:, :3], atol=1e-6, rtol=0)
            assert client.recommend(rows, k=rec.k)[0].shape == (4, rec.k)
            for bad in (0, rec.k + 1):
                with pytest.raises(BadRequestError, match=rf"input 'k' is {bad}; this version answers 1 to {rec.k}") as err:
                    client.recommend(rows, k=bad)
                assert err.value.status() == status


# -- user-id requests: the feature store each run filled after promotion ------------------------------------


def _art(retrieval_runs, name):
    return retrieval_runs[1] / name / "1" / topk.TOPK_DIR


@pytest.mark.integration
@pytest.mark.parametrize("name", ["recsys_youtube", "recsys_two_stage"])
def test_user_id_requests_equal_the_offline_top_k_of_the_users_training_rows(retrieval_runs, published, served, name):
    """Only the user id is sent; the served model reads the user's features and recent items (YouTube DNN's
    history) from the Feast store the flow's features stage filled; the answer equals the offline top-k of the
    user's full row read from the training data. An unknown id gets the cold-start answer and the flag.
    (REDIS_MODEL reads a Redis online store when redis-server is installed: fixture ``redis_store``.)"""
    from pipeline_lib.features import snapshot
    from pipeline_lib.features.store import store_state

    s, rec = retrieval_runs[2][name], published[name]
    assert s["feature_store"]["version"] == 1 and s["feature_store"]["online_store"] == "sqlite"
    assert store_state(Path(s["feature_store"]["repo"]))["version"] == 1
    assert "recsys recommend" in s["query"]["recommend"] and '"name":"user_id"' in s["query"]["curl_user"]
    art = _art(retrieval_runs, name)
    users = snapshot.stored_users(art, 6)
    ids = users + [snapshot.unknown_id(users)]
    want = topk.finish_top_k(*rec.offline(snapshot.offline_rows(art, ids)))
    for url, protocol in ((served.grpc_url, "grpc"), (served.http_url, "http")):
        with RecsysClient(url, protocol, name) as c:
            got_ids, got_scores, count, cold = c.recommend_user(ids, "user_id")
        assert cold.tolist() == [False] * len(users) + [True]
        np.testing.assert_array_equal(got_ids, want[0])
        np.testing.assert_allclose(got_scores, want[1], atol=1e-5)
    # exclusions and k work on user-id requests too; a full-feature request still answers (cold_start false)
    with RecsysClient(served.grpc_url, "grpc", name) as c:
        first = c.recommend_user(users[:1], "user_id")[0][0]
        again = c.recommend_user(users[:1], "user_id", k=3, exclude=[[first[0]]])[0][0]
        assert first[0] not in again and len(again) == 3
        full = c.recommend(snapshot.offline_rows(art, users[:2])[rec.request_columns])
    np.testing.assert_array_equal(full[0], want[0][:2])


@pytest.mark.integration
def test_recsys_recommend_prints_the_served_top_k_for_one_user_id(retrieval_runs, published, served):
    """`recsys recommend USER_ID` (a subprocess): the top items of the user-id request with the item features
    read from the store; --exclude and --k are sent with it."""
    import subprocess
    import sys

    from pipeline_lib.features import snapshot

    name = "recsys_two_stage"
    art = _art(retrieval_runs, name)
    user = snapshot.stored_users(art, 1)[0]
    first = topk.finish_top_k(*published[name].offline(snapshot.offline_rows(art, [user])))[0][0][0]
    row = snapshot.offline_rows(art, [user]).assign(exclude_item_ids=[[first]])
    want = topk.finish_top_k(*published[name].offline(row))[0][0][:3]
    out = subprocess.run([sys.executable, "-m", "flows.cli", "recommend", str(user), "--k", "3", "--exclude",
                          str(first), "--url", served.grpc_url, "--set", f"export.model_name={name}", "--set",
                          f"export.model_repository={retrieval_runs[1]}"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    lines = out.stdout.strip().splitlines()
    assert lines[0] == f"user {user}: top 3" and lines[1].split()[:2] == ["item_id", "score"]
    assert "item_category" in lines[1]  # item features from the store
    shown = [int(line.split()[0]) for line in lines[2:]]
    assert shown == want.tolist() and first not in shown


@pytest.mark.integration
def test_user_id_request_without_the_user_id_is_a_clear_bad_request(served):
    import tritonclient.http as httpclient

    c = httpclient.InferenceServerClient(served.http_url)
    k = httpclient.InferInput("k", [1], "INT32")
    k.set_data_from_numpy(np.array([3], dtype=np.int32))
    with pytest.raises(InferenceServerException, match="missing input 'user_id'") as exc:
        c.infer("recsys_youtube", [k])
    assert exc.value.status() == "400"
    c.close()


@pytest.mark.integration
def test_user_id_requests_through_redis_and_a_store_that_goes_away_is_503(retrieval_runs, published, served,
                                                                           redis_store):
    """REDIS_MODEL is served from a Redis online store (a real redis-server): same answer as offline (also checked
    by the parity test above); with Redis stopped, user-id requests get UNAVAILABLE (HTTP 503), full-feature
    requests still answer, the model never crashes. Last in the file: it stops the module's Redis."""
    from pipeline_lib.features import snapshot

    if redis_store is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run installs it)")
    rec, art = published[REDIS_MODEL], _art(retrieval_runs, REDIS_MODEL)
    assert json.loads((retrieval_runs[1] / REDIS_MODEL / "feature_store.json").read_text())["online_store"] == "redis"
    users = snapshot.stored_users(art, 4)
    want = topk.finish_top_k(*rec.offline(snapshot.offline_rows(art, users)))
    with RecsysClient(served.grpc_url, "grpc", REDIS_MODEL) as c:
        np.testing.assert_array_equal(c.recommend_user(users, "user_id")[0], want[0])
        redis_store.terminate()
        redis_store.wait(timeout=10)
        with pytest.raises(InferenceServerException, match="unavailable: feature store unreachable") as exc:
            c.recommend_user(users, "user_id")
        assert "UNAVAILABLE" in str(exc.value.status())
        full = c.recommend(snapshot.offline_rows(art, users)[rec.request_columns])
        np.testing.assert_array_equal(full[0], want[0])
    with RecsysClient(served.http_url, "http", REDIS_MODEL) as c:
        with pytest.raises(InferenceServerException) as exc:
            c.recommend_user(users, "user_id")
        assert exc.value.status() == "503"

@pytest.mark.integration
def test_every_top_k_family_returns_a_request_id_and_logs_what_it_answered(retrieval_runs, published, served):
    """Each top-k version (MF, YouTube DNN, two-stage) answers a request id and logs one record per row: the
    version, the row's user and exactly the items and scores it answered, best first."""
    tmp = retrieval_runs[0]
    answers = {}
    for name in RUNS:
        rows = _rows(retrieval_runs, name, published[name], n=3)
        with RecsysClient(served.grpc_url, "grpc", name) as client:
            ids, scores = client.recommend(rows)
            answers[name] = (client.last_request_id, rows["user_id"].astype(str).tolist(), ids, scores)
        assert answers[name][0]
    deadline, frame = time.time() + 30, None
    while time.time() < deadline:
        frame = impressions.read_impressions(tmp / "impressions")
        if set(frame.request_id) >= {a[0] for a in answers.values()}:
            break
        time.sleep(0.2)
    for name, (request_id, users, ids, scores) in answers.items():
        records = frame[frame.request_id == request_id]
        assert list(records.model) == [name] * 3 and set(records.version) == {1}
        assert list(records.user_id) == users
        for record, row_ids, row_scores in zip(records.itertuples(), ids, scores):
            assert list(record.item_ids) == [str(i) for i in row_ids] and list(record.ranks) == list(range(1, 11))
            np.testing.assert_allclose(record.scores, row_scores, atol=1e-6)
