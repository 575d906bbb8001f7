"""The fast CPU ETL path (pipeline_lib/etl/fast_etl.py) against NVTabular itself (etl.fast_path off):
same data files, Merlin schema, vocabularies and saved workflow; refusals fall back and say why."""
import json

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pipeline_lib.config import ColumnsConfig, EtlConfig, FeatureKind, FeatureSide, FeatureSpec, SplitConfig
from pipeline_lib.etl import fast_etl, history
from pipeline_lib.etl import workflow as etl
from pipeline_lib.etl.fast_transform import Ragged

COLUMNS = ColumnsConfig(features=[
    FeatureSpec(name="user_country", kind=FeatureKind.categorical, side=FeatureSide.user),
    FeatureSpec(name="user_age", kind=FeatureKind.continuous, side=FeatureSide.user),
    FeatureSpec(name="item_category", kind=FeatureKind.categorical, side=FeatureSide.item, freq_threshold=40),
    FeatureSpec(name="item_price", kind=FeatureKind.continuous, side=FeatureSide.item, log=True),
    FeatureSpec(name="item_tags", kind=FeatureKind.list, side=FeatureSide.item, freq_threshold=3),
    FeatureSpec(name="device", kind=FeatureKind.categorical, side=FeatureSide.context),
])


def raw_frame(n: int, seed: int) -> pd.DataFrame:
    """Interactions with nulls (strings and floats), rare categories, empty lists and ties in the counts."""
    rng = np.random.default_rng(seed)
    country = np.array([f"C{i:02d}" for i in rng.integers(0, 12, n)], dtype=object)
    country[rng.random(n) < 0.05] = None
    age = rng.normal(40, 12, n).round(1)
    age[rng.random(n) < 0.1] = np.nan
    price = rng.lognormal(3, 1, n)
    price[rng.random(n) < 0.05] = np.nan
    return pd.DataFrame({
        "user_id": rng.integers(1, 300, n), "item_id": rng.zipf(1.3, n) % 500,
        "user_country": country, "user_age": age,
        "item_category": np.array([f"cat{v}" for v in rng.zipf(1.5, n) % 60], dtype=object),
        "item_price": price,
        "item_tags": [rng.integers(0, 30 + seed, k) for k in rng.integers(0, 4, n)],  # k = 0: empty list
        "device": rng.choice(np.array(["ios", "android", "web"], dtype=object), n),
        "click": rng.integers(0, 2, n), "timestamp": np.arange(n, dtype=np.int64),
    })


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    """train / valid (valid from another seed: unseen ids, strings and tags), several row groups each,
    with the user-history column and the numeric history features (etl.history)."""
    root = tmp_path_factory.mktemp("fast_etl")
    raw = root / "raw.parquet"
    pd.concat([raw_frame(3000, 0), raw_frame(600, 1)], ignore_index=True).to_parquet(raw, index=False)
    paths = etl.split_raw(raw, SplitConfig(valid_fraction=0.2), COLUMNS, 0, root / "split", history_length=5,
                           history_stats=True)
    for path in (paths.train, paths.valid):
        pq.write_table(pq.read_table(path), path, row_group_size=400)
    return paths


def _schema_json(d):
    """The Merlin schema written beside the data, with the run folder and tag order (a set) normalised."""
    doc = json.loads((d / ".merlin" / "schema.json").read_text().replace(str(d.parent), "RUN"))
    for f in doc["feature"]:
        f["annotation"]["tag"] = sorted(f["annotation"]["tag"])
    return doc


def assert_same_etl(a: etl.EtlOutput, b: etl.EtlOutput, probe: pd.DataFrame) -> None:
    import nvtabular as nvt
    from merlin.io import Dataset

    for name in ("train", "valid"):
        da, db = a.workflow_dir.parent / name, b.workflow_dir.parent / name
        assert sorted(p.name for p in da.rglob("*")) == sorted(p.name for p in db.rglob("*"))
        ta, tb = pq.read_table(da / "part_0.parquet"), pq.read_table(db / "part_0.parquet")
        assert ta.schema.remove_metadata() == tb.schema.remove_metadata() and ta.equals(tb)
        assert _schema_json(da) == _schema_json(db)
        assert (da / "_metadata.json").read_text() == (db / "_metadata.json").read_text()
        assert pq.read_metadata(da / "_metadata").num_rows == ta.num_rows
        xa = Dataset(str(da), engine="parquet").to_ddf().compute().reset_index(drop=True)
        xb = Dataset(str(db), engine="parquet").to_ddf().compute().reset_index(drop=True)
        pd.testing.assert_frame_equal(xa, xb)
    for sub in ("fit/categories", "workflow/categories"):
        files = sorted(p.name for p in (a.workflow_dir.parent / sub).iterdir())
        assert files == sorted(p.name for p in (b.workflow_dir.parent / sub).iterdir())
        for f in files:
            x, y = (pd.read_parquet(o.workflow_dir.parent / sub / f) for o in (a, b))
            pd.testing.assert_frame_equal(x, y)
    wa, wb = nvt.Workflow.load(str(a.workflow_dir)), nvt.Workflow.load(str(b.workflow_dir))
    fast_etl.compare_fits(wa, wb)  # vocabularies, medians, moments, output schema
    ra = wa.transform(Dataset(probe.copy(), cpu=True)).to_ddf().compute()
    pd.testing.assert_frame_equal(ra, wb.transform(Dataset(probe.copy(), cpu=True)).to_ddf().compute())


