"""Session-based next-item recommendation (task: session): ETL, model vs baselines, and the whole
flow with a real Triton server (served top-k == offline top-k). Real NVTabular, TensorFlow,
merlin-systems, Prefect and tritonserver; small data."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from pipeline_lib.data import sessions as session_data
from pipeline_lib.validate import sessions as session_checks
from pipeline_lib.etl import sessions
from pipeline_lib.config import SessionColumns, SessionSyntheticConfig, load_config

COLS = SessionColumns()


def _events() -> pd.DataFrame:
    """Hand-made log: session 10 arrives out of order, 20 has one event, 30 has 7 (max length 5)."""
    rows = [
        (10, 103, 1, 1_000), (10, 101, 1, 900), (10, 102, 2, 950),   # sorted: 101, 102, 103
        (20, 104, 3, 500),                                           # too short: dropped
        *[(30, 200 + j, j % 2, 2_000 + 10 * j * j) for j in range(7)],  # 7 events, deltas grow
        (40, 101, 1, 3_000), (40, 102, 2, 3_001),
    ]
    df = pd.DataFrame(rows, columns=["session_id", "item_id", "item_category", "timestamp"])
    return df.sample(frac=1.0, random_state=0).reset_index(drop=True)  # shuffled event order


def test_generator_is_deterministic_and_sequential():
    cfg = SessionSyntheticConfig(n_sessions=300, n_items=50, n_categories=5)
    a, b = session_data.generate_sessions(cfg, 7), session_data.generate_sessions(cfg, 7)
    pd.testing.assert_frame_equal(a, b)
    assert set(a.columns) == {"session_id", "item_id", "item_category", "timestamp"}
    lengths = a.groupby("session_id").size()
    assert lengths.min() >= cfg.min_length and lengths.max() <= cfg.max_length and len(lengths) == 300
    # learnable structure: the next item is far more predictable from the current one than by chance
    s = a.sort_values(["session_id", "timestamp"], kind="stable")
    pairs = pd.DataFrame({"a": s.item_id.to_numpy()[:-1], "b": s.item_id.to_numpy()[1:],
                          "same": (s.session_id.to_numpy()[:-1] == s.session_id.to_numpy()[1:])})
    pairs = pairs[pairs.same]
    top_share = pairs.groupby("a").b.agg(lambda x: x.value_counts().iloc[0] / len(x)).mean()
    assert top_share > 0.3
    # categories are a property of the item
    assert (a.groupby("item_id").item_category.nunique() == 1).all()


def test_session_etl_groups_sorts_filters_truncates_and_tags(tmp_path):
    from merlin.io import Dataset
    from merlin.schema import Tags

    events = tmp_path / "events.parquet"
    _events().to_parquet(events, index=False)
    cfg = load_config(None, {"task": "session", "split": {"method": "time", "valid_fraction": 0.34},
                             "session": {"etl": {"min_session_length": 2, "max_session_length": 5}}})
    out = sessions.run_session_etl(events, cfg, tmp_path / "transformed", tmp_path / "split")

    grouped = pd.read_parquet(out.sessions_path).set_index("session_id")
    assert sorted(grouped.index) == [10, 30, 40]  # session 20 (1 event) filtered out
    assert list(grouped.loc[10, "item_id"]) == [101, 102, 103]  # sorted by timestamp
    assert list(grouped.loc[10, "item_category"]) == [1, 2, 1]
    assert list(grouped.loc[10, "timestamp"]) == [900, 950, 1_000]
    assert len(grouped.loc[30, "item_id"]) == 7  # raw sessions keep every event; the feature workflow truncates

    # the fitted feature workflow on one raw session: last 5 events, time deltas log1p(seconds)
    import nvtabular as nvt

    wf = nvt.Workflow.load(str(out.workflow_dir))
    raw30 = grouped.loc[[30], ["item_id", "item_category", "timestamp"]].reset_index(drop=True)
    t = wf.transform(Dataset(raw30, cpu=True)).to_ddf().compute()
    assert len(t["item_id"].iloc[0]) == 5
    ts = np.array(grouped.loc[30, "timestamp"], dtype=float)
    want = np.log1p(np.diff(ts, prepend=ts[0]))[-5:]
    np.testing.assert_allclose(t[sessions.TIME_DELTA].iloc[0], want, rtol=1e-6)
    vocab = sessions.item_vocabulary(wf, "item_id")
    decoded = [vocab[i] for i in t["item_id"].iloc[0]]
    assert decoded == list(grouped.loc[30, "item_id"][-5:])  # session 30 is a training session
    held_out = pd.DataFrame({"item_id": [[101, 999]], "item_category": [[1, 1]], "timestamp": [[1, 2]]})
    enc = wf.transform(Dataset(held_out, cpu=True)).to_ddf().compute()["item_id"].iloc[0]
    assert vocab[enc[0]] == 101 and enc[1] == 2  # an item unseen in training maps to the OOV index

    # split by session (time): the session that starts last is held out
    tr, va = pd.read_parquet(out.split.train), pd.read_parquet(out.split.valid)
    assert sorted(tr.session_id) == [10, 30] and list(va.session_id) == [40]

    # the Merlin schema marks the list features
    schema = Dataset(str(out.train_dir), engine="parquet").schema
    for name in ("item_id", "item_category", sessions.TIME_DELTA):
        col = schema[name]
        assert col.is_list and col.is_ragged, name
        assert {Tags.SEQUENCE, Tags.LIST} <= set(col.tags), name
        assert col.shape.dims[1].max == 5, name
    assert schema.select_by_tag(Tags.ITEM_ID).column_names == ["item_id"]
    assert Tags.CATEGORICAL in schema["item_category"].tags
    assert Tags.CONTINUOUS in schema[sessions.TIME_DELTA].tags
    assert (out.grouping_workflow_dir / "workflow.pkl").exists() and (out.workflow_dir / "workflow.pkl").exists()


def test_time_split_holds_out_the_latest_sessions(tmp_path):
    df = pd.DataFrame({"session_id": [1, 2, 3, 4, 5], "item_id": [[1, 2]] * 5, "item_category": [[1, 1]] * 5,
                       "timestamp": [[t, t + 1] for t in (50, 10, 40, 20, 30)]})
    df.to_parquet(tmp_path / "s.parquet", index=False)
    cfg = load_config(None, {"task": "session", "split": {"method": "time", "valid_fraction": 0.4}})
    out = sessions.split_sessions(tmp_path / "s.parquet", cfg.split, COLS, 0, tmp_path / "split")
    assert sorted(pd.read_parquet(out.valid).session_id) == [1, 3]


def test_top_k_never_returns_the_session_items_or_the_requested_exclusions():
    from pipeline_lib.models.session import N_SPECIAL, exclusions, mask_scores, top_k, vocabulary_lookup

    vocab = np.array([None, None, None, 101, 102, 103, 104], dtype=object)  # encoded 3..6
    lookup = vocabulary_lookup(vocab)
    seen = [[103, 999], [], np.array([101, 102, 103])]  # 999: unknown, ignored
    extra = [[], [b"104"], [104]]  # bytes as Triton hands string ids over (no match here: int vocabulary)
    excl = exclusions(lookup, seen, extra, 3)
    assert [e.tolist() for e in excl] == [[5], [], [3, 4, 5, 6]]
    assert exclusions(lookup, None, [[], [], []], 3) is None
    scores = np.array([[9, 9, 9, 1, 2, 3, 4], [9, 9, 9, 4, 3, 2, 1], [9, 9, 9, 1, 2, 3, 4]], dtype=np.float32)
    idx, best = top_k(scores, 3, excl)
    assert idx[0].tolist() == [6, 4, 3]  # 103 (encoded 5) was in the session; specials never ranked
    assert idx[1].tolist() == [3, 4, 5]
    # every item excluded: the excluded ones last at -inf (ties by index), the special slots after them
    assert idx[2].tolist() == [3, 4, 5] and np.isneginf(best[2]).all()
    assert top_k(scores[:1], 6, None)[0][0].tolist() == [6, 5, 4, 3, 0, 1]
    m = mask_scores(scores, excl)
    assert (m[:, :N_SPECIAL] < -1e8).all() and m[0, 5] < -1e8 and m[0, 6] == 4


@pytest.fixture(scope="module")
def session_etl(tmp_path_factory):
    root = tmp_path_factory.mktemp("sess")
    cfg = load_config(None, {"task": "session", "session": {
        "synthetic": {"n_sessions": 3000, "n_items": 200, "n_categories": 10},
        "model": {"epochs": 6, "batch_size": 128}}})
    raw = session_data.write_raw_events(cfg.data, cfg.session, cfg.seed, root / "raw")
    return cfg, root, sessions.run_session_etl(raw, cfg, root / "transformed", root / "split")


@pytest.mark.parametrize("kind", ["gru", "transformer"])
def test_model_trains_and_beats_the_popularity_baseline(session_etl, kind):
    from pipeline_lib.models import session as session_model

    cfg, root, etl_out = session_etl
    cfg = cfg.model_copy(update={"session": cfg.session.model_copy(update={
        "model": cfg.session.model.model_copy(update={"type": kind})})})
    out = session_model.train_and_evaluate(etl_out, cfg, root / f"model_{kind}")
    m = out.metrics
    assert m["model"] == f"session_{kind}" and (out.model_dir / "saved_model.pb").exists()
    pop = m["baselines"]["most_popular"]
    # measured here: recall@10 0.71 (GRU) / 0.77 (transformer) vs 0.46 for most popular
    assert m["recall@10"] > pop["recall@10"] + 0.15, m
    assert m["ndcg@10"] > pop["ndcg@10"] + 0.1, m
    assert 0 < m["mrr@10"] <= m["ndcg@10"] <= m["recall@10"] <= 1
    assert out.history["loss"][-1] < out.history["loss"][0]


def test_the_session_workflow_compiles_to_the_numpy_serving_transform(session_etl):
    """Categorify on lists, ListSlice to the last max_length events, the time-delta lambda and the
    rename: the compiled transform equals NVTabular on held-out sessions plus edge rows (empty
    sessions, unseen items, every vocabulary entry), and truncation keeps the *last* events."""
    import nvtabular as nvt

    from pipeline_lib.export import ranking as export
    from pipeline_lib.etl.fast_transform import Ragged, compile_workflow, verify

    cfg, _, etl_out = session_etl
    wf = nvt.Workflow.load(str(etl_out.workflow_dir))
    compiled = compile_workflow(wf)
    raw = pd.read_parquet(etl_out.split.valid)[wf.input_schema.column_names].head(200).reset_index(drop=True)
    assert verify(compiled, wf, raw, export.raw_to_columns) > len(raw)
    n = cfg.session.etl.max_session_length
    long = raw.iloc[[0]].copy()
    long["item_id"] = [list(raw.item_id[0]) * (n + 3)]
    long["item_category"] = [list(raw.item_category[0]) * (n + 3)]
    long["timestamp"] = [list(range(0, 10 * len(long.item_id[0]), 10))]
    out = compiled(export.raw_to_columns(long))
    assert isinstance(out["item_id"], Ragged) and len(out["item_id"].values) == n
    deltas = out[sessions.TIME_DELTA].values
    assert deltas.dtype == np.float32 and np.allclose(deltas, np.log1p(10.0))  # the first events were cut
    assert verify(compiled, wf, long, export.raw_to_columns) >= 1


# --- the whole flow with a real Triton server ---------------------------------------------------


@pytest.mark.integration
def test_session_flow_end_to_end_served_topk_equals_offline(prefect_harness, tmp_path):
    import os

    import nvtabular as nvt
    from flows.pipeline import pipeline
    from pipeline_lib.serving import repository
    from pipeline_lib.serving.server import TritonServer
    from pipeline_lib.serving.session_client import SessionClient
    from pipeline_lib.export.session import offline_topk

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    over = {"runs_dir": str(tmp_path / "runs"), "run_name": "s1",
            "export": {"model_repository": str(tmp_path / "repo"), "parity_rows": 32},
            "serving": {"notify_live_server": False}, "gate": {"require_beat_baseline": False},
            "session": {"synthetic": {"n_sessions": 1500, "n_items": 150, "n_categories": 8},
                        "model": {"epochs": 1}}}
    config = os.path.join(root, "configs", "examples", "session.yaml")
    untrained = {"epochs": 1, "learning_rate": 1e-9, "popularity_prior": False}
    worse = {**over, "run_name": "s2", "session": {**over["session"], "model": untrained}}
    summary = pipeline(config_path=config, overrides=over)
    refused = pipeline(config_path=config, overrides=worse)  # an untrained (random) candidate must not replace v1
    g = refused["gate"]
    assert not g["promote"] and g["served_version"] == 1 and g["candidate"] < g["served"], g
    assert "serving-smoke-test" not in refused["stage_seconds"] and refused["predictions"] is None
    run = tmp_path / "runs" / "s1"
    assert list(summary["stage_seconds"]) == ["raw-data", "validate", "etl", "train", "export", "gate",
                                              "serving-smoke-test", "publish", "promote"]
    assert summary["task"] == "session" and summary["model"] == "session_gru"
    assert set(summary["baselines"]) == {"most_popular", "cooccurrence"}  # same shape as the other families
    assert all(0 <= b["recall@10"] <= 1 for b in summary["baselines"].values())
    assert summary["lift"].startswith(f"session_gru recall@10 {summary['metrics']['recall@10']:.4f} is ")
    assert json.loads((run / "model" / "metrics.json").read_text())["metrics"]["lift"] == summary["lift"]
    assert summary["gate"]["promote"] and summary["model_version"] == 1 and summary["served_topk_equals_offline"]
    assert summary["max_abs_diff_served_vs_offline"] <= 1e-5
    for f in ["raw/interactions.parquet", "validated/stats.json", "transformed/sessions/sessions.parquet",
              "transformed/sessions/grouping_workflow/workflow.pkl", "transformed/workflow/workflow.pkl",
              "transformed/train/schema.pbtxt", "model/model/saved_model.pb", "model/metrics.json",
              "serving/smoke.json", "summary.json"]:
        assert (run / f).exists(), f
    assert (run / "model" / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    info = json.loads((tmp_path / "repo" / "recsys_session" / "1" / "run_info.json").read_text())
    assert info["fast_transform"]["enabled"] is True, info["fast_transform"]  # served through the compiled transform
    preds = summary["predictions"]
    for proto in ("served_http", "served_grpc"):
        assert [list(x) for x in preds[proto]] == [list(x) for x in preds["offline"]]

    # the published version, served by a fresh Triton: raw sessions in, top-k raw item ids out
    repo = tmp_path / "repo"
    assert repository.served_version(repo, "recsys_session") == 1
    valid = pd.read_parquet(run / "split" / "valid.parquet").head(20)
    req, _ = sessions.prefixes(valid, COLS)
    req.loc[0, "item_id"] = [987654, *req.loc[0, "item_id"][1:]]  # an unseen item id maps to OOV as in training
    wf = nvt.Workflow.load(str(run / "transformed" / "workflow"))
    want_ids, want_scores = offline_topk(wf, run / "model" / "model", req, "item_id", 10)
    vocab = set(pd.read_parquet(run / "split" / "train.parquet")["item_id"].explode())
    assert set(want_ids.ravel()) <= vocab  # raw ids of trained items, never special/OOV slots
    # session.exclude_seen (default on): never an item of the session so far, offline and served
    assert not any(set(r) & set(p) for r, p in zip(want_ids.tolist(), req["item_id"]))
    more = req.assign(exclude_item_ids=[list(r[:4]) + [987654] for r in want_ids.tolist()])  # + an unknown id
    more_ids, more_scores = offline_topk(wf, run / "model" / "model", more, "item_id", 10)
    assert [r[:6] for r in more_ids.tolist()] == [r[4:] for r in want_ids.tolist()]
    metrics = json.loads((run / "model" / "metrics.json").read_text())
    assert metrics["metrics"]["exclude_seen"] is True
    assert metrics["baseline_comparison"]["protocol"]["exclude_seen"] is True  # baselines: the same protocol
    server = TritonServer.on_free_ports(repo, log_file=tmp_path / "triton.log", model_control="explicit", load_models=["recsys_session"])
    with server.start(timeout_s=240, models=["recsys_session"]):
        for proto, url in (("http", server.http_url), ("grpc", server.grpc_url)):
            with SessionClient(url, proto, "recsys_session") as client:
                ids, scores = client.recommend(req)
                one_ids, _ = client.recommend(req.head(1).to_dict(orient="records"))
                got_more = client.recommend(more)
            np.testing.assert_array_equal(ids, want_ids)
            np.testing.assert_allclose(scores, want_scores, atol=1e-5, rtol=0)
            np.testing.assert_array_equal(one_ids, want_ids[:1])
            np.testing.assert_array_equal(got_more[0], more_ids)
            np.testing.assert_allclose(got_more[1], more_scores, atol=1e-5, rtol=0)


def test_session_config_is_additive_and_the_example_loads():
    import os

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    assert load_config(os.path.join(root, "configs", "default.yaml")).task == "ranking"
    cfg = load_config(os.path.join(root, "configs", "examples", "session.yaml"))
    assert cfg.task == "session" and cfg.export.model_name == "recsys_session"
    assert cfg.session.model.type == "gru" and cfg.session.top_k == 10
    assert load_config(None, {"task": "session", "session": {"model": {"type": "transformer"}}}).session.model.type == "transformer"
    with pytest.raises(Exception, match="movielens100k|synthetic, parquet or files"):
        load_config(None, {"task": "session", "data": {"source": "movielens100k", "path": "x"}})


def test_user_event_log_from_csv_with_an_items_table(tmp_path):
    from pipeline_lib.errors import DataValidationError

    (tmp_path / "events.csv").write_text("sid,item_id,ts\n1,7,2024-01-01T10:00:00\n1,8,2024-01-01T10:01:00\n2,7,2024-01-02T09:00:00\n")
    (tmp_path / "items.csv").write_text("item_id,item_category\n7,shoes\n8,socks\n")
    cfg = load_config(None, {"task": "session", "data": {"source": "files",
        "interactions": {"path": str(tmp_path / "events.csv"), "rename": {"sid": "session_id", "ts": "timestamp"}},
        "items": {"path": str(tmp_path / "items.csv")}}})
    raw = session_data.write_raw_events(cfg.data, cfg.session, cfg.seed, tmp_path / "raw")
    df = pd.read_parquet(raw)
    assert list(df.item_category) == ["shoes", "socks", "shoes"]
    assert df.timestamp.tolist()[1] - df.timestamp.tolist()[0] == 60  # dates -> epoch seconds
    session_checks.validate_events(raw, COLS, tmp_path / "validated")
    df.drop(columns=["item_category"]).to_parquet(tmp_path / "bad.parquet")
    with pytest.raises(DataValidationError, match="item_category.*required column is missing"):
        session_checks.validate_events(tmp_path / "bad.parquet", COLS, tmp_path / "validated")


@pytest.mark.integration
def test_string_item_ids_are_served_like_offline(tmp_path):
    """Item ids as strings (BYTES on the wire, in and out): Triton's top-k == offline top-k, with the
    session's own items excluded (session.exclude_seen, default on) and with extra exclude_item_ids."""
    from pipeline_lib.export import ranking as ranking_export
    from pipeline_lib.serving import repository
    from pipeline_lib.models import session as session_model
    from pipeline_lib.export import session as ssm
    from pipeline_lib.serving.server import TritonServer
    from pipeline_lib.serving.session_client import SessionClient

    ev = session_data.generate_sessions(SessionSyntheticConfig(n_sessions=600, n_items=60, n_categories=5), 3)
    ev["item_id"] = "sku-" + ev["item_id"].astype(str)
    ev.to_parquet(tmp_path / "events.parquet")
    cfg = load_config(None, {"task": "session", "data": {"source": "parquet", "path": str(tmp_path / "events.parquet")},
                             "session": {"model": {"epochs": 1, "hidden_dim": 16, "embedding_dim": 16}}})
    raw = session_data.write_raw_events(cfg.data, cfg.session, cfg.seed, tmp_path / "raw")
    etl_out = sessions.run_session_etl(raw, cfg, tmp_path / "transformed", tmp_path / "split")
    model = session_model.train_and_evaluate(etl_out, cfg, tmp_path / "model")
    req, _ = sessions.prefixes(pd.read_parquet(etl_out.split.valid).head(12), COLS)
    exp = ssm.export_session_ensemble(etl_out.workflow_dir, model.model_dir, req, "item_id", 5, tmp_path / "staged", "sess")
    repo = tmp_path / "repo"
    repository.publish(exp.version_dir, exp.config_path, repo, "sess")
    repository.promote(repo, "sess", 1)
    import nvtabular as nvt

    wf = nvt.Workflow.load(str(etl_out.workflow_dir))
    want_ids, want_scores = ssm.offline_topk(wf, model.model_dir, req, "item_id", 5)
    assert all(isinstance(v, str) and v.startswith("sku-") for v in want_ids.ravel())
    assert not any(set(r) & set(p) for r, p in zip(want_ids.tolist(), req["item_id"]))  # never an item of the session
    plain_ids, _ = ssm.offline_topk(wf, model.model_dir, req, "item_id", 5, exclude_seen=False)
    assert any(set(r) & set(p) for r, p in zip(plain_ids.tolist(), req["item_id"]))  # without it they come back
    more = req.assign(exclude_item_ids=[list(r[:2]) + ["sku-unknown"] for r in want_ids.tolist()])
    more_ids, more_scores = ssm.offline_topk(wf, model.model_dir, more, "item_id", 5)
    assert [r[:3] for r in more_ids.tolist()] == [r[2:] for r in want_ids.tolist()]  # the next best move up
    server = TritonServer.on_free_ports(repo, log_file=tmp_path / "triton.log")
    with server.start(timeout_s=240, models=["sess"]):
        for proto, url in (("http", server.http_url), ("grpc", server.grpc_url)):
            with SessionClient(url, proto, "sess") as client:
                ids, scores = client.recommend(req)
                got_more = client.recommend(more)
                _assert_bad_requests_are_client_errors(client, req, proto)
            assert ids.tolist() == want_ids.tolist()
            np.testing.assert_allclose(scores, want_scores, atol=1e-5, rtol=0)
            assert got_more[0].tolist() == more_ids.tolist()
            np.testing.assert_allclose(got_more[1], more_scores, atol=1e-5, rtol=0)
    assert ranking_export.load_version(repo / "sess" / "1") is not None


