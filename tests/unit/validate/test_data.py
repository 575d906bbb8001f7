import json
import time

import pytest

from pipeline_lib.config import ColumnsConfig, DriftConfig, SyntheticConfig, ValidationConfig
from pipeline_lib.data.synthetic import generate_interactions
from pipeline_lib.errors import DataValidationError
from pipeline_lib.validate.data import (compute_drift, drift_markdown, drift_report,
                                        find_previous_stats, validate_raw)


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


def _cols(**feature_over):
    """The default roles with some fields of some features replaced: {'user_age': {'min': 0}}."""
    cols = ColumnsConfig()
    feats = [f.model_copy(update=feature_over.get(f.name, {})) for f in cols.features]
    return ColumnsConfig.model_validate({**cols.model_dump(), "features": [f.model_dump() for f in feats]})


def test_null_rate_bounds_per_feature_and_global(raw):
    df, path = raw
    df.loc[:99, "user_age"] = None  # 20% nulls
    df.loc[:9, "device"] = None  # 2% nulls
    df.to_parquet(path)
    validate_raw(path, ColumnsConfig())  # no bound configured: nulls are allowed (FillMissing)
    with pytest.raises(DataValidationError) as err:
        validate_raw(path, _cols(user_age={"max_null_rate": 0.1}))
    assert len(err.value.problems) == 1
    assert "'user_age': null rate 0.200 above max_null_rate 0.1 [100 rows] (e.g. 'row 0')" in str(err.value)
    with pytest.raises(DataValidationError) as err:
        validate_raw(path, ColumnsConfig(), ValidationConfig(max_null_rate=0.01))
    assert {p.column for p in err.value.problems} == {"user_age", "device"}
    # a per-feature bound overrides the global one
    validate_raw(path, _cols(user_age={"max_null_rate": 0.5}, device={"max_null_rate": 0.05}),
                 ValidationConfig(max_null_rate=0.01))


def test_value_ranges(raw):
    df, path = raw
    df.loc[7, "user_age"] = 150.0
    df.loc[[8, 9], "user_age"] = -1.0
    df.to_parquet(path)
    with pytest.raises(DataValidationError) as err:
        validate_raw(path, _cols(user_age={"min": 0, "max": 120}))
    msg = str(err.value)
    assert "'user_age': value below min 0 [2 rows] (e.g. -1.0)" in msg
    assert "'user_age': value above max 120 [1 rows] (e.g. 150.0)" in msg
    validate_raw(path, _cols(user_age={"min": -1, "max": 150}))


def test_non_finite_continuous_values_are_a_problem_naming_column_and_count(raw):
    df, path = raw
    df.loc[3, "user_age"] = float("-inf")
    df.loc[5, "user_age"] = float("inf")
    df.loc[6, "item_price"] = float("inf")
    df.loc[7, "user_age"] = float("nan")  # missing, not a problem: the ETL fills it with the median
    df.to_parquet(path)
    with pytest.raises(DataValidationError) as err:
        validate_raw(path, ColumnsConfig())
    msg = str(err.value)
    assert "'user_age': continuous value is not finite (inf or -inf; a missing value must be null) [2 rows] (e.g. -inf)" in msg
    assert "'item_price': continuous value is not finite (inf or -inf; a missing value must be null) [1 rows] (e.g. inf)" in msg
    assert len(err.value.problems) == 2


def test_dtype_problems_timestamp_categorical_list(raw):
    df, path = raw
    df["timestamp"] = df["timestamp"].astype(str)
    df.loc[4, "timestamp"] = "yesterday"
    df["device"] = df["device"].map(lambda v: [v])  # a list column declared categorical
    df["item_tags"] = df["item_tags"].map(lambda v: "|".join(map(str, v)))
    df.to_parquet(path)
    with pytest.raises(DataValidationError) as err:
        validate_raw(path, ColumnsConfig())
    msg = str(err.value)
    assert "'timestamp': timestamp not castable to a number or a date [1 rows] (e.g. 'yesterday')" in msg
    assert "'device': categorical value must be a single value, not a list [500 rows]" in msg
    assert "'item_tags': list feature must hold lists (a separator-joined string needs 'separator:' on the feature) [500 rows]" in msg


def test_non_binary_label_names_count_and_example(raw):
    df, path = raw
    df["click"] = df["click"].astype(float)
    df.loc[[10, 11, 12], "click"] = 0.5
    df.to_parquet(path)
    with pytest.raises(DataValidationError, match=r"'click': label must be binary 0/1 \[3 rows\] \(e.g. 0.5\)"):
        validate_raw(path, ColumnsConfig())


