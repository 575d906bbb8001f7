import numpy as np
import pandas as pd
import pytest
from merlin.schema import Tags

from pipeline_lib.etl import workflow as etl
from pipeline_lib.config import SplitConfig
import socket
import time
from pipeline_lib.config import DaskConfig, EtlConfig
from pipeline_lib.config import ColumnsConfig


def _read(d):
    return pd.concat([pd.read_parquet(p) for p in sorted(d.glob("*.parquet"))], ignore_index=True)


def _keys(df: pd.DataFrame) -> set:
    return set(zip(df["user_id"], df["item_id"], df["timestamp"]))


def test_random_and_time_splits_three_ways(tmp_path, trained):
    cols = trained.cfg.columns
    raw = pd.read_parquet(trained.raw)
    r = etl.split_raw(trained.raw, SplitConfig(method="random", valid_fraction=0.25, test_fraction=0.15), cols, 0,
                      tmp_path / "r")
    tr, va, te = (pd.read_parquet(p) for p in (r.train, r.valid, r.test))
    assert len(tr) + len(va) + len(te) == len(raw)
    assert 0.2 < len(va) / len(raw) < 0.3 and 0.1 < len(te) / len(raw) < 0.2
    assert r.test == tmp_path / "r" / "test.parquet"
    # no row in two parts (rows are unique on user, item, timestamp here)
    assert len(_keys(raw)) == len(raw) and not (_keys(tr) & _keys(va)) and not (_keys(tr) & _keys(te))
    assert not (_keys(va) & _keys(te))
    t = etl.split_raw(trained.raw, SplitConfig(method="time", valid_fraction=0.25, test_fraction=0.15), cols, 0,
                      tmp_path / "t")
    tr, va, te = (pd.read_parquet(p) for p in (t.train, t.valid, t.test))
    assert len(tr) + len(va) + len(te) == len(raw)
    # the newest rows are test, then validation, then train
    assert tr["timestamp"].max() <= va["timestamp"].min() and va["timestamp"].max() <= te["timestamp"].min()
    assert 0.1 < len(te) / len(raw) < 0.2


def test_split_fractions_are_validated_and_old_configs_still_load():
    from pydantic import ValidationError

    from pipeline_lib.config import load_config

    assert SplitConfig().valid_fraction == 0.1 and SplitConfig().test_fraction == 0.1
    old = load_config(None, {"split": {"valid_fraction": 0.2}})  # a config written before test_fraction
    assert old.split.valid_fraction == 0.2 and old.split.test_fraction == 0.1
    with pytest.raises(ValidationError, match="valid_fraction .0.6. \\+ test_fraction .0.4. must be below 1"):
        SplitConfig(valid_fraction=0.6, test_fraction=0.4)


def test_transformed_output_types_and_schema_tags(trained):
    out = trained.etl
    df = _read(out.train_dir)
    schema = trained.etl  # noqa
    from merlin.io import Dataset

    schema = Dataset(str(out.train_dir), engine="parquet").schema
    assert out.schema_path.exists() and (out.workflow_dir / "workflow.pkl").exists()
    assert set(schema.select_by_tag([Tags.USER, Tags.ID]).column_names) >= {"user_id"}
    assert schema.select_by_tag(Tags.ITEM_ID).column_names == ["item_id"]
    assert schema.select_by_tag(Tags.TARGET).column_names == ["click"]
    assert set(schema.select_by_tag(Tags.CONTINUOUS).column_names) == {"user_age", "item_price"}
    assert {"item_category", "item_tags"} <= set(schema.select_by_tag(Tags.ITEM).column_names)
    assert "device" in schema.select_by_tag(Tags.CONTEXT).column_names
    assert schema["item_tags"].is_list and schema["item_tags"].is_ragged
    assert df["user_age"].dtype == np.float32 and df["item_price"].dtype == np.float32
    # Normalize fitted on train: train continuous features have ~zero mean / unit std.
    assert abs(df["user_age"].mean()) < 0.05 and abs(df["user_age"].std() - 1) < 0.05
    # Categorify: ids are contiguous small integers, 0/1 reserved (pad/null)
    assert df["user_country"].min() >= 2


def test_workflow_is_fitted_on_train_only(trained):
    """An id that appears only in validation is out-of-vocabulary: it maps to the OOV index (2)."""
    tr, va = pd.read_parquet(trained.split.train), pd.read_parquet(trained.split.valid)
    only_valid = sorted(set(va["user_id"]) - set(tr["user_id"]))
    wf = etl.load_workflow(trained.etl.workflow_dir)
    from merlin.io import Dataset

    probe = va.head(3).copy()
    probe["user_id"] = 10_000_000  # never seen anywhere
    if only_valid:
        probe.loc[0, "user_id"] = only_valid[0]
    out = wf.transform(Dataset(probe, cpu=True)).to_ddf().compute()
    assert (out["user_id"] == 2).all()


