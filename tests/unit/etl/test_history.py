"""etl.history (pipeline_lib/etl/history.py): the user-history features come from strictly earlier events."""
import numpy as np
import pandas as pd
import pytest

from pipeline_lib.config import ColumnsConfig, RunConfig
from pipeline_lib.etl import history

COLUMNS = ColumnsConfig(label="click")


def frame() -> pd.DataFrame:
    # user 1: t=1 (neg), two events at t=5 (one pos each side of the tie), t=9; user 2: t=3 (pos), t=4
    return pd.DataFrame({"user_id": [1, 1, 1, 2, 1, 2], "item_id": [10, 11, 12, 10, 13, 14],
                         "click": [1, 0, 1, 1, 1, 0], "timestamp": [5, 1, 5, 3, 9, 4]},
                        index=[10, 11, 12, 13, 14, 15])


def test_features_count_only_strictly_earlier_events_of_the_same_user():
    out = history.add_history_features(frame(), COLUMNS, max_items=3)
    assert list(out.index) == [10, 11, 12, 13, 14, 15]  # the input's rows and order
    np.testing.assert_array_equal(out[history.COUNT], [1, 0, 1, 0, 3, 1])  # the t=5 pair does not see itself
    np.testing.assert_allclose(out[history.POSITIVE_RATE], [0, np.nan, 0, np.nan, 2 / 3, 1])
    np.testing.assert_allclose(out[history.GAP], [4, np.nan, 4, np.nan, 4, 1])
    hist = out[history.history_column(COLUMNS)].tolist()
    assert hist == [[], [], [], [], [10, 12], [10]]


def test_a_rows_own_label_never_changes_its_features():
    df = frame()
    flipped = df.assign(click=1 - df["click"])
    a, b = (history.add_history_features(x, COLUMNS, 3) for x in (df, flipped))
    last = df["timestamp"].groupby(df["user_id"]).transform("max") == df["timestamp"]
    # each user's latest events: their features depend on earlier labels only, which the flip changed
    # for the others; flipping only the latest events' labels changes nothing at all
    only_last = df.assign(click=np.where(last, 1 - df["click"], df["click"]))
    c = history.add_history_features(only_last, COLUMNS, 3)
    pd.testing.assert_frame_equal(a.drop(columns="click"), c.drop(columns="click"))
    assert not a[history.POSITIVE_RATE].equals(b[history.POSITIVE_RATE])


def test_max_items_keeps_the_most_recent_positives_and_zero_adds_no_list():
    df = pd.DataFrame({"user_id": [1] * 5, "item_id": [1, 2, 3, 4, 5], "click": [1] * 5, "timestamp": range(5)})
    out = history.add_history_features(df, COLUMNS, max_items=2)
    assert out[history.history_column(COLUMNS)].tolist() == [[], [1], [1, 2], [2, 3], [3, 4]]
    assert history.history_column(COLUMNS) not in history.add_history_features(df, COLUMNS, max_items=0)


def test_clear_errors_for_a_missing_timestamp_or_a_clashing_column():
    with pytest.raises(ValueError, match="no timestamp column 'timestamp'"):
        history.add_history_features(frame().drop(columns="timestamp"), COLUMNS, 3)
    with pytest.raises(ValueError, match="'history_count'"):
        history.add_history_features(frame().assign(history_count=1), COLUMNS, 3)
    with pytest.raises(ValueError, match="etl.history.enabled needs columns.timestamp"):
        RunConfig.model_validate({"columns": {"timestamp": None}, "etl": {"history": {"enabled": True}}})


def test_next_row_history_is_what_a_later_row_of_each_user_would_get():
    """The feature snapshot's history features (user-id ranking requests): count and positive rate as a row after
    every training event would have them; the gap is only known at request time (NaN)."""
    df = frame()
    later = pd.DataFrame({"user_id": [1, 2], "item_id": [99, 99], "click": [0, 0], "timestamp": [100, 100]},
                         index=[98, 99])
    want = history.add_history_features(pd.concat([df, later]), COLUMNS, max_items=0).loc[[98, 99]]
    got = history.next_row_history(df, COLUMNS)
    assert list(got.index) == [1, 2] and list(got.columns) == list(history.NUMERIC)
    np.testing.assert_allclose(got[history.COUNT], want[history.COUNT])
    np.testing.assert_allclose(got[history.POSITIVE_RATE], want[history.POSITIVE_RATE])
    assert got[history.GAP].isna().all()
