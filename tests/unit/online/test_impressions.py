"""The impression log: records per (request, user), hour partitions, nothing lost on close."""
import time

import numpy as np
import pandas as pd

from pipeline_lib.online import impressions as imp


def _settings(tmp_path, flush=60.0):
    return imp.ImpressionSettings(tmp_path / "imp", flush_seconds=flush)


def test_topk_answers_become_one_record_per_row_best_first_without_sentinels(tmp_path):
    log = imp.ImpressionLog(_settings(tmp_path), "recsys", 3)
    ids = np.array([[5, 7, -1], [9, 8, 7]], dtype=np.int64)
    scores = np.array([[0.9, 0.5, 0.0], [0.8, 0.7, 0.1]], dtype=np.float32)
    log.log("r1", np.array(["u1", "u2"], dtype=object), ids, scores, ts=1_700_000_000.0)
    log.close()  # the flush interval is a minute: only close() writes it
    frame = imp.read_impressions(tmp_path / "imp")
    assert list(frame.columns) == imp.COLUMNS and len(frame) == 2
    first = frame.iloc[0]
    assert (first.request_id, first.model, first.version, first.user_id) == ("r1", "recsys", 3, "u1")
    assert list(first.item_ids) == ["5", "7"] and list(first.ranks) == [1, 2]
    np.testing.assert_allclose(first.scores, [0.9, 0.5], rtol=1e-6)
    assert frame.iloc[1].user_id == "u2" and list(frame.iloc[1].item_ids) == ["9", "8", "7"]
    assert first.ts == pd.Timestamp(1_700_000_000, unit="s", tz="UTC")
    parts = sorted(p.relative_to(tmp_path / "imp").parts[:2] for p in (tmp_path / "imp").rglob("*.parquet"))
    assert parts == [("date=2023-11-14", "hour=22")]


def test_a_ranking_request_is_grouped_per_user_and_ordered_by_score(tmp_path):
    log = imp.ImpressionLog(_settings(tmp_path), "recsys", 1)
    users = np.array([b"a", b"b", b"a"], dtype=object)
    log.log("r2", users, np.array([10, 20, 30]), np.array([0.1, 0.5, 0.9], dtype=np.float32))
    log.close()
    frame = imp.read_impressions(tmp_path / "imp").set_index("user_id")
    assert list(frame.loc["a"].item_ids) == ["30", "10"] and list(frame.loc["b"].item_ids) == ["20"]


def test_the_background_thread_flushes_within_the_interval_and_close_writes_the_rest(tmp_path):
    log = imp.ImpressionLog(_settings(tmp_path, flush=0.2), "m", 1)
    log.log("early", np.array(["u"]), np.array([[1]]), np.array([[1.0]]))
    deadline = time.time() + 10
    while not list((tmp_path / "imp").rglob("*.parquet")) and time.time() < deadline:
        time.sleep(0.05)
    assert len(imp.read_impressions(tmp_path / "imp")) == 1  # flushed without close()
    for i in range(50):
        log.log(f"late{i}", np.array(["u"]), np.array([[1]]), np.array([[1.0]]))
    log.close()
    frame = imp.read_impressions(tmp_path / "imp")
    assert sorted(frame.request_id) == sorted(["early"] + [f"late{i}" for i in range(50)])
    assert not list((tmp_path / "imp").rglob(".*.tmp")), "a temporary file was left behind"


def test_settings_travel_through_the_environment_and_the_user_seam_picks_the_first_present_column(tmp_path):
    env = imp.server_env(tmp_path, 0.5, ["uid", "session_id"], "item")
    s = imp.settings_from_env(env)
    assert s == imp.ImpressionSettings(tmp_path.resolve(), 0.5, ("uid", "session_id"), "item")
    assert imp.settings_from_env({}) is None
    arrays = {"session_id": np.array([7, 8]), "x": np.array([1, 2])}
    assert list(imp.subject_ids(arrays, s.user_columns, 2)) == ["7", "8"]
    assert list(imp.subject_ids({"x": np.array([1])}, s.user_columns, 1)) == [""]


def test_a_model_opts_out_with_its_config_parameter_and_logs_as_its_own_name_and_version(tmp_path):
    import json

    env = imp.server_env(tmp_path, 0.5, ["user_id"], "item_id")
    off = {"model_name": "m", "model_version": "2",
           "model_config": json.dumps({"parameters": {"impression_log": {"string_value": "off"}}})}
    assert imp.open_for_model(off, env) is None
    log = imp.open_for_model({**off, "model_config": "{}"}, env)
    assert (log.model, log.version) == ("m", 2)
    log.close()