def test_device_selection_on_this_machine(monkeypatch):
    from merlin.core import compat

    # CI machines have no GPU: auto resolves to CPU, and forcing GPU is a clear error.
    monkeypatch.setattr(compat, "HAS_GPU", False)
    assert etl.resolve_device("auto") == "cpu"
    with pytest.raises(RuntimeError, match="no GPU"):
        etl.resolve_device("gpu")
    # Mocked GPU (none can run here): auto must select the GPU path.
    monkeypatch.setattr(compat, "HAS_GPU", True)
    assert etl.resolve_device("auto") == "gpu"
    assert etl.resolve_device("cpu") == "cpu"


def test_vocabularies_are_written_inside_the_run_not_the_working_directory(trained):
    fit_dir = trained.etl.workflow_dir.parent / "fit" / "categories"
    assert (fit_dir / "unique.user_id.parquet").exists()
    wf = etl.load_workflow(trained.etl.workflow_dir)
    assert (trained.etl.workflow_dir / "categories" / "unique.item_tags.parquet").exists()
    assert wf.output_schema["item_tags"].properties["cat_path"].endswith("unique.item_tags.parquet")


def test_two_runs_fitting_at_once_do_not_share_vocabularies(tmp_path):
    """Concurrent runs (threads here) keep their own Categorify output: each workflow maps its own
    data's categories. With NVTabular's default ./categories folder they would overwrite each other."""
    import threading

    from pipeline_lib.data import sources as data
    from pipeline_lib.config import ColumnsConfig, DataConfig, EtlConfig, SyntheticConfig

    cols = ColumnsConfig()
    outs, errors = {}, []

    def run(name, seed, n_users):
        try:
            cfg = DataConfig(synthetic=SyntheticConfig(n_users=n_users, n_items=50, n_interactions=2000))
            raw = data.write_raw(cfg, seed, tmp_path / name / "raw")
            split = etl.split_raw(raw, SplitConfig(), cols, seed, tmp_path / name / "split")
            outs[name] = etl.fit_transform(cols, EtlConfig(), split, tmp_path / name / "t")
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=run, args=("a", 1, 40)), threading.Thread(target=run, args=("b", 2, 400))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    for name, n_users in (("a", 40), ("b", 400)):
        train_users = pd.read_parquet(outs[name].split.train)["user_id"].nunique()
        vocab = pd.read_parquet(outs[name].workflow_dir / "categories" / "unique.user_id.parquet")
        assert len(vocab) == train_users and set(vocab["user_id"]) <= set(range(1, n_users + 1))


@pytest.mark.parametrize("rows", [
    [np.array([1, 2], np.int64), np.array([], np.int64), np.array([3], np.int64)],
    [np.array([1.5, np.nan]), np.array([2.0])],
    [[1, 2], [3]],                                          # python lists: the original path
    [np.array([1], np.int32), np.array([2], np.int32)],     # other dtypes: the original path
    [np.array([], np.int64), np.array([], np.int64)],       # no values: the original path
    [np.array(["a", "b"], dtype=object), np.array(["c"], dtype=object)],
])
def test_fast_list_flatten_gives_nvtabulars_series(rows):
    """Inside fit_transform, NVTabular's list flattening is replaced by np.concatenate where that
    yields the identical Series (values, dtype, index), else the original runs."""
    import itertools

    from merlin.core import dispatch

    s = pd.Series(rows)
    want = pd.Series(itertools.chain(*s))
    original = dispatch.flatten_list_column_values
    with etl.fast_list_flatten():
        assert dispatch.flatten_list_column_values is not original
        got = dispatch.flatten_list_column_values(s)
    assert dispatch.flatten_list_column_values is original
    pd.testing.assert_series_equal(got, want)


def _year_frame(n: int = 400, missing: int = 8) -> pd.DataFrame:
    rng = np.random.default_rng(3)
    year = rng.integers(1950, 1999, n).astype(np.float64)
    year[:missing] = np.nan
    return pd.DataFrame({"user_id": rng.integers(0, 20, n), "item_id": rng.integers(0, 30, n),
                         "year": year, "click": rng.integers(0, 2, n)})


