"""Classical retrieval models (ease, item_knn; and mult_dae, served the same way) through the whole Prefect flow:
trained on the raw split, exported as a top-k version (kind classical), gated, smoke-tested (served == offline)
and published; the published versions then served by one real Triton, over HTTP and gRPC, with seen items,
exclude_item_ids and an unknown user; user-id requests answered from the Feast store (the user's train + validation
positives, the re-ranker's user features), an unknown user, and a store that goes away (Redis stopped: 503).
The pieces: tests/unit/models/test_classical.py, tests/unit/export/test_classical.py."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline_lib.config import load_config
from pipeline_lib.export import topk
from pipeline_lib.export.classical import ClassicalRecommender
from pipeline_lib.release.lineage import file_fingerprint
from pipeline_lib.serving.client import RecsysClient
from pipeline_lib.serving.server import TritonServer

from tests.conftest import SMALL

pytestmark = pytest.mark.integration

RUNS = {"recsys_ease": "ease", "recsys_knn": "item_knn", "recsys_ease_dlrm": "ease + dlrm", "recsys_dae": "mult_dae"}


@pytest.fixture(scope="module")
def classical_runs(prefect_harness, tmp_path_factory):
    """ease through the whole flow (gate with its baseline requirement on); item_knn trained, exported and
    published by the same stage functions on that run's split (a second flow run costs a Triton start), so is a
    mult_dae (its users' history: train + validation, as the test protocol has it), and the run's ease model as
    the candidate generator of a two-stage version re-ranked by a DLRM."""
    from flows.pipeline import pipeline
    from pipeline_lib.config import AutoencoderConfig, ClassicalConfig
    from pipeline_lib.export.classical import export_classical
    from pipeline_lib.features.classical import write_classical_snapshot
    from pipeline_lib.models import classical
    from pipeline_lib.models import ranking as ranking_model
    from pipeline_lib.serving import repository

    tmp = tmp_path_factory.mktemp("classical")
    repo = tmp / "model_repository"
    overrides = {**SMALL, "seed": 5, "runs_dir": str(tmp / "runs"), "run_name": "ease",
                 "model": {**SMALL["model"], "type": "ease"}, "gate": {"require_beat_baseline": True},
                 "export": {**SMALL["export"], "model_repository": str(repo), "model_name": "recsys_ease"}}
    summary = pipeline(overrides=overrides)
    split = Path(summary["etl_from"]).parent / "split"
    cfg = load_config(None, overrides)
    model = cfg.model.model_copy(update={"type": "item_knn", "classical": ClassicalConfig(knn_neighbours=20)})
    knn = classical.train(split / "train.parquet", split / "valid.parquet", cfg.columns, model, tmp / "knn")
    valid = split / "valid.parquet"  # the users' history besides train, as the flow exports (features on)
    exp = export_classical(knn.model_dir, split / "train.parquet", pd.read_parquet(valid).head(32),
                           topk.TopKSettings.from_config(cfg), tmp / "staging", "recsys_knn", raw_history=valid,
                           features=True)
    dae_model = cfg.model.model_copy(update={"type": "mult_dae", "autoencoder": AutoencoderConfig(
        hidden_dim=32, batch_size=64, epochs=5)})
    dae = classical.train(split / "train.parquet", valid, cfg.columns, dae_model, tmp / "dae", cfg.seed)
    dae_exp = export_classical(dae.model_dir, split / "train.parquet", pd.read_parquet(valid).head(32),
                               topk.TopKSettings.from_config(cfg), tmp / "staging-dae", "recsys_dae",
                               raw_history=valid, features=True)
    # two-stage: the run's ease model proposes 30 candidates, a DLRM trained on the run's ETL output re-scores them
    etl_dir = Path(summary["etl_from"])
    ranker = ranking_model.train(etl_dir / "train", etl_dir / "valid", cfg.model.model_copy(update={"type": "dlrm"}),
                                 cfg.columns.label, cfg.seed, tmp / "ranker")
    two_stage = export_classical(tmp / "runs" / "ease" / "model" / "model", split / "train.parquet",
                                 pd.read_parquet(split / "valid.parquet").head(16),
                                 topk.TopKSettings(cfg.columns, k=10, ranker_dir=ranker.model_dir, candidates=30),
                                 tmp / "staging-two-stage", "recsys_ease_dlrm", workflow_dir=etl_dir / "workflow",
                                 raw_history=valid, features=True)
    for name, staged in (("recsys_knn", exp), ("recsys_ease_dlrm", two_stage), ("recsys_dae", dae_exp)):
        write_classical_snapshot(staged, split / "train.parquet", valid, cfg.columns)  # what the family does
        assert repository.publish(staged.version_dir, staged.config_path, repo, name)[0] == 1
        repository.promote(repo, name, 1, None, cfg.serving.instance_count)
    # the features stage of the flow (ease) fills its store; here the others' SQLite stores (knn: redis_store)
    for name in ("recsys_ease_dlrm", "recsys_dae"):
        fill(tmp / "feature_store" / name, repo, name)
    return tmp, repo, split, summary


def fill(settings_or_repo, repo: Path, name: str) -> None:
    """Materialize version 1 of ``name`` into a store (a repo folder: SQLite) and point the served model at it."""
    from pipeline_lib.features.store import StoreSettings, materialize, write_pointer

    settings = settings_or_repo if isinstance(settings_or_repo, StoreSettings) else StoreSettings(settings_or_repo)
    materialize(settings, repo / name / "1" / topk.TOPK_DIR, 1)
    write_pointer(repo / name, settings)


REDIS_MODEL = "recsys_knn"  # its store is a real Redis when redis-server is installed (SQLite otherwise)


@pytest.fixture(scope="module")
def redis_store(classical_runs):
    """A real redis-server on a free loopback port holding REDIS_MODEL's features (None, and a SQLite store, when
    redis-server is not installed)."""
    import shutil
    import subprocess
    import time

    from pipeline_lib.features.store import StoreSettings
    from pipeline_lib.serving.server import free_port

    tmp, repo, _, _ = classical_runs
    exe = shutil.which("redis-server")
    if exe is None:
        fill(tmp / "feature_store" / REDIS_MODEL, repo, REDIS_MODEL)
        yield None
        return
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        time.sleep(0.5)
        fill(StoreSettings(tmp / "redis_fs" / REDIS_MODEL, "redis", f"127.0.0.1:{port}"), repo, REDIS_MODEL)
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
            proc.wait(timeout=10)


def test_flow_trains_gates_and_publishes_an_ease_version(classical_runs):
    tmp, repo, _, s = classical_runs
    assert s["model"] == "ease" and s["model_version"] == 1 and s["gate"]["promote"], s["gate"]
    assert s["max_abs_diff_served_vs_offline"] <= 1e-5  # the smoke test: served == offline over HTTP and gRPC
    m, v = s["metrics"], s["validation_metrics"]
    assert 0.0 < v["user_recall@10"] <= 1.0 and 0.0 < v["user_ndcg@10"] <= 1.0  # validation: chooses
    assert s["metrics_split"] == "test" and 0.0 < m["recall@10"] <= 1.0  # test: reported, per user
    # the model under the baselines' protocol on test is the headline; ease is not its own baseline
    assert s["lift"].startswith(f"ease (per user, seen items excluded) recall@10 {m['recall@10']:.4f}")
    assert s["baselines"]["ease"] == {"skipped": "this run's model is ease (model.type)"}
    # compared with the best baseline (most_popular / item_cooccurrence) on the test split: it beats it, or is
    # inside the noise of this small split and promoted because nothing serves yet
    reason = s["gate"]["reason"]
    assert "beats the best baseline" in reason or "a run must end serving something" in reason, reason
    art = repo / "recsys_ease" / "1" / topk.TOPK_DIR
    assert json.loads((art / "spec.json").read_text())["kind"] == "classical"
    assert (art / "weights.npy").is_file() and (art / topk.SEEN_FILE).is_file()
    assert (repo / "recsys_knn" / "1" / topk.TOPK_DIR / "weights.npz").is_file()  # item_knn: sparse
    assert (repo / "recsys_dae" / "1" / topk.TOPK_DIR / "mlp.npz").is_file()  # mult_dae: its numpy layers
    lineage = json.loads((repo / "recsys_ease" / "1" / "lineage.json").read_text())["model"]
    assert sorted(p.name for p in Path(lineage["path"]).iterdir()) == ["items.npz", "spec.json", "weights.npy"]
    assert lineage["fingerprint"] == file_fingerprint(Path(lineage["path"]))  # the weights, not nothing


@pytest.fixture(scope="module")
def served(classical_runs, redis_store):
    tmp, repo, _, _ = classical_runs
    server = TritonServer.on_free_ports(repo, log_file=tmp / "triton.log")
    with server.start(timeout_s=300, models=list(RUNS)):
        yield server


@pytest.mark.parametrize("name", list(RUNS))
def test_served_classical_top_k_equals_offline_over_http_and_grpc(classical_runs, served, name):
    tmp, repo, split, _ = classical_runs
    rec = ClassicalRecommender(repo / name / "1" / topk.TOPK_DIR)
    train = pd.read_parquet(split / "train.parquet")
    seen = train[train["click"] > 0].groupby("user_id")["item_id"].apply(set).to_dict()
    rows = pd.read_parquet(split / "valid.parquet").iloc[10:30][rec.request_columns].reset_index(drop=True)
    rows.loc[0, "user_id"] = 987654321  # an unknown user: the most popular items
    want_ids, want_scores = rec.offline(rows)
    assert (rec.ranker_fn is not None) == (name == "recsys_ease_dlrm")
    # the most popular items of the version's history (train + validation), ties to the lower catalogue row
    popular = rec.item_ids[np.argsort(-rec.popularity, kind="stable")]
    if rec.ranker_fn is None:
        np.testing.assert_array_equal(want_ids[0], popular[:10])
    else:  # re-ranked: the 10 best of the unknown user's 30 most popular items
        assert set(want_ids[0]) <= set(popular[:30]) and rec.request_columns[0] == "user_id"
    more = rows.assign(**{topk.EXCLUDE_INPUT: [list(r[:3]) for r in want_ids.tolist()]})
    want_more = rec.offline(more)
    for url, protocol in ((served.http_url, "http"), (served.grpc_url, "grpc")):
        with RecsysClient(url, protocol, name) as client:
            ids, scores = client.recommend(rows)
            more_ids, more_scores = client.recommend(more)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(scores, want_scores, atol=1e-5, rtol=0)
        for user, items in zip(rows["user_id"], ids.tolist()):
            assert not set(items) & seen.get(user, set()), (protocol, user)
        np.testing.assert_array_equal(more_ids, want_more[0])
        np.testing.assert_allclose(more_scores, want_more[1], atol=1e-5, rtol=0)
        for items, dropped, user in zip(more_ids.tolist(), more[topk.EXCLUDE_INPUT], rows["user_id"]):
            assert not set(items) & (set(dropped) | seen.get(user, set()))
        if rec.ranker_fn is None:  # unknown user: popular minus the excluded
            assert more_ids[0].tolist() == popular[3:13].tolist()


@pytest.mark.parametrize("name", list(RUNS))
def test_user_id_requests_equal_the_offline_top_k_of_the_users_history(classical_runs, served, name):
    """Only the user id is sent: the served version reads the user's positive items (train + validation) and, two-stage,
    the re-ranker's user features from the store; the answer equals the offline top-k of the user scored from the
    training data (seen.npz, as the test-time evaluation scores it). An unknown id: popular items, cold_start."""
    from pipeline_lib.features import snapshot
    from pipeline_lib.features.store import store_state

    tmp, repo, _, s = classical_runs
    if name == "recsys_ease":  # the flow's features stage filled the promoted version's store
        assert s["feature_store"]["version"] == 1 and store_state(Path(s["feature_store"]["repo"]))["version"] == 1
    art = repo / name / "1" / topk.TOPK_DIR
    rec = ClassicalRecommender(art)
    assert rec.lookup_columns == rec.request_columns + ["history_item_ids"]
    users = snapshot.stored_users(art, 6)
    ids = users + [snapshot.unknown_id(users)]
    rows = snapshot.offline_rows(art, ids)
    want = topk.finish_top_k(*rec.offline(rows[rec.request_columns]))  # history from seen.npz, not the store
    for url, protocol in ((served.grpc_url, "grpc"), (served.http_url, "http")):
        with RecsysClient(url, protocol, name) as c:
            got_ids, got_scores, count, cold = c.recommend_user(ids, "user_id")
        assert cold.tolist() == [False] * len(users) + [True], protocol
        np.testing.assert_array_equal(got_ids, want[0])
        np.testing.assert_allclose(got_scores, want[1], atol=1e-5, rtol=0)
    popular = rec.item_ids[np.argsort(-rec.popularity, kind="stable")]
    if rec.ranker_fn is None:
        assert got_ids[-1].tolist() == popular[:10].tolist()  # the cold-start answer
    # the full-feature request: the history sent is what is scored and excluded, no store read (a plain version:
    # another user's history under the first user's id; a re-ranker also reads the user id)
    sent = rows.iloc[[1]][rec.lookup_columns].reset_index(drop=True)
    if rec.ranker_fn is None:
        sent["user_id"] = ids[0]
    with RecsysClient(served.grpc_url, "grpc", name) as c:
        got = c.recommend(sent)
    np.testing.assert_array_equal(got[0][0], want[0][1])
    assert not set(got[0][0]) & set(rows["history_item_ids"].iloc[1])


def test_rollback_restores_a_classical_snapshot_and_refuses_a_version_without_one(classical_runs, tmp_path):
    """A classical version's snapshot goes back into its store on rollback; a version exported without features
    is refused while the model serves user-id requests (its users would be scored from another history)."""
    from pipeline_lib.export.classical import export_classical
    from pipeline_lib.features import snapshot, stage
    from pipeline_lib.features.store import FeatureStoreError, read_pointer, store_state, write_pointer

    tmp, repo, split, _ = classical_runs
    snap = snapshot.Snapshot.load(snapshot.snapshot_dir(repo / "recsys_ease" / "1" / topk.TOPK_DIR))
    assert stage.restore(repo, "recsys_ease", 1)["snapshot"] == snap.id
    assert store_state(read_pointer(repo / "recsys_ease").repo)["snapshot"] == snap.id
    settings = topk.TopKSettings(load_config(None, SMALL).columns, k=10)
    export_classical(tmp / "knn" / "model", split / "train.parquet", pd.read_parquet(split / "valid.parquet").head(4),
                     settings, tmp_path / "staging", "recsys_knn")  # features off: no snapshot
    write_pointer(tmp_path / "staging" / "recsys_knn", read_pointer(repo / "recsys_knn"))
    with pytest.raises(FeatureStoreError, match="version 1 of 'recsys_knn' has no feature snapshot"):
        stage.check_restorable(tmp_path / "staging", "recsys_knn", 1)
    stage.check_restorable(repo, "recsys_knn", 1)  # the served one has its snapshot


def test_classical_user_id_requests_get_503_when_the_store_goes_away(classical_runs, served, redis_store):
    """REDIS_MODEL's store is a real Redis: killed, its user-id requests are UNAVAILABLE (HTTP 503, gRPC
    UNAVAILABLE) at once (the lookup's bounded Redis client, store.bound_redis; redis-py's default retries took ~3 s
    a request, one model instance busy throughout), never a crash or a silent answer from another history;
    full-feature requests (user id + history) still answer; and Triton, stopped while clients keep asking, stops
    promptly (it waited for every queued lookup: 14 s with 4 clients). Last in the file: it kills the module's Redis
    and stops the module's Triton."""
    import threading
    import time

    from pipeline_lib.features import snapshot
    from tritonclient.utils import InferenceServerException

    if redis_store is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run installs it)")
    _, repo, _, _ = classical_runs
    art = repo / REDIS_MODEL / "1" / topk.TOPK_DIR
    rec = ClassicalRecommender(art)
    users = snapshot.stored_users(art, 4)
    full = snapshot.offline_rows(art, users)[rec.lookup_columns]
    want = topk.finish_top_k(*rec.offline(full[rec.request_columns]))
    redis_store.kill()
    redis_store.wait(timeout=10)
    for url, protocol, status in ((served.grpc_url, "grpc", "UNAVAILABLE"), (served.http_url, "http", "503")):
        with RecsysClient(url, protocol, REDIS_MODEL) as c:
            for _ in range(3):
                t0 = time.perf_counter()
                with pytest.raises(InferenceServerException, match="unavailable: feature store unreachable") as exc:
                    c.recommend_user(users, "user_id")
                took = time.perf_counter() - t0
                print(f"{protocol} user-id request with Redis down: {took * 1000:.1f} ms")
                assert status in str(exc.value.status()) and took < 1.5, took  # ~ms (refused); <= ~1 s hung
            np.testing.assert_array_equal(c.recommend(full)[0], want[0])
    stop = threading.Event()

    def ask() -> None:  # a client that keeps sending user-id requests while the server stops
        with RecsysClient(served.grpc_url, "grpc", REDIS_MODEL) as c:
            while not stop.is_set():
                try:
                    c.recommend_user(users, "user_id")
                except Exception:  # noqa: BLE001 - 503, then refused connections while Triton stops
                    time.sleep(0.01)

    clients = [threading.Thread(target=ask, daemon=True) for _ in range(4)]
    for t in clients:
        t.start()
    time.sleep(0.5)
    t0 = time.perf_counter()
    served.stop()
    took = time.perf_counter() - t0
    stop.set()
    for t in clients:
        t.join(timeout=10)
    unload = _unload_seconds(served.log_file.read_text(), REDIS_MODEL)
    print(f"Triton stop with Redis down and 4 clients asking: {took:.2f} s; {REDIS_MODEL} unloaded after {unload:.2f} s")
    # the Redis model's queued user-id requests end at once, so it unloads like an idle one (~2 s: its stub's exit).
    # Before the bounded client each took ~3 s: it never unloaded and Triton waited out its 10 s exit timeout.
    # The rest of the stop is Triton unloading the module's other models (the TensorFlow two-stage one ~5-7 s)
    assert unload < 8.0 and took < 20.0, (unload, took)


def _unload_seconds(log: str, model: str) -> float:
    """Seconds from Triton's last stop ("Waiting for in-flight requests") until ``model`` was unloaded, from the
    timestamps of its log lines; fails when Triton exited without unloading it (its exit timeout ran out)."""
    import datetime as dt
    import re

    def when(line: str) -> dt.datetime:
        return dt.datetime.strptime(re.search(r"\d\d:\d\d:\d\d\.\d+", line).group(0), "%H:%M:%S.%f")

    lines = log.splitlines()
    start = max(i for i, line in enumerate(lines) if "Waiting for in-flight requests to complete" in line)
    done = [line for line in lines[start:] if f"successfully unloaded '{model}'" in line]
    assert done, f"Triton stopped without unloading {model} (it waited out its exit timeout):\n" + "\n".join(lines[start:])
    return (when(done[0]) - when(lines[start])).total_seconds()
