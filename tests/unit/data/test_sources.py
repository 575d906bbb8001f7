"""Bring your own data: CSV/parquet tables by config, joins, list separators, label rules, renames.

Every bad input must end in one DataValidationError (or a pydantic error for a bad config) that
names the file, the column, a count and an example value.
"""
import io
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from pydantic import ValidationError

from pipeline_lib.config import RunConfig, load_config, parse_label_rule
from pipeline_lib.data.sources import read_load_report, write_raw
from pipeline_lib.errors import DataValidationError
from pipeline_lib.validate.data import validate_raw
from pipeline_lib.config import DataConfig, SyntheticConfig
from pipeline_lib.data.synthetic import generate_interactions
import shutil
from pipeline_lib.data.sources import load_movielens100k
from tests.support import ML, ML_EXAMPLE, ROOT, ml_config

SHOP = ROOT / "tests" / "fixtures" / "shop"
EXAMPLE = ROOT / "configs" / "examples" / "csv_users_items.yaml"


def shop_config(inter=None, users=None, items=None, **over) -> RunConfig:
    """The CSV example config with absolute fixture paths (optionally other files)."""
    data = {"interactions": {"path": str(inter or SHOP / "interactions.csv"), "rename": {"product_id": "item_id"}},
            "users": {"path": str(users or SHOP / "users.csv")},
            "items": {"path": str(items or SHOP / "items.csv"), "rename": {"product_id": "item_id"}}}
    return load_config(EXAMPLE, {"data": data, **over})


def build(cfg: RunConfig, tmp: Path):
    raw = write_raw(cfg.data, cfg.seed, tmp / "raw", cfg.columns)
    return raw, pd.read_parquet(raw)


def test_example_configs_validate_and_default_yaml_is_embedded_default():
    for p in sorted((ROOT / "configs" / "examples").glob("*.yaml")):
        load_config(p)
    assert {p.stem for p in (ROOT / "configs" / "examples").glob("*.yaml")} >= {
        "parquet_single_table", "csv_users_items", "time_split", "movielens100k"}
    assert load_config(ROOT / "configs" / "default.yaml") == RunConfig()


def test_csv_interactions_users_items_become_one_denormalised_table(tmp_path):
    cfg = shop_config()
    raw, df = build(cfg, tmp_path)
    inter = pd.read_csv(SHOP / "interactions.csv")
    users = pd.read_csv(SHOP / "users.csv")
    items = pd.read_csv(SHOP / "items.csv")
    assert len(df) == len(inter)  # left join keeps every interaction, once
    # renamed id, joined features, derived label as int 0/1
    assert "item_id" in df and "product_id" not in df
    assert df["liked"].dtype == np.int64
    np.testing.assert_array_equal(df["liked"], (inter["rating"] >= 4).astype(int))
    row = df.iloc[7]
    assert row["age"] == users.set_index("user_id").loc[row["user_id"], "age"]
    assert row["genres"].tolist() == items.set_index("product_id").loc[row["item_id"], "genres"].split("|")
    # ISO time strings -> epoch seconds (time split needs numbers)
    assert df["time"].dtype == np.int64
    assert df["time"].iloc[0] == pd.Timestamp(inter["time"].iloc[0]).value // 10**9
    # validation passes and names the user's files
    report = validate_raw(raw, cfg.columns, cfg.validation)
    assert report.n_rows == len(inter) and report.warnings == []
    assert report.sources == {"interactions": str(SHOP / "interactions.csv"), "users": str(SHOP / "users.csv"),
                              "items": str(SHOP / "items.csv")}
    assert report.stats["genres"]["kind"] == "list" and report.stats["genres"]["cardinality"] == 7


def test_fsspec_urls_and_parquet_tables(tmp_path):
    users = pd.read_csv(SHOP / "users.csv")
    users.to_parquet(tmp_path / "users.parquet")
    cfg = shop_config(users=f"file://{tmp_path / 'users.parquet'}",
                      inter=f"file://{SHOP / 'interactions.csv'}")
    _, df = build(cfg, tmp_path)
    assert df["country"].notna().all() and len(df) == 500


