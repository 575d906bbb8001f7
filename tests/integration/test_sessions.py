"""Session-based next-item recommendation (task: session): ETL, model vs baselines, and the whole
flow with a real Triton server (served top-k == offline top-k). Real NVTabular, TensorFlow,
merlin-systems, Prefect and tritonserver; small data."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline_lib.data import sessions as session_data
from pipeline_lib.etl import sessions
from pipeline_lib.config import SessionColumns, SessionSyntheticConfig, load_config
from tests.support import ROOT

pytestmark = pytest.mark.integration

COLS = SessionColumns()


# --- the whole flow, and the published versions served by one real Triton server -----------------
#
# One module: two flow runs (a trained version, then an untrained candidate the gate refuses), a
# version with string item ids exported and published directly, and one Triton (explicit model
# control) that loads each published version when its test first asks for it.


@pytest.fixture(scope="module")
def repos(tmp_path_factory) -> dict:
    """The module's two model repositories: the flow runs' and the string-id version's."""
    root = tmp_path_factory.mktemp("session_repos")
    out = {"flow": root / "flow_repo", "strings": root / "string_repo"}
    for repo in out.values():
        repo.mkdir()
    return out


@pytest.fixture(scope="module")
def session_runs(prefect_harness, repos, tmp_path_factory):
    """Run s1 publishes and serves version 1; run s2 (an untrained model, same data: the ETL is cached)
    is refused by the gate, so version 1 keeps serving. Returns (tmp, s1 summary, s2 summary)."""
    from flows.pipeline import pipeline

    tmp = tmp_path_factory.mktemp("session_flow")
    over = {"runs_dir": str(tmp / "runs"), "run_name": "s1",
            "export": {"model_repository": str(repos["flow"]), "parity_rows": 32},
            "serving": {"notify_live_server": False}, "gate": {"require_beat_baseline": False},
            "session": {"synthetic": {"n_sessions": 1500, "n_items": 150, "n_categories": 8},
                        "model": {"epochs": 1}}}
    config = str(ROOT / "configs" / "examples" / "session.yaml")
    untrained = {"epochs": 1, "learning_rate": 1e-9, "popularity_prior": False}
    worse = {**over, "run_name": "s2", "session": {**over["session"], "model": untrained}}
    summary = pipeline(config_path=config, overrides=over)
    refused = pipeline(config_path=config, overrides=worse)  # an untrained (random) candidate must not replace v1
    return tmp, summary, refused


@pytest.fixture(scope="module")
def triton(repos):
    """One Triton for the module over both repositories, explicit model control: a test loads the
    published version it checks with :func:`_load` (started when a test first needs it)."""
    from pipeline_lib.serving.server import TritonServer

    server = TritonServer.on_free_ports(repos["flow"], log_file=repos["flow"].parent / "triton.log",
                                        model_control="explicit", extra_args=[f"--model-repository={repos['strings']}"])
    with server.start(timeout_s=240):
        yield server


def _load(server, name: str) -> None:
    """Load (serve) the promoted version of ``name`` on the running server; blocks until it is ready."""
    import tritonclient.http as httpclient

    from pipeline_lib.serving.admin_key import ADMIN_HEADER

    with httpclient.InferenceServerClient(server.http_url, network_timeout=240.0, connection_timeout=240.0) as c:
        c.load_model(name, headers={ADMIN_HEADER: server.admin_api_key})  # the API is restricted by default
        assert c.is_model_ready(name)


