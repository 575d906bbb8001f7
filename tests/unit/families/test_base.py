"""The task-family interface: every family implements it, one config switch picks it, family rules
live in the family, one gate and one parity check serve all of them, and the ETL task is cached
for every family (a session run here: real NVTabular, real Prefect task cache)."""
import inspect

import numpy as np
import pytest

from pipeline_lib.config import load_config
from pipeline_lib.export.parity import ParityError, check_parity
from pipeline_lib.families import FAMILIES, RankingFamily, RetrievalFamily, SessionFamily, TaskFamily, get_family
from pipeline_lib.release import gate

from tests.unit.features.test_store import redis_server  # noqa: F401 - fixture



@pytest.mark.parametrize("family", list(FAMILIES.values()))
def test_every_family_implements_the_whole_interface(family):
    assert issubclass(family, TaskFamily) and not inspect.isabstract(family)
    abstract = TaskFamily.__abstractmethods__
    assert {"raw_data", "check_raw", "etl", "train", "export", "smoke_rows", "offline_reference",
            "serve_and_compare", "gate_metric", "gate_scorer", "headline_metrics", "served_report"} <= abstract
    fam = family(load_config(None, {"task": "session"} if family is SessionFamily else {}))
    assert fam.name in ("ranking", "retrieval", "session") and FAMILIES[fam.name] is family


@pytest.mark.parametrize("overrides, family", [
    ({}, RankingFamily),
    ({"model": {"type": "dcn"}}, RankingFamily),
    ({"model": {"type": "two_tower"}}, RetrievalFamily),
    ({"model": {"type": "mf"}}, RetrievalFamily),
    ({"model": {"type": "two_tower", "retrieval": {"rerank_with": "dlrm", "candidates": 30}}}, RetrievalFamily),
    ({"task": "session"}, SessionFamily),
])
def test_get_family_picks_the_family_from_one_config_switch(overrides, family):
    cfg = load_config(None, overrides)
    fam = get_family(cfg)
    assert type(fam) is family and cfg.family == family.name and fam.cfg is cfg
    assert fam.has_ranker == bool(overrides.get("model", {}).get("retrieval", {}).get("rerank_with"))


def test_family_rules_live_in_the_family():
    ranking = get_family(load_config(None, {}))
    youtube = get_family(load_config(None, {"model": {"type": "youtube_dnn"}}))
    two_tower = get_family(load_config(None, {"model": {"type": "two_tower"}}))
    session = get_family(load_config(None, {"task": "session"}))
    # YouTube DNN reads the user's recent positives: the ETL adds the list, requests carry it
    assert ranking.history_length == 0 and two_tower.history_length == 0 and youtube.history_length > 0
    assert youtube.request_columns()[-1] not in ranking.request_columns()
    assert ranking.request_columns() == ranking.cfg.columns.serving_columns
    assert (ranking.gate_metric, two_tower.gate_metric, session.gate_metric) == ("auc", "recall", "recall@10")
    assert ranking.tunable is False and get_family(load_config(None, {"tune": {"enabled": True}})).tunable
    tuned = ranking.with_model(ranking.cfg.model.model_copy(update={"embedding_dim": 8, "bottom_mlp": [8]}))
    assert type(tuned) is RankingFamily and tuned.cfg.model.embedding_dim == 8 and ranking.cfg.model.embedding_dim == 16


def test_etl_cache_key_follows_data_config_and_family_but_not_where_the_etl_runs(tmp_path):
    raw = tmp_path / "raw.parquet"
    raw.write_bytes(b"same bytes")
    key = lambda overrides: get_family(load_config(None, overrides)).etl_cache_key(raw)  # noqa: E731
    assert key({}) == key({"model": {"type": "dcn"}})                    # same ETL for every ranking model
    assert key({}) == key({"etl": {"dask": {"local_workers": 2}}})       # where it runs: same output
    assert key({}) != key({"seed": 1})
    assert key({}) != key({"model": {"type": "youtube_dnn"}})            # adds the history list
    assert key({"task": "session"}) != key({})
    assert key({"task": "session"}) == key({"task": "session", "session": {"model": {"epochs": 3}}})
    assert key({"task": "session"}) != key({"task": "session", "session": {"etl": {"max_session_length": 5}}})
    before = key({})
    raw.write_bytes(b"other bytes")
    assert key({}) != before                                               # the raw data's content hash


