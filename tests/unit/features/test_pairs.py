"""User-id ranking requests (pipeline_lib/features/pairs.py) on a real Feast repo (SQLite online store): the
user's and the items' columns looked up, broadcast of one user id, unknown users and items, a store of another
version. Tiny synthetic data, no Triton."""
import numpy as np
import pytest

from pipeline_lib.features import snapshot, store
from pipeline_lib.features.lookup import UserLookup
from pipeline_lib.features.pairs import complete_pairs, missing_columns
from pipeline_lib.features.store import FeatureStoreError
from pipeline_lib.validate.requests import BadRequest

from tests.unit.features.test_store import HIST, _train, _version, redis_server  # noqa: F401 - fixture

USER_MISSING = ["age", "country", HIST]
ITEM_MISSING = ["price", "item_tags"]


@pytest.fixture
def filled(tmp_path):
    art = _version(tmp_path, 1, _train())
    settings = store.StoreSettings(tmp_path / "fs" / "m")
    store.materialize(settings, art, 1)
    store.write_pointer(tmp_path / "m", settings)
    return art, UserLookup(art, tmp_path / "m")


def _lists(arrays, name):
    off = arrays[f"{name}__offsets"]
    return [arrays[f"{name}__values"][off[i]:off[i + 1]].tolist() for i in range(len(off) - 1)]


def test_one_user_id_broadcast_over_its_items_equals_the_offline_pairs(filled):
    art, lookup = filled
    user, items = snapshot.stored_users(art, 1)[0], snapshot.stored_items(art, 3)
    unknown_item = snapshot.unknown_id(items)
    asked = items + [unknown_item, items[0]]  # an unknown item and an item asked twice
    arrays, cold = complete_pairs(lookup, {"user_id": np.array([user]), "item_id": np.array(asked)},
                                  USER_MISSING + ITEM_MISSING, {"age": np.dtype("int32")})
    want = snapshot.offline_pairs(art, [user] * len(asked), asked)
    assert cold.tolist() == [False] * len(asked) and arrays["user_id"].tolist() == [user] * len(asked)
    assert arrays["age"].dtype == np.int32 and arrays["age"].tolist() == want["age"].tolist()
    np.testing.assert_allclose(arrays["price"], want["price"])
    assert arrays["price"][3] == snapshot.Snapshot.load(snapshot.snapshot_dir(art)).item_defaults["price"]
    assert [[v.decode() for v in t] for t in _lists(arrays, "item_tags")] == [list(t) for t in want["item_tags"]]
    assert _lists(arrays, HIST) == [list(h) for h in want[HIST]]


def test_unknown_user_gets_the_cold_start_row_and_the_flag(filled):
    art, lookup = filled
    user = snapshot.stored_users(art, 1)[0]
    items = snapshot.stored_items(art, 2)
    arrays, cold = complete_pairs(lookup, {"user_id": np.array([user, 10**6]), "item_id": np.array(items)},
                                  USER_MISSING + ITEM_MISSING)
    want = snapshot.offline_pairs(art, [user, 10**6], items)
    assert cold.tolist() == [False, True] and arrays["age"].tolist() == want["age"].tolist()
    assert _lists(arrays, HIST)[1] == []


def test_bad_requests_name_the_field(filled):
    _, lookup = filled
    with pytest.raises(BadRequest, match="missing input 'item_id'"):
        complete_pairs(lookup, {"user_id": np.array([1])}, USER_MISSING)
    with pytest.raises(BadRequest, match="input 'user_id' has 2 values"):
        complete_pairs(lookup, {"user_id": np.array([1, 2]), "item_id": np.array([1, 2, 3])}, USER_MISSING)
    with pytest.raises(BadRequest, match="missing input 'user_id'"):
        complete_pairs(lookup, {"item_id": np.array([1, 2])}, USER_MISSING)
    with pytest.raises(BadRequest, match="missing input 'device'"):
        complete_pairs(lookup, {"user_id": np.array([1]), "item_id": np.array([1])}, ["device"])
    assert missing_columns(["user_id", "age", f"{HIST}__values", f"{HIST}__offsets"], {"user_id": 1}) == ["age", HIST]


def test_another_versions_store_or_no_store_is_unavailable(filled, tmp_path):
    art, lookup = filled
    other = _version(tmp_path / "v2", 2, _train(seed=1))
    store.materialize(store.StoreSettings(tmp_path / "fs" / "m"), other, 2)
    # every user unknown to this version (cold) and items only: the store's version is checked all the same
    with pytest.raises(FeatureStoreError, match="holds version 2's features"):
        complete_pairs(lookup, {"user_id": np.array([10**6]), "item_id": np.array([1])}, USER_MISSING)
    with pytest.raises(FeatureStoreError, match="holds version 2's features"):
        complete_pairs(lookup, {"user_id": np.array([1]), "item_id": np.array([1])}, ITEM_MISSING)
    with pytest.raises(FeatureStoreError, match="no feature store is set up"):
        complete_pairs(UserLookup(art, tmp_path / "nowhere"), {"user_id": np.array([1]), "item_id": np.array([1])},
                       USER_MISSING)