@pytest.mark.integration
def test_session_flow_runs_every_stage_and_serves_top_k_equal_to_offline(session_runs):
    tmp, summary, _ = session_runs
    run = tmp / "runs" / "s1"
    assert list(summary["stage_seconds"]) == ["raw-data", "validate", "etl", "train", "export", "gate",
                                              "serving-smoke-test", "publish", "promote", "features"]
    # no users in a session request: the store holds the item features only (looked up by item id)
    assert summary["feature_store"]["users"] == 0 and summary["feature_store"]["items"] > 0
    assert summary["task"] == "session" and summary["model"] == "session_gru"
    # same shape as the other families; the classical session types on the same held-out prefixes
    assert set(summary["baselines"]) == {"most_popular", "cooccurrence", "session_knn", "sequential_rules"}
    assert all(0 <= b["recall@10"] <= 1 for b in summary["baselines"].values())
    assert summary["lift"].startswith(f"session_gru recall@10 {summary['metrics']['recall@10']:.4f} is ")
    assert json.loads((run / "model" / "metrics.json").read_text())["metrics"]["lift"] == summary["lift"]
    assert summary["gate"]["promote"] and summary["model_version"] == 1 and summary["served_topk_equals_offline"]
    # the headline: the held-out test sessions, with intervals; the validation figures labelled apart
    assert summary["metrics_split"] == "test" and summary["metrics"]["n_test"] == summary["split"]["test"]["sessions"]
    assert summary["intervals"]["recall@10"].startswith(f"{summary['metrics']['recall@10']:.4f} [")
    assert "recall@10" in summary["validation_metrics"] and (run / "split" / "test.parquet").exists()
    assert summary["max_abs_diff_served_vs_offline"] <= 1e-5
    for f in ["raw/interactions.parquet", "validated/stats.json", "transformed/sessions/sessions.parquet",
              "transformed/sessions/grouping_workflow/workflow.pkl", "transformed/workflow/workflow.pkl",
              "transformed/train/schema.pbtxt", "model/model/saved_model.pb", "model/metrics.json",
              "serving/smoke.json", "summary.json"]:
        assert (run / f).exists(), f
    assert (run / "model" / "learning_curve.png").read_bytes()[:4] == b"\x89PNG"
    info = json.loads((Path(summary["served_dir"]) / "run_info.json").read_text())
    assert info["fast_transform"]["enabled"] is True, info["fast_transform"]  # served through the compiled transform
    preds = summary["predictions"]
    for proto in ("served_http", "served_grpc"):
        assert [list(x) for x in preds[proto]] == [list(x) for x in preds["offline"]]
    metrics = json.loads((run / "model" / "metrics.json").read_text())
    assert metrics["metrics"]["exclude_seen"] is True
    assert metrics["baseline_comparison"]["protocol"]["exclude_seen"] is True  # baselines: the same protocol


@pytest.mark.integration
def test_an_untrained_session_candidate_is_refused_and_version_1_keeps_serving(session_runs, repos):
    from pipeline_lib.serving import repository

    _, _, refused = session_runs
    g = refused["gate"]
    assert not g["promote"] and g["served_version"] == 1 and g["candidate"] < g["served"], g
    assert g["outcome"] in ("refused", "inconclusive") and "version 1 keeps serving" in g["reason"]
    assert "serving-smoke-test" not in refused["stage_seconds"] and refused["predictions"] is None
    assert repository.served_version(repos["flow"], "recsys_session") == 1


@pytest.mark.integration
def test_the_published_session_version_is_served_like_offline(session_runs, repos, triton):
    """Raw sessions in, top-k raw item ids out, from the published version 1 loaded by a Triton that
    never served the staged copy; == that version's own offline reference."""
    from pipeline_lib.export.session import SessionRecommender
    from pipeline_lib.export.topk import TOPK_DIR
    from pipeline_lib.serving.session_client import SessionClient

    tmp, _, _ = session_runs
    server = triton
    run = tmp / "runs" / "s1"
    valid = pd.read_parquet(run / "split" / "valid.parquet").head(20)
    req, _ = sessions.prefixes(valid, COLS)
    req.loc[0, "item_id"] = [987654, *req.loc[0, "item_id"][1:]]  # an unseen item id maps to OOV as in training
    rec = SessionRecommender(repos["flow"] / "recsys_session" / "1" / TOPK_DIR)  # the published version's own reference
    want_ids, want_scores = rec.offline(req)
    vocab = set(pd.read_parquet(run / "split" / "train.parquet")["item_id"].explode())
    assert set(want_ids.ravel()) <= vocab  # raw ids of trained items, never special/OOV slots
    # session.exclude_seen (default on): never an item of the session so far, offline and served
    assert not any(set(r) & set(p) for r, p in zip(want_ids.tolist(), req["item_id"]))
    more = req.assign(exclude_item_ids=[list(r[:4]) + [987654] for r in want_ids.tolist()])  # + an unknown id
    more_ids, more_scores = rec.offline(more)
    assert [r[:6] for r in more_ids.tolist()] == [r[4:] for r in want_ids.tolist()]
    _load(server, "recsys_session")
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


