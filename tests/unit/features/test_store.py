"""The feature store stage on a real Feast repo (SQLite online store; Redis when redis-server is installed):
snapshot, materialize, lookup, the version check, rollback refusal. Tiny synthetic data, no Triton."""
import json
import shutil
import signal
import subprocess
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from pipeline_lib.features import snapshot, stage, store
from pipeline_lib.features.lookup import UserLookup
from pipeline_lib.serving.server import free_port

COLS = SimpleNamespace(user_id="user_id", item_id="item_id", label="click", timestamp="ts")
HIST = "item_id_history"


def _train(seed: int = 0, n: int = 400) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({"user_id": rng.integers(0, 40, n), "item_id": rng.integers(0, 30, n),
                         "age": rng.integers(0, 5, n), "country": rng.choice(["de", "fr", "us"], n),
                         "price": rng.random(n), "click": rng.integers(0, 2, n), "ts": np.arange(n)[::-1],
                         "item_tags": [[f"t{j}" for j in range(i % 3)] for i in range(n)]})


def _version(repo: Path, version: int, train: pd.DataFrame, model: str = "m") -> Path:
    art = repo / model / str(version) / "topk"
    art.mkdir(parents=True)
    snapshot.write_snapshot(art, train, ["user_id", "age", "country", HIST], ["item_id", "price", "item_tags"], COLS, HIST, 3)
    return art


def test_snapshot_holds_each_users_latest_row_and_recent_positive_items(tmp_path):
    train = _train()
    art = _version(tmp_path, 1, train)
    snap = snapshot.Snapshot.load(snapshot.snapshot_dir(art))
    users = pd.read_parquet(snapshot.snapshot_dir(art) / snapshot.USERS_FILE).set_index("user_id")
    assert snap.n_users == train["user_id"].nunique() and set(snap.list_columns) == {HIST, "item_tags"}
    u = int(train["user_id"].iloc[0])
    mine = train[train["user_id"] == u].sort_values("ts")
    assert users.loc[u, "age"] == mine["age"].iloc[-1] and users.loc[u, "country"] == mine["country"].iloc[-1]
    assert list(users.loc[u, HIST]) == mine.loc[mine["click"] == 1, "item_id"].tolist()[-3:]
    rows = snapshot.offline_rows(art, [u, 10**6])
    assert rows.loc[1, HIST] == [] and rows.loc[1, "country"] == snap.defaults["country"]


def test_lookup_reads_what_materialize_wrote_and_flags_unknown_users(tmp_path):
    art = _version(tmp_path, 1, _train())
    settings = store.StoreSettings(tmp_path / "fs" / "m")
    info = store.materialize(settings, art, 1)
    store.write_pointer(tmp_path / "m", settings)
    assert info["version"] == 1 and store.store_state(settings.repo)["version"] == 1
    lookup = UserLookup(art, tmp_path / "m")
    users = snapshot.stored_users(art, 3)
    arrays, cold = lookup.complete({"user_id": np.array(users + [10**6], dtype=np.int64)}, ["age", "country", HIST])
    assert cold.tolist() == [False, False, False, True]
    want = snapshot.offline_rows(art, users + [10**6])
    assert arrays["age"].tolist() == want["age"].tolist()
    assert [v.decode() for v in arrays["country"]] == want["country"].tolist()
    off = arrays[f"{HIST}__offsets"]
    got = [arrays[f"{HIST}__values"][off[i]:off[i + 1]].tolist() for i in range(len(off) - 1)]
    assert got == [list(v) for v in want[HIST]]
    items = store.item_rows(settings.repo, "item_id", [1, 2])  # item features, list features included
    assert list(items.columns) == ["item_id", "price", "item_tags"] and all(isinstance(t, list) for t in items["item_tags"])


def test_a_store_holding_another_versions_features_is_refused_not_used(tmp_path):
    art1, art2 = _version(tmp_path, 1, _train(0)), _version(tmp_path, 2, _train(1))
    settings = store.StoreSettings(tmp_path / "fs" / "m")
    store.write_pointer(tmp_path / "m", settings)
    store.materialize(settings, art2, 2)
    with pytest.raises(store.FeatureStoreError, match="holds version 2's features"):
        UserLookup(art1, tmp_path / "m").fetch(np.array(snapshot.stored_users(art1, 2)))
    assert UserLookup(art2, tmp_path / "m").fetch(np.array(snapshot.stored_users(art2, 2)))[1].tolist() == [False] * 2


def test_no_store_set_up_is_unavailable_not_a_crash(tmp_path):
    art = _version(tmp_path, 1, _train())
    with pytest.raises(store.FeatureStoreError, match="no feature store is set up") as exc:
        UserLookup(art, tmp_path / "m").fetch(np.array([1]))
    assert exc.value.triton_code == "UNAVAILABLE"


def test_rollback_restores_the_older_versions_features_or_is_refused(tmp_path):
    repo = tmp_path / "model_repository"
    art1, art2 = _version(repo, 1, _train(0)), _version(repo, 2, _train(1))
    settings = store.StoreSettings(tmp_path / "fs" / "m")
    store.materialize(settings, art2, 2)
    store.write_pointer(repo / "m", settings)
    stage.check_restorable(repo, "m", 1)
    assert stage.restore(repo, "m", 1)["version"] == 1
    assert store.store_state(settings.repo)["snapshot"] == snapshot.Snapshot.load(snapshot.snapshot_dir(art1)).id
    shutil.rmtree(snapshot.snapshot_dir(art1))  # a version exported without features
    with pytest.raises(store.FeatureStoreError, match="version 1 of 'm' has no feature snapshot"):
        stage.check_restorable(repo, "m", 1)