def test_pairs_through_redis_equal_the_sqlite_answer_and_a_stopped_redis_is_unavailable(tmp_path, redis_server, filled):
    """The same ranking request through a Redis online store (Feast's get_online_features for users and items)
    answers what the SQLite store answers; with Redis stopped: FeatureStoreError (served as UNAVAILABLE)."""
    proc, port = redis_server
    art, sqlite_lookup = filled
    settings = store.StoreSettings(tmp_path / "fs_redis" / "m", "redis", f"127.0.0.1:{port}")
    store.materialize(settings, art, 1)
    (tmp_path / "mr").mkdir()
    store.write_pointer(tmp_path / "mr", settings)
    users, items = snapshot.stored_users(art, 2) + [10**6], snapshot.stored_items(art, 2) + [10**6]
    request = {"user_id": np.array(users), "item_id": np.array(items)}
    got, cold = complete_pairs(UserLookup(art, tmp_path / "mr"), request, USER_MISSING + ITEM_MISSING)
    want, want_cold = complete_pairs(sqlite_lookup, request, USER_MISSING + ITEM_MISSING)
    assert cold.tolist() == want_cold.tolist() == [False, False, True]
    assert set(got) == set(want)
    for name in want:
        assert np.asarray(got[name]).tolist() == np.asarray(want[name]).tolist(), name
    proc.terminate()
    proc.wait(timeout=10)
    with pytest.raises(FeatureStoreError, match="unreachable"):
        complete_pairs(UserLookup(art, tmp_path / "mr"), request, USER_MISSING + ITEM_MISSING)


def test_the_direct_sqlite_read_answers_an_id_asked_twice_at_both_places(filled, tmp_path):
    from pipeline_lib.features.lookup import SqliteReader

    art, _ = filled
    u = snapshot.stored_users(art, 1)[0]
    settings = store.StoreSettings(tmp_path / "fs" / "m")
    read = SqliteReader(settings.repo / "online.db", store.project_name(settings.repo), store.USER_VIEW, "user_id",
                        ["age"]).read([u, 10**6, u])
    assert read["age"][0] is not None and read["age"][0] == read["age"][2] and read["age"][1] is None


def test_ranking_versions_snapshots_in_ensemble_are_filled_restored_or_refused(tmp_path):
    """A ranking version keeps its snapshot in ``<N>/ensemble/features``: the features stage's paths find it, a
    rollback restores it, and a ranking version without one is refused once the model serves user-id requests."""
    from types import SimpleNamespace

    from pipeline_lib.features import stage

    repo = tmp_path / "model_repository"
    arts = {}
    newer = _train(1)
    newer.loc[0, "item_id"] = 500  # an item only version 2 knows
    for v, train in ((1, _train(0)), (2, newer)):
        arts[v] = repo / "m" / str(v) / stage.RANKING_DIR
        arts[v].mkdir(parents=True)
        snapshot.write_snapshot(arts[v], train, ["user_id", "age", "country"], ["item_id", "price"],
                                SimpleNamespace(user_id="user_id", item_id="item_id", label="click", timestamp="ts"),
                                None, 0)
    assert stage.version_artifacts(repo, "m", 2) == arts[2]
    cfg = SimpleNamespace(export=SimpleNamespace(model_repository=str(repo), model_name="m"),
                          features=SimpleNamespace(enabled=True, repo=str(tmp_path / "fs"), online_store="sqlite",
                                                   redis_connection=""))
    assert stage.fill_store(cfg, 2)["version"] == 2
    lookup = UserLookup(arts[1], repo / "m")
    with pytest.raises(FeatureStoreError, match="holds version 2's features"):
        complete_pairs(lookup, {"user_id": np.array([10**6]), "item_id": np.array([1])}, ["age"])
    stage.check_restorable(repo, "m", 1)
    assert stage.restore(repo, "m", 1)["version"] == 1
    assert complete_pairs(UserLookup(arts[1], repo / "m"), {"user_id": np.array([10**6]), "item_id": np.array([1])},
                          ["age", "price"])[1].tolist() == [True]
    # version 2's item 500 is still in the store's rows, but not version 1's: version 1 gets its item defaults
    found, unknown = UserLookup(arts[1], repo / "m").fetch_items(np.array([500, 1]))
    v1 = snapshot.Snapshot.load(snapshot.snapshot_dir(arts[1]))
    assert unknown.tolist() == [True, False] and found["price"][0] == v1.item_defaults["price"]
    assert found["price"][1] == snapshot.offline_pairs(arts[1], [10**6], [1])["price"].iloc[0]
    import shutil

    shutil.rmtree(snapshot.snapshot_dir(arts[1]))  # a ranking version exported without features
    with pytest.raises(FeatureStoreError, match="version 1 of 'm' has no feature snapshot"):
        stage.check_restorable(repo, "m", 1)