@pytest.mark.integration
def test_session_requests_without_item_features_get_them_from_the_store(session_runs, repos, triton):
    """A session request with its item ids and timestamps only: the served model looks each event's item features up
    by item id in the store the flow's features stage filled; the answer equals the offline top-k of the same sessions
    with the item features of the training data (an unknown item: the snapshot's out-of-vocabulary value)."""
    from pipeline_lib.export.session import SessionRecommender
    from pipeline_lib.export.topk import TOPK_DIR
    from pipeline_lib.features import snapshot
    from pipeline_lib.features.sessions import UNKNOWN_INT
    from pipeline_lib.serving.session_client import SessionClient

    tmp, summary, _ = session_runs
    art = repos["flow"] / "recsys_session" / "1" / TOPK_DIR
    assert summary["feature_store"]["version"] == 1
    stored = pd.read_parquet(snapshot.snapshot_dir(art) / snapshot.ITEMS_FILE).set_index("item_id")["item_category"]
    req, _ = sessions.prefixes(pd.read_parquet(tmp / "runs" / "s1" / "split" / "valid.parquet").head(12), COLS)
    req.loc[0, "item_id"] = [987654, *req.loc[0, "item_id"][1:]]
    full = req.assign(item_category=[[int(stored.get(i, UNKNOWN_INT)) for i in s] for s in req["item_id"]])
    want_ids, want_scores = SessionRecommender(art).offline(full)
    _load(triton, "recsys_session")
    for proto, url in (("http", triton.http_url), ("grpc", triton.grpc_url)):
        with SessionClient(url, proto, "recsys_session") as client:
            ids, scores = client.recommend(req.drop(columns=["item_category"]))
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(scores, want_scores, atol=1e-5, rtol=0)
    _store_faults_are_unavailable(Path(summary["feature_store"]["repo"]), repos["flow"], art, triton, req, full,
                                  want_ids)


def _store_faults_are_unavailable(fs_repo: Path, repo: Path, art: Path, server, req, full, want_ids) -> None:
    """The store holds another version's snapshot, then cannot be read (its item table gone): a session request
    without item features gets UNAVAILABLE (HTTP 503), never another version's features; one that carries them
    still answers. The store is put back as the flow left it."""
    import shutil
    import sqlite3

    from tritonclient.utils import InferenceServerException

    from pipeline_lib.features import snapshot, stage, store
    from pipeline_lib.serving.session_client import SessionClient

    def check(match: str) -> None:
        for proto, url, status in (("http", server.http_url, "503"), ("grpc", server.grpc_url, "UNAVAILABLE")):
            with SessionClient(url, proto, "recsys_session") as client:
                with pytest.raises(InferenceServerException, match=match) as exc:
                    client.recommend(req.drop(columns=["item_category"]))
                assert status in str(exc.value.status()), (proto, exc.value)
                np.testing.assert_array_equal(client.recommend(full)[0], want_ids)

    other = fs_repo.parent / "other_version" / "topk"  # version 1's tables under another snapshot id
    shutil.copytree(snapshot.snapshot_dir(art), snapshot.snapshot_dir(other))
    meta = json.loads((snapshot.snapshot_dir(other) / snapshot.META_FILE).read_text())
    (snapshot.snapshot_dir(other) / snapshot.META_FILE).write_text(json.dumps({**meta, "id": "another-snapshot"}))
    table = f"{store.project_name(fs_repo)}_{store.ITEM_VIEW}"
    try:
        store.materialize(store.read_pointer(repo / "recsys_session"), other, 2)
        check("holds version 2's features")
        stage.restore(repo, "recsys_session", 1)
        with sqlite3.connect(fs_repo / "online.db") as db:
            db.execute(f"ALTER TABLE {table} RENAME TO {table}_gone")
        check("feature store unreachable")
    finally:
        with sqlite3.connect(fs_repo / "online.db") as db:
            if db.execute("SELECT 1 FROM sqlite_master WHERE name = ?", (f"{table}_gone",)).fetchone():
                db.execute(f"ALTER TABLE {table}_gone RENAME TO {table}")
        stage.restore(repo, "recsys_session", 1)
    assert store.store_state(fs_repo)["version"] == 1