def test_missing_continuous_values_take_the_training_median(tmp_path):
    """A missing year is filled with the training median before Normalize: the statistics are the
    observed years' and the filled rows sit near 0, not tens of standard deviations away (a 0 fill)."""
    from merlin.io import Dataset

    from pipeline_lib.config import ColumnsConfig, FeatureSpec

    df = _year_frame()
    cols = ColumnsConfig(timestamp=None, features=[FeatureSpec(name="year", kind="continuous", side="item")])
    wf = etl.build_workflow(cols, tmp_path / "cats")
    wf.fit(Dataset(df, cpu=True))
    out = wf.transform(Dataset(df, cpu=True)).to_ddf().compute().reset_index(drop=True)
    observed = df["year"].dropna()
    filled = df["year"].fillna(observed.median())
    assert out["year"].to_numpy()[:8] == pytest.approx(((observed.median() - filled.mean()) / filled.std()), abs=0.02)
    assert np.abs(out["year"].to_numpy()).max() < 3
    assert out["year"].std() == pytest.approx(1.0, abs=0.01)
    # the fitted median is the observed years' median (the NVTabular op keeps it for serving)
    from merlin.dag import postorder_iter_nodes
    import nvtabular as nvt

    ops = [n.op for n in postorder_iter_nodes(wf.output_node) if isinstance(n.op, nvt.ops.FillMedian)]
    assert len(ops) == 1 and ops[0].medians["year"] == pytest.approx(observed.median(), abs=1.0)


# --- moved from tests/test_etl_dask.py ------------------------------------------


def test_unreachable_scheduler_is_a_clear_error(tmp_path, small_split):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    cfg = EtlConfig(device="cpu", dask={"scheduler_address": address, "connect_timeout_s": 2})
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"127\.0\.0\.1:%d.*docs/scale\.md" % port):
        etl.fit_transform(small_split[0].columns, cfg, small_split[1], tmp_path / "t")
    assert time.monotonic() - t0 < 30


def test_dask_settings_validate():
    assert EtlConfig().dask == DaskConfig()  # nothing set: in-process on CPU, as before
    with pytest.raises(ValueError, match="not both"):
        DaskConfig(scheduler_address="tcp://h:8786", local_workers=2)
    with pytest.raises(ValueError):
        DaskConfig(local_workers=0)


def test_gpu_context_builds_a_local_cuda_cluster_from_the_settings(monkeypatch):
    """No GPU here: dask_cuda.LocalCUDACluster is replaced by an in-process LocalCluster that records
    its arguments; the wiring (one worker per GPU unless local_workers, the RMM pool, the client
    current only inside) is what is checked."""
    import dask_cuda
    from dask.distributed import LocalCluster
    from merlin.core.utils import global_dask_client

    calls = []

    def fake(**kw):
        calls.append(kw)
        return LocalCluster(n_workers=1, processes=False, dashboard_address=None)

    monkeypatch.setattr(dask_cuda, "LocalCUDACluster", fake)
    with etl.dask_context("gpu", DaskConfig()):
        assert global_dask_client() is not None
    assert global_dask_client() is None
    with etl.dask_context("gpu", DaskConfig(local_workers=2, rmm_pool_size="20GB")):
        pass
    assert [(c["n_workers"], c["rmm_pool_size"]) for c in calls] == [(None, "0.8"), (2, "20GB")]


# --- moved from tests/test_retrieval.py -----------------------------------------


def test_user_history_holds_only_earlier_positive_items_in_time_order():
    df = pd.DataFrame({"user_id": [1, 1, 2, 1, 2, 1], "item_id": [10, 11, 12, 13, 14, 15],
                       "click": [1, 0, 1, 1, 1, 0], "timestamp": [1, 2, 1, 3, 0, 4]})
    out = etl.add_user_history(df, ColumnsConfig(), length=2)
    assert out["item_id_history"].tolist() == [[], [10], [14], [10], [], [10, 13]]
    short = etl.add_user_history(df, ColumnsConfig(), length=1)
    assert short["item_id_history"].tolist()[5] == [13]  # the most recent one is kept


def test_time_split_with_history_keeps_the_latest_rows_for_validation(tmp_path):
    """The history ETL shuffles the rows before writing them: the split must move with them."""
    from pipeline_lib.config import SplitConfig

    n = 400
    df = pd.DataFrame({"user_id": np.arange(n) % 37, "item_id": np.arange(n) % 23, "click": np.arange(n) % 2,
                       "timestamp": np.arange(n)})
    df.to_parquet(tmp_path / "raw.parquet")
    paths = etl.split_raw(tmp_path / "raw.parquet", SplitConfig(method="time", valid_fraction=0.15, test_fraction=0.1),
                          ColumnsConfig(), 0, tmp_path / "split", history_length=5)
    train, valid, test = (pd.read_parquet(p) for p in (paths.train, paths.valid, paths.test))
    assert sorted(valid["timestamp"]) == list(range(300, 360)) and train["timestamp"].max() == 299
    assert sorted(test["timestamp"]) == list(range(360, n))
    assert not train["timestamp"].is_monotonic_increasing     # the rows were shuffled all the same