def test_parquet_source_accepts_a_file_url(tmp_path):
    from pipeline_lib.config import SyntheticConfig

    src = generate_interactions(SyntheticConfig(n_users=20, n_items=20, n_interactions=200), 0)
    src.to_parquet(tmp_path / "in.parquet")
    cfg = load_config(None, {"data": {"source": "parquet", "path": f"file://{tmp_path / 'in.parquet'}"}})
    raw, df = build(cfg, tmp_path)
    pd.testing.assert_frame_equal(df, src)
    validate_raw(raw, cfg.columns, cfg.validation)


def test_separator_list_of_integers_and_headerless_csv(tmp_path):
    (tmp_path / "i.csv").write_text("1;10;1;4|7\n2;11;0;5\n3;10;1;\n")
    cfg = load_config(None, {
        "data": {"source": "files", "interactions": {"path": str(tmp_path / "i.csv"), "sep": ";", "header": False,
                                                     "names": ["user_id", "item_id", "click", "tags"]}},
        "columns": {"timestamp": None, "features": [{"name": "tags", "kind": "list", "separator": "|"}]},
    })
    raw, df = build(cfg, tmp_path)
    assert df["tags"].map(list).tolist() == [[4, 7], [5], []]
    validate_raw(raw, cfg.columns, cfg.validation)


def test_movielens_dat_files_with_a_two_character_separator(tmp_path):
    """MovieLens 1M/10M layout: '::'-separated .dat files without a header, latin-1 titles, '|' genres."""
    (tmp_path / "ratings.dat").write_text("1::1193::5::978300760\n1::661::3::978302109\n2::1193::4::978298413\n")
    (tmp_path / "movies.dat").write_bytes("1193::Cuckoo\xe9s Nest (1975)::Drama\n661::Peach (1996)::Animation|Children's\n"
                                          .encode("latin-1"))
    cfg = load_config(None, {
        "data": {"source": "files",
                 "interactions": {"path": str(tmp_path / "ratings.dat"), "sep": "::", "header": False,
                                  "names": ["user_id", "item_id", "rating", "time"]},
                 "items": {"path": str(tmp_path / "movies.dat"), "sep": "::", "header": False, "encoding": "latin-1",
                           "names": ["item_id", "title", "genres"]}},
        "columns": {"label": "liked", "label_rule": "rating >= 4", "timestamp": "time",
                    "features": [{"name": "genres", "kind": "list", "side": "item", "separator": "|"}]},
    })
    assert cfg.data.interactions.resolved_format == "csv"  # .dat, and a sep: CSV
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no pandas ParserWarning: the python engine is asked for, sep literal
        raw, df = build(cfg, tmp_path)
    assert df["liked"].tolist() == [1, 0, 1] and df["time"].tolist() == [978300760, 978302109, 978298413]
    assert df["genres"].map(list).tolist() == [["Drama"], ["Animation", "Children's"], ["Drama"]]
    validate_raw(raw, cfg.columns, cfg.validation)


def test_the_movielens_1m_example_config_reads_that_layout(tmp_path):
    folder = tmp_path / "ml-1m"
    folder.mkdir()
    (folder / "ratings.dat").write_text("1::1193::5::978300760\n2::661::3::978302109\n2::1193::4::978298413\n")
    (folder / "users.dat").write_text("1::F::1::10::48067\n2::M::56::16::70072\n")
    (folder / "movies.dat").write_bytes("1193::Cuckoo\xe9s Nest (1975)::Drama\n661::Peach (1996)::Animation|Musical\n"
                                        .encode("latin-1"))
    cfg = load_config(ROOT / "configs" / "examples" / "movielens1m.yaml", {"data": {
        t: {"path": str(folder / f"{t if t != 'interactions' else 'ratings'}.dat")}
        for t in ("interactions", "users")} | {"items": {"path": str(folder / "movies.dat")}}})
    raw, df = build(cfg, tmp_path)
    assert df["gender"].tolist() == ["F", "M", "M"] and df["occupation"].tolist() == [10, 16, 16]
    assert df["genres"].map(list).tolist() == [["Drama"], ["Animation", "Musical"], ["Drama"]]
    validate_raw(raw, cfg.columns, cfg.validation)