def test_one_parity_check_for_scores_and_top_k():
    s = np.array([0.1, 0.2], dtype=np.float32)
    assert check_parity("in-process ensemble", s, s + 1e-7, 1e-5) < 1e-5
    with pytest.raises(ParityError, match=r"in-process ensemble: max \|ensemble - offline\|"):
        check_parity("in-process ensemble", s, s + 1.0, 1e-5)
    ids = np.array([[3, 1, 2], [4, 5, 6]])
    scores = np.array([[0.9, 0.5, -np.inf], [0.3, 0.2, 0.1]])
    assert check_parity("served (HTTP)", (ids, scores), (ids.copy(), scores.copy()), 0.0) == 0.0  # -inf == -inf
    swapped = ids.copy()
    swapped[1] = swapped[1][::-1]
    with pytest.raises(ParityError, match=r"item ids differ from offline in 1 row\(s\); row 1: \[6, 5, 4\]"):
        check_parity("served (gRPC)", (swapped, scores), (ids, scores), 1e-5)
    with pytest.raises(ParityError, match="top-k shape"):
        check_parity("served (gRPC)", (ids[:, :2], scores[:, :2]), (ids, scores), 1e-5)


def test_one_gate_decides_for_every_metric_direction(tmp_path):
    """Scores by version folder (as a family's scorer gives them): higher-is-better for recall@k
    (the session metric), lower-is-better for log loss, the baselines first."""
    cand, served = tmp_path / "cand", tmp_path / "served"
    values = {cand: {"recall@10": 0.30, "logloss": 0.50}, served: {"recall@10": 0.32, "logloss": 0.55}}
    scorer = gate.Scorer(lambda d: values[d], 100)
    refused = gate.decide(cand, served, 1, scorer, "recall@10", 0.0)
    assert not refused.promote and "worse than served v1" in refused.reason and refused.n_rows == 100
    assert gate.decide(cand, served, 1, scorer, "recall@10", 0.05).promote
    assert gate.decide(cand, served, 1, scorer, "logloss", 0.0).promote            # lower is better
    base = gate.BaselineArgs({"most_popular": {"recall@10": 0.4}}, 0.30, "recall@10", model_name="gru")
    d = gate.decide(cand, None, None, scorer, "recall@10", 0.0, base)
    assert not d.promote and d.reason.startswith("gru recall@10 0.30000 does not beat most_popular 0.40000")


def test_a_run_whose_redis_is_down_at_the_features_stage_serves_the_previous_version_again(tmp_path, redis_server):
    """The features stage runs after promotion: with the run's Redis down it fails with an error naming the store,
    and the version it promoted does not stay served beside the previous version's features: the previous version
    serves again (a first run, with nothing served before, says what its users get). A real redis-server, killed."""
    import time

    from pipeline_lib.features import store
    from pipeline_lib.serving import repository
    from tests.unit.features.test_store import _train, _version

    proc, port = redis_server
    repo = tmp_path / "repo"
    for version in (1, 2):
        _version(repo, version, _train(version), model="recsys")
        (repo / "recsys" / str(version) / "model_config.pbtxt").write_text('name: "recsys"\nbackend: "python"\n')
    cfg = load_config(None, {"export": {"model_repository": str(repo), "model_name": "recsys"},
                             "serving": {"notify_live_server": False},
                             "features": {"online_store": "redis", "redis_connection": f"127.0.0.1:{port}",
                                          "repo": str(tmp_path / "fs")}})
    fam = get_family(cfg)
    repository.promote(repo, "recsys", 1)
    assert fam.features(1, None)["version"] == 1  # run 1: promoted, its features stored
    previous = repository.promote(repo, "recsys", 2)["previous"]  # run 2: promoted, then Redis goes down
    proc.kill()
    proc.wait(timeout=10)
    t0 = time.perf_counter()
    with pytest.raises(store.FeatureStoreError, match=rf"into the redis store at 127\.0\.0\.1:{port} \(Feast repo .*"
                       r"Version 2 is not served: version 1 serves again \(its features could not be rewritten"):
        fam.features(2, previous)
    print(f"features stage with Redis down: failed and stepped back in {time.perf_counter() - t0:.2f} s")
    assert repository.served_version(repo, "recsys") == 1
    with pytest.raises(store.FeatureStoreError, match="Nothing was served before this run: version 1 serves full"):
        fam.features(1, None)
    assert repository.served_version(repo, "recsys") == 1
    secret = store.StoreSettings(tmp_path, "redis", "redis:6379,password=s3cret,db=1")
    assert "s3cret" not in secret.where() and secret.where().startswith("redis:6379 ")