@pytest.fixture
def redis_server():
    exe = shutil.which("redis-server")
    if exe is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run installs it)")
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 10
    while subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True, text=True).stdout.strip() != "PONG":
        assert time.time() < deadline and proc.poll() is None, "redis-server did not start"
        time.sleep(0.1)
    yield proc, port
    proc.terminate()
    proc.wait(timeout=10)


def test_redis_online_store_round_trip_and_unreachable(tmp_path, redis_server):
    proc, port = redis_server
    art = _version(tmp_path, 1, _train())
    settings = store.StoreSettings(tmp_path / "fs" / "m", "redis", f"127.0.0.1:{port}")
    store.materialize(settings, art, 1)
    store.write_pointer(tmp_path / "m", settings)
    assert json.loads((tmp_path / "m" / store.STORE_POINTER).read_text())["online_store"] == "redis"
    lookup = UserLookup(art, tmp_path / "m")
    users = snapshot.stored_users(art, 2)
    found, cold = lookup.fetch(np.array(users))
    assert not cold.any() and found["age"] == snapshot.offline_rows(art, users)["age"].tolist()
    # the lookup's client is bounded (store.bound_redis): a hung Redis (stopped: it accepts, never answers) fails the
    # lookup after 2 x 0.5 s (redis-py's defaults: ~60 s), a Redis that closed the pooled connections is reconnected
    # at once, a killed one fails at once (redis-py's defaults: ~3 s of retries)
    subprocess.run(["redis-cli", "-p", str(port), "client", "kill", "type", "normal"], check=True, capture_output=True)
    assert lookup.fetch(np.array(users))[1].tolist() == [False, False]
    proc.send_signal(signal.SIGSTOP)
    try:
        took = _failed_lookup_seconds(lookup, users)
    finally:
        proc.send_signal(signal.SIGCONT)
    print(f"user lookup with Redis hung: {took:.3f} s")
    assert 0.9 < took < 3.0, took
    assert lookup.fetch(np.array(users))[1].tolist() == [False, False]
    proc.kill()
    proc.wait(timeout=10)
    took = _failed_lookup_seconds(lookup, users)
    print(f"user lookup with Redis killed: {took:.3f} s")
    assert took < 0.5, took


def test_a_redis_store_that_does_not_answer_is_named_before_a_run(tmp_path, redis_server):
    """stage.check_store (the flow and `recsys run` call it first): a Redis that answers passes, a killed one is
    refused at once with its host:port and what to do; SQLite and features off need no check."""
    from pipeline_lib.config import load_config

    proc, port = redis_server
    cfg = load_config(None, {"features": {"online_store": "redis", "redis_connection": f"127.0.0.1:{port},db=1"}})
    stage.check_store(cfg)
    proc.kill()
    proc.wait(timeout=10)
    t0 = time.perf_counter()
    with pytest.raises(store.FeatureStoreError, match=rf"the redis online store at 127\.0\.0\.1:{port} \(Feast repo .*"
                       r"does not answer .*nothing was run. Start it, or fix features.redis_connection"):
        stage.check_store(cfg)
    assert time.perf_counter() - t0 < 1.0
    session = {"task": "session", "features": cfg.features.model_dump()}
    stage.check_store(load_config(None, {**session, "session": {"model": {"type": "session_knn"}}}))  # no snapshot
    with pytest.raises(store.FeatureStoreError):  # a deep session version keeps an item snapshot
        stage.check_store(load_config(None, {**session, "session": {"model": {"type": "gru"}}}))
    stage.check_store(load_config(None, {"features": {"online_store": "redis", "enabled": False}}))
    stage.check_store(load_config(None, {}))  # sqlite


def _failed_lookup_seconds(lookup: UserLookup, users: list) -> float:
    t0 = time.perf_counter()
    with pytest.raises(store.FeatureStoreError, match="unreachable") as exc:
        lookup.fetch(np.array(users))
    assert exc.value.triton_code == "UNAVAILABLE"
    return time.perf_counter() - t0


def test_the_direct_sqlite_read_equals_feasts_get_online_features(tmp_path):
    from pipeline_lib.features.lookup import SqliteReader

    art = _version(tmp_path, 1, _train())
    settings = store.StoreSettings(tmp_path / "fs" / "m")
    store.materialize(settings, art, 1)
    snap = snapshot.Snapshot.load(snapshot.snapshot_dir(art))
    cols = snap.user_columns + [store.SNAPSHOT_FIELD]
    ids = snapshot.stored_users(art, 5) + [10**6]
    feast = store.open_store(settings.repo).get_online_features(
        features=[f"{store.USER_VIEW}:{c}" for c in cols], entity_rows=[{"user_id": u} for u in ids]).to_dict()
    direct = SqliteReader(settings.repo / "online.db", store.project_name(settings.repo), store.USER_VIEW,
                          "user_id", cols).read(ids)
    assert direct == {c: feast[c] for c in cols} and direct["age"][-1] is None


def test_a_user_id_twice_in_one_request_gets_its_features_in_both_rows(tmp_path):
    """The SQLite reader answers every row of a repeated id (it once filled only the last: the others went cold)."""
    art = _version(tmp_path, 1, _train())
    settings = store.StoreSettings(tmp_path / "fs" / "m")
    store.materialize(settings, art, 1)
    store.write_pointer(tmp_path / "m", settings)
    u, v = snapshot.stored_users(art, 2)
    found, cold = UserLookup(art, tmp_path / "m").fetch(np.array([u, v, u], dtype=np.int64))
    assert cold.tolist() == [False, False, False]
    want = snapshot.offline_rows(art, [u, v, u])
    assert found["age"] == want["age"].tolist() and found[HIST] == [list(h) for h in want[HIST]]