def test_json_lines_and_json_array_interactions(tmp_path):
    """JSON Lines (Amazon reviews' layout, compressed too) and a JSON array; nested fields the config does not
    use are dropped; epoch-second times stay numbers."""
    rows = [{"reviewerID": "A1", "asin": "B01", "overall": 5.0, "unixReviewTime": 1400000000, "style": {"size": "M"}},
            {"reviewerID": "A2", "asin": "B01", "overall": 2.0, "unixReviewTime": 1400000100, "style": None},
            {"reviewerID": "A1", "asin": "B02", "overall": 4.0, "unixReviewTime": 1400000200}]
    pd.DataFrame(rows).to_json(tmp_path / "reviews.json.gz", orient="records", lines=True)
    (tmp_path / "array.json").write_text(pd.DataFrame(rows).to_json(orient="records"))
    for name in ("reviews.json.gz", "array.json"):
        cfg = load_config(None, {
            "data": {"source": "files", "interactions": {"path": str(tmp_path / name),
                                                         "rename": {"reviewerID": "user_id", "asin": "item_id"}}},
            "columns": {"label": "liked", "label_rule": "overall >= 4", "timestamp": "unixReviewTime", "features": []},
        })
        assert cfg.data.interactions.resolved_format == "json"
        raw, df = build(cfg, tmp_path / name.split(".")[0])
        assert df["user_id"].tolist() == ["A1", "A2", "A1"] and df["liked"].tolist() == [1, 0, 1]
        assert df["unixReviewTime"].tolist() == [1400000000, 1400000100, 1400000200] and "style" not in df
        validate_raw(raw, cfg.columns, cfg.validation)
    (tmp_path / "bad.jsonl").write_text('{"user_id": 1, "item_id": 2}\n{"user_id": 3,\n')
    bad = load_config(None, {"data": {"source": "files", "interactions": {"path": str(tmp_path / "bad.jsonl")}},
                             "columns": {"timestamp": None, "features": []}})
    with pytest.raises(DataValidationError, match=r"bad.jsonl: column '\*': file not readable as json: ValueError"):
        build(bad, tmp_path / "bad")


def test_missing_files_are_all_named_in_one_error(tmp_path):
    cfg = shop_config(users=tmp_path / "nope_users.csv", items=tmp_path / "nope_items.csv")
    with pytest.raises(DataValidationError) as err:
        build(cfg, tmp_path)
    msg = str(err.value)
    assert len(err.value.problems) == 2
    assert "nope_users.csv: column '*': file not found" in msg and "nope_items.csv" in msg


def test_unreadable_csv_is_a_clear_error(tmp_path):
    bad = tmp_path / "interactions.csv"
    bad.write_bytes(b"user_id,item_id\n1,2\n3,4,5,6\n")  # a row with too many fields
    with pytest.raises(DataValidationError, match=r"interactions.csv: column '\*': file not readable as csv: ParserError"):
        build(shop_config(inter=bad), tmp_path)
    bad.write_bytes(b"user_id,item_id\n\xff\xfe\x00bad,1\n")
    with pytest.raises(DataValidationError, match="file not readable as csv: UnicodeDecodeError"):
        build(shop_config(inter=bad), tmp_path)


def test_missing_join_key_and_duplicate_ids_in_feature_tables(tmp_path):
    users = pd.read_csv(SHOP / "users.csv").rename(columns={"user_id": "uid"})
    users.to_csv(tmp_path / "users.csv", index=False)
    items = pd.read_csv(SHOP / "items.csv")
    items = pd.concat([items, items.iloc[[3]]])
    items.to_csv(tmp_path / "items.csv", index=False)
    with pytest.raises(DataValidationError) as err:
        build(shop_config(users=tmp_path / "users.csv", items=tmp_path / "items.csv"), tmp_path)
    msg = str(err.value)
    assert len(err.value.problems) == 2
    assert "users.csv: column 'user_id': join key missing from the users table" in msg and "'uid'" in msg
    assert "items.csv: column 'item_id': id appears more than once in the items table [2 rows] (e.g. 4)" in msg


