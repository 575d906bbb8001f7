"""Session ETL: grouping, sorting, filtering, truncation, schema tags and the time split."""
from __future__ import annotations
import numpy as np
import pandas as pd
from pipeline_lib.etl import sessions
from pipeline_lib.config import SessionColumns, load_config


COLS = SessionColumns()


def _events() -> pd.DataFrame:
    """Hand-made log: session 10 arrives out of order, 20 has one event, 30 has 7 (max length 5)."""
    rows = [
        (10, 103, 1, 1_000), (10, 101, 1, 900), (10, 102, 2, 950),   # sorted: 101, 102, 103
        (20, 104, 3, 500),                                           # too short: dropped
        *[(30, 200 + j, j % 2, 2_000 + 10 * j * j) for j in range(7)],  # 7 events, deltas grow
        (40, 101, 1, 3_000), (40, 102, 2, 3_001),
        (50, 103, 1, 4_000), (50, 101, 1, 4_002),
    ]
    df = pd.DataFrame(rows, columns=["session_id", "item_id", "item_category", "timestamp"])
    return df.sample(frac=1.0, random_state=0).reset_index(drop=True)  # shuffled event order


def test_session_etl_groups_sorts_filters_truncates_and_tags(tmp_path):
    from merlin.io import Dataset
    from merlin.schema import Tags

    events = tmp_path / "events.parquet"
    _events().to_parquet(events, index=False)
    cfg = load_config(None, {"task": "session", "split": {"method": "time", "valid_fraction": 0.25,
                                                                "test_fraction": 0.25},
                             "session": {"etl": {"min_session_length": 2, "max_session_length": 5}}})
    out = sessions.run_session_etl(events, cfg, tmp_path / "transformed", tmp_path / "split")

    grouped = pd.read_parquet(out.sessions_path).set_index("session_id")
    assert sorted(grouped.index) == [10, 30, 40, 50]  # session 20 (1 event) filtered out
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

    # split by session (time): the session that starts last is test, the one before it validation
    tr, va, te = (pd.read_parquet(p) for p in (out.split.train, out.split.valid, out.split.test))
    assert sorted(tr.session_id) == [10, 30] and list(va.session_id) == [40] and list(te.session_id) == [50]
    assert list(te.item_id.iloc[0]) == [103, 101]  # whole sessions, raw (never transformed)

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
    cfg = load_config(None, {"task": "session", "split": {"method": "time", "valid_fraction": 0.4,
                                                          "test_fraction": 0.2}})
    out = sessions.split_sessions(tmp_path / "s.parquet", cfg.split, COLS, 0, tmp_path / "split")
    assert sorted(pd.read_parquet(out.test).session_id) == [1]       # starts last (50)
    assert sorted(pd.read_parquet(out.valid).session_id) == [3, 5]   # then 40, 30
    assert sorted(pd.read_parquet(out.train).session_id) == [2, 4]


def test_random_session_split_keeps_sessions_whole_and_disjoint(tmp_path):
    n = 400
    df = pd.DataFrame({"session_id": np.arange(n), "item_id": [[i, i + 1, i + 2] for i in range(n)],
                       "item_category": [[1, 1, 1]] * n, "timestamp": [[t, t + 1, t + 2] for t in range(n)]})
    df.to_parquet(tmp_path / "s.parquet", index=False)
    cfg = load_config(None, {"task": "session", "split": {"valid_fraction": 0.15, "test_fraction": 0.2}})
    out = sessions.split_sessions(tmp_path / "s.parquet", cfg.split, COLS, 3, tmp_path / "split")
    parts = {name: pd.read_parquet(getattr(out, name)) for name in ("train", "valid", "test")}
    ids = {name: set(p.session_id) for name, p in parts.items()}
    assert not (ids["train"] & ids["valid"]) and not (ids["train"] & ids["test"]) and not (ids["valid"] & ids["test"])
    assert set().union(*ids.values()) == set(range(n))
    assert 0.1 < len(ids["valid"]) / n < 0.2 and 0.15 < len(ids["test"]) / n < 0.25
    for p in parts.values():  # every held-out session whole: all its events
        assert all(len(v) == 3 for v in p.item_id)
