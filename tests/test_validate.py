import pandas as pd
import pytest

from pipeline_lib.config import ColumnsConfig, SyntheticConfig
from pipeline_lib.data import generate_interactions
from pipeline_lib.validate import DataValidationError, validate_raw


@pytest.fixture
def raw(tmp_path):
    df = generate_interactions(SyntheticConfig(n_users=50, n_items=40, n_interactions=500), 0)
    return df, tmp_path / "raw.parquet"


def test_valid_data_passes_with_stats(raw):
    df, path = raw
    df.to_parquet(path)
    report = validate_raw(path, ColumnsConfig())
    assert report.n_rows == 500
    assert report.stats["click"]["mean"] == pytest.approx(df["click"].mean())
    assert report.stats["item_tags"]["mean_length"] >= 1
    assert report.stats["user_country"]["cardinality"] == df["user_country"].nunique()


def test_all_problems_reported_together(raw):
    df, path = raw
    df = df.drop(columns=["device"])
    df.loc[3, "click"] = 2
    df["item_price"] = df["item_price"].astype(str)
    df.loc[5, "item_price"] = "cheap"
    df.loc[[1, 2], "user_id"] = None
    df.to_parquet(path)
    with pytest.raises(DataValidationError) as err:
        validate_raw(path, ColumnsConfig())
    msg = str(err.value)
    assert len(err.value.problems) == 4
    assert "'device': required column is missing" in msg
    assert "'click': label must be binary" in msg and "[1 rows]" in msg
    assert "'item_price': continuous value not castable" in msg and "'cheap'" in msg
    assert "'user_id': id column has nulls [2 rows]" in msg
    assert str(path) in msg


def test_unreadable_file_is_a_clear_error(tmp_path):
    path = tmp_path / "broken.parquet"
    path.write_text("not parquet")
    with pytest.raises(DataValidationError, match="broken.parquet.*not readable"):
        validate_raw(path, ColumnsConfig())