def test_unmatched_join_ids_are_an_error_or_a_warning(tmp_path):
    users = pd.read_csv(SHOP / "users.csv")
    users[users["user_id"] != 12].to_csv(tmp_path / "users.csv", index=False)  # user 12 has no features
    n12 = int((pd.read_csv(SHOP / "interactions.csv")["user_id"] == 12).sum())
    cfg = shop_config(users=tmp_path / "users.csv", validation={"max_null_rate": 1.0})
    raw, df = build(cfg, tmp_path)
    assert len(df) == 500 and df.loc[df["user_id"] == 12, "age"].isna().all()
    assert read_load_report(raw)["unmatched"][0]["rows"] == n12
    with pytest.raises(DataValidationError) as err:
        validate_raw(raw, cfg.columns, cfg.validation)
    msg = str(err.value)
    assert (f"users.csv: column 'user_id': 1 id(s) used in the interactions have no row in the users table "
            f"(their user features are null) [{n12} rows] (e.g. 12)") in msg
    # the example bounds 'country' at max_null_rate 0: the unmatched user's null country is caught too
    assert f"column 'country': null rate {n12 / 500:.3f} above max_null_rate 0 [{n12} rows]" in msg
    warn = shop_config(users=tmp_path / "users.csv", validation={"max_null_rate": 1.0, "unmatched_ids": "warn"})
    features = [f.model_copy(update={"max_null_rate": None}) for f in warn.columns.features]
    report = validate_raw(raw, warn.columns.model_copy(update={"features": features}), warn.validation)
    assert len(report.warnings) == 1 and "no row in the users table" in report.warnings[0]


def test_unmatched_ids_combine_with_other_problems_in_one_message(tmp_path):
    users = pd.read_csv(SHOP / "users.csv")
    users.loc[users["user_id"] == 3, "age"] = 250
    users[users["user_id"] != 12].to_csv(tmp_path / "users.csv", index=False)
    cfg = shop_config(users=tmp_path / "users.csv")
    raw, _ = build(cfg, tmp_path)
    with pytest.raises(DataValidationError) as err:
        validate_raw(raw, cfg.columns, cfg.validation)
    issues = {(p.column, p.issue.split(" ")[0]) for p in err.value.problems}
    assert ("user_id", "1") in issues  # unmatched ids
    assert ("age", "value") in issues  # above max 120, named in users.csv
    assert all(p.file == str(tmp_path / "users.csv") for p in err.value.problems if p.column in ("age", "country"))


def test_bad_label_rules_are_config_errors_naming_the_rule():
    for rule in ["rating => 4", "rating >= four", "__import__('os').system('x') > 1", "rating >= 4 and 1", ">= 4"]:
        with pytest.raises(ValidationError, match="is not '<column> <op> <number>'"):
            load_config(EXAMPLE, {"columns": {"label_rule": rule}})
    assert parse_label_rule("score!=-1.5") == ("score", "!=", -1.5)


@pytest.mark.parametrize("rule,expected", [("rating > 4", [0, 0, 1]), ("rating <= 3", [1, 0, 0]), ("rating == 4", [0, 1, 0]),
                                           ("rating != 4", [1, 0, 1]), ("rating < 4", [1, 0, 0]), ("rating >= 4", [0, 1, 1])])
def test_label_rule_operators(tmp_path, rule, expected):
    (tmp_path / "i.csv").write_text("user_id,item_id,rating\n1,1,3\n1,2,4\n2,1,5\n")
    cfg = load_config(None, {"data": {"source": "files", "interactions": {"path": str(tmp_path / "i.csv")}},
                             "columns": {"label": "y", "label_rule": rule, "timestamp": None, "features": []}})
    _, df = build(cfg, tmp_path)
    assert df["y"].tolist() == expected