def test_problems_name_the_users_file_from_the_load_report(raw):
    df, path = raw
    df.loc[3, "user_age"] = "old"
    df["user_age"] = df["user_age"].astype(str)
    df.to_parquet(path)
    report = {"files": {"interactions": "in/clicks.csv", "users": "in/users.csv"},
              "column_sources": {"user_age": "in/users.csv"}}
    with pytest.raises(DataValidationError, match=r"in/users.csv: column 'user_age': continuous value not castable"):
        validate_raw(path, ColumnsConfig(), load_report=report)
    df.drop(columns="device").to_parquet(path)
    with pytest.raises(DataValidationError, match=r"in/clicks.csv, in/users.csv: column 'device': required column is missing"):
        validate_raw(path, ColumnsConfig(), load_report=report)


# --- drift ---------------------------------------------------------------------------------------


def _stats(df, tmp_path, name):
    p = tmp_path / f"{name}.parquet"
    df.to_parquet(p)
    return json.loads(validate_raw(p, ColumnsConfig()).save(tmp_path / f"{name}.json").read_text())


def test_no_drift_between_two_samples_of_the_same_distribution(tmp_path):
    a = generate_interactions(SyntheticConfig(n_users=200, n_items=100, n_interactions=4000), 0)
    b = generate_interactions(SyntheticConfig(n_users=200, n_items=100, n_interactions=4000), 0).sample(frac=0.9, random_state=1)
    assert compute_drift(_stats(b, tmp_path, "b"), _stats(a, tmp_path, "a"), DriftConfig()) == []


def test_drift_findings_null_rate_cardinality_mean_std(tmp_path):
    a = generate_interactions(SyntheticConfig(n_users=200, n_items=100, n_interactions=4000), 0)
    b = a.copy()
    b.loc[: len(b) // 5, "user_country"] = None  # +20% nulls
    b["item_price"] = b["item_price"] * 3  # mean shift and std change
    b["device"] = b["device"].where(b["device"] != "tablet", "mobile")  # 3 -> 2 values
    b["item_tags"] = b["item_tags"].map(lambda v: v * 4)  # longer lists
    findings = compute_drift(_stats(b, tmp_path, "b"), _stats(a, tmp_path, "a"), DriftConfig())
    got = {(f.column, f.metric) for f in findings}
    assert got == {("user_country", "null_rate"), ("item_price", "mean"), ("item_price", "std"),
                   ("device", "cardinality"), ("item_tags", "mean_length"), ("item_tags", "std_length")}
    f = next(f for f in findings if f.column == "user_country")
    assert f.previous == 0.0 and f.current == pytest.approx(0.2, abs=0.01) and f.threshold == 0.05
    assert "column 'user_country': null_rate 0.0 ->" in str(f)
    # thresholds are configurable
    loose = DriftConfig(max_null_rate_change=0.5, max_cardinality_change=0.5, max_mean_shift=10, max_std_change=10)
    assert compute_drift(_stats(b, tmp_path, "b"), _stats(a, tmp_path, "a"), loose) == []
    # columns that appear or disappear
    prev = _stats(a, tmp_path, "a")
    cur = json.loads(json.dumps(prev))
    cur["columns"]["new_col"] = cur["columns"].pop("device")
    assert {(f.column, f.metric) for f in compute_drift(cur, prev, DriftConfig())} == {
        ("device", "column removed"), ("new_col", "column added")}


def test_previous_run_is_found_and_drift_json_written(tmp_path):
    runs = tmp_path / "runs"
    a = generate_interactions(SyntheticConfig(n_users=100, n_items=50, n_interactions=1000), 0)
    b = a.assign(user_age=a["user_age"] + 30)
    for name, df in (("old", b), ("prev", a), ("now", b)):
        (runs / name / "validated").mkdir(parents=True)
        json.dump(_stats(df, tmp_path, name), open(runs / name / "validated" / "stats.json", "w"))
        time.sleep(0.02)  # distinct mtimes: "prev" is the newest run other than "now"
    (runs / "no_stats").mkdir()
    assert find_previous_stats(runs, runs / "now") == runs / "prev" / "validated" / "stats.json"
    assert find_previous_stats(tmp_path / "none", runs / "now") is None
    out = runs / "now" / "validated" / "drift.json"
    report = drift_report(runs / "now" / "validated" / "stats.json", runs, runs / "now", DriftConfig(), out)
    assert report["drifted"] and report["previous"].endswith("prev/validated/stats.json")
    assert json.loads(out.read_text())["findings"][0]["column"] == "user_age"
    md = drift_markdown(report)
    assert "| user_age | mean |" in md and "1 finding(s)" in md
    first = drift_report(runs / "old" / "validated" / "stats.json", tmp_path / "empty", runs / "old", DriftConfig(), out)
    assert first["previous"] is None and not first["drifted"] and "nothing to compare" in drift_markdown(first)