@pytest.mark.integration
def test_string_item_ids_are_served_like_offline(tmp_path, repos, triton):
    """Item ids as strings (BYTES on the wire, in and out): Triton's top-k == offline top-k, with the
    session's own items excluded (session.exclude_seen, default on) and with extra exclude_item_ids."""
    from pipeline_lib.paths import TRITON_MODELS
    from pipeline_lib.serving import repository
    from pipeline_lib.models import session as session_model
    from pipeline_lib.export import session as ssm
    from pipeline_lib.export import topk
    from pipeline_lib.export.topk import TOPK_DIR
    from pipeline_lib.release import session_gate
    from pipeline_lib.serving.session_client import SessionClient

    server = triton
    ev = session_data.generate_sessions(SessionSyntheticConfig(n_sessions=600, n_items=60, n_categories=5), 3)
    ev["item_id"] = "sku-" + ev["item_id"].astype(str)
    ev.to_parquet(tmp_path / "events.parquet")
    cfg = load_config(None, {"task": "session", "data": {"source": "parquet", "path": str(tmp_path / "events.parquet")},
                             "session": {"model": {"epochs": 1, "hidden_dim": 16, "embedding_dim": 16}}})
    raw = session_data.write_raw_events(cfg.data, cfg.session, cfg.seed, tmp_path / "raw")
    etl_out = sessions.run_session_etl(raw, cfg, tmp_path / "transformed", tmp_path / "split")
    model = session_model.train_and_evaluate(etl_out, cfg, tmp_path / "model")
    req, _ = sessions.prefixes(pd.read_parquet(etl_out.split.valid).head(12), COLS)
    exp = ssm.export_session_topk(etl_out.workflow_dir, model.model_dir, req, "item_id", 5, tmp_path / "staged", "sess")
    repo = repos["strings"]
    repository.publish(exp.version_dir, exp.config_path, repo, "sess")
    repository.promote(repo, "sess", 1)
    rec = exp.recommender  # the recommender export checked (the published version is its copy)
    assert rec.fast is not None and rec.item_ids.dtype == object  # string ids: the compiled transform serves
    # the gate scores the staged candidate with it: the same figures as a fresh load of the version
    assert rec.dir == exp.version_dir / TOPK_DIR and topk.loaded_recommender(exp, exp.version_dir) is rec
    assert rec.fast_status == json.loads((rec.dir / "spec.json").read_text())["fast_transform"]
    assert topk.loaded_recommender(exp, repo / "sess" / "1") is None
    valid = pd.read_parquet(etl_out.split.valid).head(60)
    assert session_gate.score_version(exp.version_dir, valid, COLS, 5, rec=rec) == \
        session_gate.score_version(repo / "sess" / "1", valid, COLS, 5)
    want_ids, want_scores = rec.offline(req)
    assert all(isinstance(v, str) and v.startswith("sku-") for v in want_ids.ravel())
    assert not any(set(r) & set(p) for r, p in zip(want_ids.tolist(), req["item_id"]))  # never an item of the session
    rec.exclude_seen = False
    plain_ids, _ = rec.offline(req)
    rec.exclude_seen = True
    assert any(set(r) & set(p) for r, p in zip(plain_ids.tolist(), req["item_id"]))  # without it they come back
    more = req.assign(exclude_item_ids=[list(r[:2]) + ["sku-unknown"] for r in want_ids.tolist()])
    more_ids, more_scores = rec.offline(more)
    assert [r[:3] for r in more_ids.tolist()] == [r[2:] for r in want_ids.tolist()]  # the next best move up
    _load(server, "sess")
    for proto, url in (("http", server.http_url), ("grpc", server.grpc_url)):
        with SessionClient(url, proto, "sess") as client:
            ids, scores = client.recommend(req)
            got_more = client.recommend(more)
            _assert_bad_requests_are_client_errors(client, req, proto)
        assert ids.tolist() == want_ids.tolist()
        np.testing.assert_allclose(scores, want_scores, atol=1e-5, rtol=0)
        assert got_more[0].tolist() == more_ids.tolist()
        np.testing.assert_allclose(got_more[1], more_scores, atol=1e-5, rtol=0)
    with SessionClient(server.grpc_url, "grpc", "sess", shared_memory=True) as client:  # string lists via /dev/shm
        shm_ids, shm_scores = client.recommend(more)
    assert shm_ids.tolist() == got_more[0].tolist() and np.array_equal(shm_scores, got_more[1])
    # one served model.py for every top-k version, and a config.pbtxt written without merlin's private API
    assert (repo / "sess" / "1" / "model.py").read_text() == (TRITON_MODELS / "topk.py").read_text()


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