def test_label_rule_on_missing_or_non_numeric_column(tmp_path):
    (tmp_path / "i.csv").write_text("user_id,item_id,rating\n1,1,3\n1,2,good\n2,1,5\n")
    base = {"data": {"source": "files", "interactions": {"path": str(tmp_path / "i.csv")}},
            "columns": {"label": "y", "timestamp": None, "features": []}}
    cfg = load_config(None, base | {"columns": {**base["columns"], "label_rule": "stars >= 4"}})
    with pytest.raises(DataValidationError, match=r"i.csv: column 'stars': label_rule 'stars >= 4': column not found"):
        build(cfg, tmp_path)
    cfg = load_config(None, base | {"columns": {**base["columns"], "label_rule": "rating >= 4"}})
    with pytest.raises(DataValidationError, match=r"column 'rating': .*not a number \[1 rows\] \(e.g. 'good'\)"):
        build(cfg, tmp_path)


def test_config_rejects_misplaced_options():
    with pytest.raises(ValidationError, match="'separator' applies to list features only"):
        load_config(None, {"columns": {"features": [{"name": "x", "kind": "categorical", "separator": "|"}]}})
    with pytest.raises(ValidationError, match="'min'/'max' apply to continuous"):
        load_config(None, {"columns": {"features": [{"name": "x", "kind": "categorical", "min": 0}]}})
    with pytest.raises(ValidationError, match="data.interactions is required"):
        load_config(None, {"data": {"source": "files"}})
    with pytest.raises(ValidationError, match="header: false needs names"):
        load_config(None, {"data": {"source": "files", "interactions": {"path": "x.csv", "header": False}}})


def test_rename_of_a_column_the_file_lacks(tmp_path):
    cfg = shop_config()
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={
        "users": cfg.data.users.model_copy(update={"rename": {"usr": "user_id"}})})})
    with pytest.raises(DataValidationError, match=r"users.csv: column 'usr': rename: column not in the file"):
        build(cfg, tmp_path)


def test_parquet_example_config_on_generated_data(tmp_path):
    from pipeline_lib.config import SyntheticConfig

    generate_interactions(SyntheticConfig(n_users=50, n_items=40, n_interactions=500), 0).to_parquet(tmp_path / "in.parquet")
    cfg = load_config(ROOT / "configs" / "examples" / "parquet_single_table.yaml",
                      {"data": {"path": str(tmp_path / "in.parquet")}})
    raw, df = build(cfg, tmp_path)
    assert validate_raw(raw, cfg.columns, cfg.validation).n_rows == 500


def test_csv_example_with_a_string_list_goes_through_the_nvtabular_workflow(tmp_path):
    from pipeline_lib.etl import workflow as etl

    cfg = load_config(None, shop_config().model_dump(mode="json") | {"split": {"method": "time", "valid_fraction": 0.2}})
    raw, df = build(cfg, tmp_path)
    validate_raw(raw, cfg.columns, cfg.validation)
    split = etl.split_raw(raw, cfg.split, cfg.columns, cfg.seed, tmp_path / "split")
    train, valid = pd.read_parquet(split.train), pd.read_parquet(split.valid)
    assert train["time"].max() <= valid["time"].min()  # time split on the parsed ISO times
    out = etl.fit_transform(cfg.columns, cfg.etl, split, tmp_path / "transformed")
    got = pd.read_parquet(next(out.train_dir.glob("*.parquet")))
    assert set(got.columns) == set(cfg.columns.input_columns)
    genres = got["genres"].map(list)
    assert genres.map(len).tolist() == train["genres"].map(len).tolist()
    assert min(min(g) for g in genres) >= 1  # string genres encoded as vocabulary indices


# --- only the columns the config uses are read ----------------------------------------------------

BYO_COLUMNS = {"user_id": "user_id", "item_id": "item_id", "label": "click", "timestamp": "ts",
               "features": [{"name": "age", "kind": "continuous", "side": "user"},
                            {"name": "category", "kind": "categorical", "side": "item"},
                            {"name": "device", "kind": "categorical", "side": "context"}]}


