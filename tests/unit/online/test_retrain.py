"""Retraining on feedback: shown items become labelled rows with the log's features, newest last."""
import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from pipeline_lib.config import SyntheticConfig, load_config
from pipeline_lib.data.synthetic import generate_interactions
from pipeline_lib.etl.workflow import split_raw
from pipeline_lib.online import feedback, impressions, retrain


def test_the_log_plus_labelled_impressions_split_by_time_puts_the_feedback_in_test(tmp_path):
    cfg = load_config(None, {"runs_dir": str(tmp_path / "runs"), "split": {"method": "time", "test_fraction": 0.2},
                             "online": {"retrain_on_feedback": True, "k": 3}})
    log = generate_interactions(SyntheticConfig(n_users=30, n_items=20, n_interactions=400), 0)
    raw = tmp_path / "raw.parquet"
    log.to_parquet(raw, index=False)
    now = pd.Timestamp.now(tz="UTC")
    imp = impressions.ImpressionLog(impressions.ImpressionSettings(tmp_path / "runs" / "online" / "impressions", 60),
                                    "recsys", 1)
    users = [str(u) for u in log.user_id.unique()[:25]] + ["stranger"]
    for i, user in enumerate(users):
        imp.log(f"r{i}", np.array([user]), np.array([[1, 2, 3, 4]]), np.array([[0.9, 0.8, 0.7, 0.6]]),
                ts=now.timestamp() + i)
    imp.close()
    inbox = tmp_path / "clicks.csv"
    pd.DataFrame({"request_id": ["r0", "r1"], "item_id": ["2", "1"], "ts": [now.isoformat()] * 2}).to_csv(inbox, index=False)
    feedback.ingest(inbox, tmp_path / "runs" / "online" / "feedback")

    added = retrain.append_feedback(raw, cfg)

    assert (added.rows, added.clicks, added.unknown) == (75, 2, 3)  # 25 users x k=3; the stranger's 3 left out
    both = pd.read_parquet(raw)
    new = both.iloc[len(log):]
    assert len(both) == len(log) + 75 and list(both.columns) == list(log.columns)
    assert new.timestamp.min() > log.timestamp.max() and new.isna().sum().sum() == 0
    one = new[(new.user_id == int(users[0])) & (new.item_id == 2)].iloc[0]
    assert one.click == 1 and one.user_age == log[log.user_id == int(users[0])].iloc[-1].user_age
    split = split_raw(raw, cfg.split, cfg.columns, cfg.seed, tmp_path / "split")
    test = pd.read_parquet(split.test)
    assert (test.timestamp >= new.timestamp.min()).sum() == 75  # every feedback row is in the test set


def test_retraining_on_feedback_needs_a_time_split():
    with pytest.raises(ValidationError, match="split.method: time"):
        load_config(None, {"online": {"retrain_on_feedback": True}})