@pytest.mark.parametrize("part_size", ["256MB", "40KB"])  # one partition; several (NVTabular's moments per part)
def test_fast_path_output_equals_nvtabular(tmp_path, split, part_size):
    fast = etl.fit_transform(COLUMNS, EtlConfig(device="cpu", part_size=part_size), split, tmp_path / "fast",
                             history=True)
    ref = etl.fit_transform(COLUMNS, EtlConfig(device="cpu", part_size=part_size, fast_path=False), split,
                            tmp_path / "nvt", history=True)
    assert fast.etl_path.startswith("fast (verified against NVTabular on ")
    assert ref.etl_path == "nvtabular (etl.fast_path is off)"
    assert not (tmp_path / "fast" / "fast-verify").exists()
    if part_size == "40KB":
        from merlin.io import Dataset

        assert Dataset(str(split.train), engine="parquet", part_size=part_size, cpu=True).npartitions > 1
    valid = pd.read_parquet(split.valid)
    assert_same_etl(fast, ref, valid)
    out = pd.read_parquet(fast.train_dir / "part_0.parquet")
    assert (out["item_tags"].map(len) == 0).any()  # empty lists survived
    hist = etl.history_column(COLUMNS)
    assert out[hist].map(len).max() > 0 and (pd.read_parquet(fast.valid_dir / "part_0.parquet")["item_id"] == 2).any()  # unseen -> OOV


def test_fast_path_with_history_features_equals_nvtabular(tmp_path, split):
    """etl.history: the numeric history columns (FillMedian, log, Normalize) through both ETL paths alike,
    on several partitions."""
    cfg = EtlConfig(device="cpu", part_size="40KB")
    fast = etl.fit_transform(COLUMNS, cfg, split, tmp_path / "fast", history=True, history_stats=True)
    ref = etl.fit_transform(COLUMNS, cfg.model_copy(update={"fast_path": False}), split, tmp_path / "nvt",
                            history=True, history_stats=True)
    assert fast.etl_path.startswith("fast (verified against NVTabular on ")
    valid = pd.read_parquet(split.valid)
    assert_same_etl(fast, ref, valid)
    out = pd.read_parquet(fast.train_dir / "part_0.parquet")
    for name in history.NUMERIC:
        assert out[name].dtype == np.float32 and np.isfinite(out[name]).all() and out[name].std() > 0.5


def test_unsupported_input_falls_back_to_nvtabular_and_says_why(tmp_path):
    """A boolean categorical column: NVTabular encodes it, the compiled transform does not -> NVTabular runs."""
    cols = ColumnsConfig(features=[FeatureSpec(name="is_new", kind=FeatureKind.categorical)], timestamp=None)
    rng = np.random.default_rng(0)
    df = pd.DataFrame({"user_id": rng.integers(0, 50, 400), "item_id": rng.integers(0, 40, 400),
                       "is_new": rng.random(400) < 0.3, "click": rng.integers(0, 2, 400)})
    df.to_parquet(tmp_path / "raw.parquet", index=False)
    paths = etl.split_raw(tmp_path / "raw.parquet", SplitConfig(), cols, 0, tmp_path / "split")
    out = etl.fit_transform(cols, EtlConfig(device="cpu"), paths, tmp_path / "fast")
    ref = etl.fit_transform(cols, EtlConfig(device="cpu", fast_path=False), paths, tmp_path / "nvt")
    assert out.etl_path.startswith("nvtabular (fast path refused: ") and "bool" in out.etl_path
    assert_same_etl(out, ref, pd.read_parquet(paths.valid))