def _byo_files(tmp_path, items_extra=None):
    """interactions.csv, users.parquet and items.csv as a public log ships them: each written with
    DataFrame.to_csv's unnamed index column and an unused 'note' column of the same name."""
    inter = pd.DataFrame({"user_id": [1, 2, 1, 3], "item_id": [10, 11, 12, 10], "click": [1, 0, 0, 1],
                          "ts": [100, 200, 300, 400], "device": ["m", "d", "m", "t"], "note": ["a", "b", "c", "d"]})
    users = pd.DataFrame({"user_id": [1, 2, 3], "age": [30.0, 41.0, 25.0], "note": ["u1", "u2", "u3"]})
    items = pd.DataFrame({"item_id": [10, 11, 12], "category": ["x", "y", "z"], "note": ["i1", "i2", "i3"],
                          **(items_extra or {})})
    inter.to_csv(tmp_path / "interactions.csv")  # index=True: header ',user_id,...' -> 'Unnamed: 0'
    items.to_csv(tmp_path / "items.csv")
    pd.read_csv(io.StringIO(users.to_csv())).to_parquet(tmp_path / "users.parquet")
    data = {"source": "files", "interactions": {"path": str(tmp_path / "interactions.csv")},
            "users": {"path": str(tmp_path / "users.parquet")}, "items": {"path": str(tmp_path / "items.csv")}}
    return data, inter


def test_unnamed_index_and_unused_columns_in_every_file_are_ignored(tmp_path, caplog):
    data, inter = _byo_files(tmp_path)
    assert "Unnamed: 0" in pd.read_csv(tmp_path / "items.csv") and "Unnamed: 0" in pd.read_parquet(tmp_path / "users.parquet")
    cfg = load_config(None, {"data": data, "columns": BYO_COLUMNS})
    with caplog.at_level("INFO", logger="pipeline_lib.data.sources"):
        raw, df = build(cfg, tmp_path)
    # exactly the columns the config uses, in file order then join order
    assert list(df.columns) == ["user_id", "item_id", "click", "ts", "device", "age", "category"]
    assert df["user_id"].tolist() == [1, 2, 1, 3] and df["click"].tolist() == [1, 0, 0, 1]
    assert df["age"].tolist() == [30.0, 41.0, 30.0, 25.0]  # joined from users.parquet
    assert df["category"].tolist() == ["x", "y", "z", "x"]  # joined from items.csv
    assert df["device"].tolist() == inter["device"].tolist()
    report = read_load_report(raw)
    ignored = {Path(f).name: cols for f, cols in report["ignored_columns"].items()}
    assert ignored == {"interactions.csv": ["Unnamed: 0", "note"], "users.parquet": ["Unnamed: 0", "note"],
                       "items.csv": ["Unnamed: 0", "note"]}
    assert report["column_sources"]["age"].endswith("users.parquet")
    logged = [r.getMessage() for r in caplog.records if "ignoring" in r.getMessage()]
    assert len(logged) == 3 and any("items.csv: ignoring 2 column(s)" in m and "'Unnamed: 0', 'note'" in m for m in logged)
    validate_raw(raw, cfg.columns, cfg.validation)


def test_a_clash_on_a_used_column_still_names_the_column_and_both_files(tmp_path):
    data, _ = _byo_files(tmp_path, items_extra={"device": ["m", "m", "d"]})  # 'device' is a used feature
    cfg = load_config(None, {"data": data, "columns": BYO_COLUMNS})
    with pytest.raises(DataValidationError) as err:
        build(cfg, tmp_path)
    assert len(err.value.problems) == 1  # 'Unnamed: 0' and 'note' are in every file too, but unused
    p = err.value.problems[0]
    assert p.column == "device" and p.file == str(tmp_path / "items.csv")
    assert f"items.csv: column 'device': column also present in {tmp_path / 'interactions.csv'}" in str(err.value)


def test_a_used_column_missing_everywhere_is_still_named_with_the_ignored_columns_as_hint(tmp_path):
    data, _ = _byo_files(tmp_path)
    cols = {**BYO_COLUMNS, "features": BYO_COLUMNS["features"] + [{"name": "Note", "kind": "categorical"}]}
    cfg = load_config(None, {"data": data, "columns": cols})
    raw, df = build(cfg, tmp_path)
    with pytest.raises(DataValidationError) as err:
        validate_raw(raw, cfg.columns, cfg.validation)
    (p,) = err.value.problems
    assert p.column == "Note" and p.issue == "required column is missing"
    assert all(str(tmp_path / f) in p.file for f in ("interactions.csv", "users.parquet", "items.csv"))
    assert "note" in p.example and "Unnamed: 0" in p.example  # what the files had instead
    # a label rule on a column no file has: named with the interactions file, ignored columns listed
    cfg = load_config(None, {"data": data, "columns": {**BYO_COLUMNS, "label": "y", "label_rule": "stars >= 4"}})
    with pytest.raises(DataValidationError, match=r"interactions.csv: column 'stars': label_rule .*column not found.*'note'"):
        build(cfg, tmp_path)


