"""Session event data: the synthetic generator and event logs read from files."""
from pathlib import Path
import pandas as pd
import pytest
from pipeline_lib.data import sessions as session_data
from pipeline_lib.validate import sessions as session_checks
from pipeline_lib.config import load_config
from pipeline_lib.data.sources import read_load_report
from pipeline_lib.errors import DataValidationError
from pipeline_lib.config import SessionColumns, SessionSyntheticConfig


def test_session_files_keep_only_the_session_columns_and_report_a_used_clash(tmp_path):

    ev = pd.DataFrame({"sid": [1, 1, 2], "item_id": [7, 8, 7], "ts": [100, 160, 200], "note": ["a", "b", "c"]})
    ev.to_csv(tmp_path / "events.csv")
    pd.DataFrame({"item_id": [7, 8], "item_category": ["shoes", "socks"], "note": ["i", "j"]}).to_csv(tmp_path / "items.csv")
    data = {"source": "files", "interactions": {"path": str(tmp_path / "events.csv"),
                                                "rename": {"sid": "session_id", "ts": "timestamp"}},
            "items": {"path": str(tmp_path / "items.csv")}}
    cfg = load_config(None, {"task": "session", "data": data})
    raw = session_data.write_raw_events(cfg.data, cfg.session, cfg.seed, tmp_path / "raw")
    df = pd.read_parquet(raw)
    assert list(df.columns) == ["session_id", "item_id", "timestamp", "item_category"]
    assert df["item_category"].tolist() == ["shoes", "socks", "shoes"]
    assert {Path(f).name: c for f, c in read_load_report(raw)["ignored_columns"].items()} == {
        "events.csv": ["Unnamed: 0", "note"], "items.csv": ["Unnamed: 0", "note"]}
    session_checks.validate_events(raw, cfg.session.columns, tmp_path / "validated")
    # a used column in both files is an error naming both (it used to become item_category_x/_y)
    ev.assign(item_category=["a", "b", "c"]).to_csv(tmp_path / "events.csv")
    with pytest.raises(DataValidationError) as err:
        session_data.write_raw_events(cfg.data, cfg.session, cfg.seed, tmp_path / "raw2")
    (p,) = err.value.problems
    assert p.column == "item_category" and p.file == str(tmp_path / "items.csv")
    assert str(tmp_path / "events.csv") in p.issue


COLS = SessionColumns()


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