def test_fast_path_applies_to_cpu_in_process_only():
    cpu = EtlConfig(device="cpu")
    assert etl.fast_path_refusal(cpu, "cpu") is None
    assert etl.fast_path_refusal(EtlConfig(fast_path=False), "cpu") == "etl.fast_path is off"
    assert "GPU" in etl.fast_path_refusal(cpu, "gpu")
    assert "etl.dask" in etl.fast_path_refusal(EtlConfig(dask={"local_workers": 2}), "cpu")
    assert "etl.dask" in etl.fast_path_refusal(EtlConfig(dask={"scheduler_address": "tcp://h:8786"}), "cpu")


def test_fit_check_catches_different_statistics(tmp_path, split):
    """compare_fits: the fast fit of one sample against NVTabular's fit of another differs -> AssertionError."""
    build = lambda cats: etl.build_workflow(COLUMNS, cats, history=True)  # noqa: E731
    table = pq.read_table(split.train)
    a, b = tmp_path / "a.parquet", tmp_path / "b.parquet"
    pq.write_table(table.slice(0, 1000), a)
    pq.write_table(table.slice(1000, 1000), b)
    fast_etl.verify_fit(build, a, tmp_path / "same")  # same rows: equal
    from merlin.io import Dataset

    fast, nvt = build(tmp_path / "f"), build(tmp_path / "n")
    fast_etl.fast_fit(fast, Dataset(str(a), engine="parquet", cpu=True), fast_etl.parquet_batches(a, 300),
                      pd.read_parquet(a))
    nvt.fit(Dataset(str(b), engine="parquet", cpu=True))
    with pytest.raises(AssertionError, match="differs|!="):
        fast_etl.compare_fits(fast, nvt)


def test_arrow_columns_and_back():
    t = pa.table({"s": pa.array(["a", None, "b"]), "f": pa.array([1.5, None, 2.0]), "i": pa.array([1, 2, 3]),
                  "l": pa.array([[1, 2], [], [3]], type=pa.list_(pa.int64())).slice(0, 3)})
    cols = fast_etl.arrow_columns(t)
    assert list(cols["s"].categories) == ["a", "b"] and cols["s"].codes.tolist() == [0, -1, 1]  # -1: null
    assert np.isnan(cols["f"][1]) and cols["i"].dtype == np.int64
    assert isinstance(cols["l"], Ragged) and cols["l"].values.tolist() == [1, 2, 3]
    assert cols["l"].offsets.tolist() == [0, 2, 2, 3]
    back = fast_etl.to_arrow({"l": cols["l"], "i": cols["i"]})
    assert str(back.schema.field("l").type) == "list<element: int64>"
    assert back.column("l").to_pylist() == [[1, 2], [], [3]]
    sliced = fast_etl.arrow_columns(t.slice(1, 2))["l"]  # a slice's offsets start at 0 again
    assert sliced.offsets.tolist() == [0, 0, 1] and sliced.values.tolist() == [3]
    with pytest.raises(fast_etl.Unsupported, match="null lists"):
        fast_etl.arrow_columns(pa.table({"l": pa.array([[1], None])}))


def test_value_counts_sum_over_batches_with_nulls_and_joint_columns(tmp_path):
    t = pa.table({"a": pa.array([1, 2, 2, None]), "h": pa.array([[2, 3], [], [1], [2]])})
    pq.write_table(t, tmp_path / "t.parquet")
    vc = fast_etl.value_counts(fast_etl.parquet_batches(tmp_path / "t.parquet", 1), ["a", "h"])
    assert list(vc.columns) == ["a_h", "a_h_size"] and vc["a_h_size"].dtype == np.int64
    got = {(None if pd.isna(k) else int(k)): int(c) for k, c in zip(vc["a_h"], vc["a_h_size"])}
    assert got == {1: 2, 2: 4, 3: 1, None: 1}


def test_value_counts_of_many_batches_are_summed_along_the_way(tmp_path):
    """More batches than are kept apart: the counts so far are summed (memory at the distinct values)."""
    rng = np.random.default_rng(0)
    s = np.array([f"s{i}" for i in rng.integers(0, 30, 2000)], dtype=object)
    s[::11] = None
    pq.write_table(pa.table({"s": s}), tmp_path / "s.parquet")
    many = fast_etl.value_counts(fast_etl.parquet_batches(tmp_path / "s.parquet", 50), ["s"])  # 40 batches
    want = pd.Series(s).value_counts(dropna=False)
    assert dict(zip(many["s"].fillna("<null>"), many["s_size"])) == dict(zip(want.index.fillna("<null>"), want))