# --- moved from tests/test_data.py ----------------------------------------------


CFG = SyntheticConfig(n_users=500, n_items=300, n_interactions=20_000)


def test_write_raw_synthetic_and_parquet_roundtrip(tmp_path):
    p = write_raw(DataConfig(synthetic=CFG), 3, tmp_path / "a")
    df = pd.read_parquet(p)
    assert len(df) == CFG.n_interactions
    q = write_raw(DataConfig(source="parquet", path=p), 0, tmp_path / "b")
    pd.testing.assert_frame_equal(pd.read_parquet(q), df)


# --- moved from tests/test_movielens.py -----------------------------------------


def test_fixture_is_in_the_ml100k_format():
    data = (ML / "u.data").read_text().splitlines()
    assert len(data) >= 300 and all(len(line.split("\t")) == 4 for line in data)
    genres = [line.split("|") for line in (ML / "u.genre").read_text().splitlines() if line]
    assert len(genres) == 19 and genres[1] == ["Action", "1"]
    items = (ML / "u.item").read_bytes().decode("latin-1").splitlines()
    assert all(len(line.split("|")) == 5 + 19 for line in items)
    assert all(len(line.split("|")) == 5 for line in (ML / "u.user").read_text().splitlines())


def test_loader_turns_genre_flags_into_a_list_and_derives_the_label(tmp_path):
    tables = {t.role: t for t in load_movielens100k(ML)}
    items = tables["items"].df.set_index("item_id")
    for line in (ML / "u.item").read_bytes().decode("latin-1").splitlines()[:10]:
        f = line.split("|")
        assert items.loc[int(f[0]), "genres"] == [g for g, flag in enumerate(f[5:]) if flag == "1"]
        assert items.loc[int(f[0]), "title"] == f[1]
    assert items.loc[4, "title"].startswith("Café")  # latin-1
    assert np.isnan(items["release_year"].iloc[-1]) and items["genres"].iloc[-1] == [0]  # the "unknown" movie
    cfg = load_config(ML_EXAMPLE, ml_config(tmp_path))
    raw = write_raw(cfg.data, cfg.seed, tmp_path / "raw", cfg.columns)
    df = pd.read_parquet(raw)
    ratings = pd.read_csv(ML / "u.data", sep="\t", header=None, names=["u", "i", "r", "t"])
    assert len(df) == len(ratings)
    np.testing.assert_array_equal(df["liked"], (ratings["r"] >= 4).astype(int))
    assert df["liked"].dtype == np.int64
    assert {"user_id", "item_id", "timestamp", "age", "gender", "occupation", "genres", "release_year"} <= set(df.columns)
    report = validate_raw(raw, cfg.columns, cfg.validation)
    assert report.stats["genres"]["kind"] == "list" and report.stats["occupation"]["cardinality"] == 7


def test_missing_or_malformed_ml100k_files(tmp_path):
    bad = tmp_path / "ml"
    shutil.copytree(ML, bad)
    (bad / "u.user").unlink()
    (bad / "u.genre").write_text("unknown|0\nAction|1\n")  # 2 genres but u.item has 19 flags
    with pytest.raises(DataValidationError) as err:
        load_movielens100k(bad)
    msg = str(err.value)
    assert f"{bad}/u.user: column '*': file not found (expected the GroupLens ml-100k layout)" in msg
    with pytest.raises(DataValidationError, match=r"u.item: column '\*': expected 5 \+ 2 genre columns"):
        (bad / "u.user").write_text((ML / "u.user").read_text())
        load_movielens100k(bad)