def _assert_bad_requests_are_client_errors(client, req: pd.DataFrame, protocol: str) -> None:
    """The session model's request checks answer invalid-argument (HTTP 400 / gRPC INVALID_ARGUMENT)
    with their message, and the model keeps answering."""
    from tritonclient.utils import InferenceServerException

    from pipeline_lib.serving.client import BadRequestError

    status = "400" if protocol == "http" else "StatusCode.INVALID_ARGUMENT"
    arrays = client.to_arrays(req.head(3))
    offsets = next(k for k in arrays if k.endswith("__offsets"))
    arrays[offsets] = arrays[offsets][::-1].copy()
    with pytest.raises(InferenceServerException) as err:  # plain tritonclient
        client._client.infer(client.model_name, client.inputs_from_arrays(arrays))
    assert err.value.status() == status
    assert err.value.message() == f"bad request: input '{offsets}' must start at 0 (got [{int(arrays[offsets][0])}])"
    with pytest.raises(BadRequestError, match=r"^\[[\w.]+\] bad request: empty batch: the request has 0 rows$") as err:
        client.recommend(req.head(0))
    assert err.value.status() == status
    # a bad exclude_item_ids list: one half only, or fewer rows than the sessions -> invalid argument
    half = client.to_arrays(req.head(3))
    half["exclude_item_ids__values"] = np.array([b"sku-1"], dtype=object)
    with pytest.raises(InferenceServerException, match="exclude_item_ids__values' without its other half") as err:
        client._client.infer(client.model_name, client.inputs_from_arrays(half))
    assert err.value.status() == status
    short = req.head(3).assign(exclude_item_ids=[["sku-1"], [], []])
    arrays = client.to_arrays(short)
    arrays["exclude_item_ids__offsets"] = arrays["exclude_item_ids__offsets"][:-1].copy()  # 2 rows, not 3
    with pytest.raises(InferenceServerException, match="different row counts") as err:
        client._client.infer(client.model_name, client.inputs_from_arrays(arrays))
    assert err.value.status() == status
    assert client.recommend(req.head(2))[0].shape[0] == 2
