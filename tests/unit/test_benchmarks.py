"""The benchmark suite at a tiny size: its pandas ETL baseline computes exactly what the pipeline's
NVTabular workflow computes, and every section writes the JSON/markdown structure. No timing
assertions (the figures depend on the machine)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from benchmarks import etl_bench, run
from pipeline_lib.data import synthetic
from pipeline_lib.etl import workflow as etl
from pipeline_lib.config import ColumnsConfig, SplitConfig, SyntheticConfig
import subprocess
from tests.support import ROOT, check_bench_results


def _raw_with_nulls_and_unseen(tmp: Path) -> etl.SplitPaths:
    """2k synthetic rows, plus the cases a Categorify/FillMissing reference can get wrong: nulls in a
    categorical and a continuous column, empty lists, and values in valid never seen in train."""
    df = synthetic.generate_interactions(SyntheticConfig(n_users=300, n_items=150, n_interactions=2000), 7)
    rng = np.random.default_rng(0)
    df.loc[rng.random(len(df)) < 0.05, "user_age"] = np.nan
    df.loc[rng.random(len(df)) < 0.05, "device"] = None
    empty = rng.random(len(df)) < 0.03
    df["item_tags"] = [[] if e else t for e, t in zip(empty, df["item_tags"])]
    raw = tmp / "raw.parquet"
    df.to_parquet(raw, index=False)
    split = etl.split_raw(raw, SplitConfig(), ColumnsConfig(), 7, tmp / "split")
    valid = pd.read_parquet(split.valid)
    valid.loc[:4, "item_id"] = 10_000_000          # unseen id -> OOV
    valid.loc[5:9, "user_country"] = "never-seen"  # unseen string -> OOV
    valid.loc[10:14, "item_tags"] = pd.Series([[999, 3]] * 5, index=range(10, 15))
    valid.to_parquet(split.valid, index=False)
    return split


def test_pandas_reference_equals_the_nvtabular_workflow(tmp_path):
    split = _raw_with_nulls_and_unseen(tmp_path)
    columns = ColumnsConfig()
    nvt_out = etl_bench.nvt_fit_transform(columns, str(split.train), str(split.valid), tmp_path / "nvt")
    pd_out = etl_bench.pandas_fit_transform(columns, str(split.train), str(split.valid), tmp_path / "pandas")
    for part in ("train_dir", "valid_dir"):
        cmp = etl_bench.compare_outputs(nvt_out[part], pd_out[part])
        assert cmp["columns_nvt"] == cmp["columns_pandas"] == columns.input_columns
        assert cmp["rows"][0] == cmp["rows"][1] > 0
        assert all(cmp["dtypes_equal"].values()), cmp["dtypes_equal"]
        assert cmp["max_abs_diff"] == {c: 0.0 for c in columns.input_columns}, cmp["max_abs_diff"]
        assert cmp["equal"]

    # the special indices really occur in this input, so the equality above covers them
    nvt_valid = pq.read_table(Path(nvt_out["valid_dir"]) / "part_0.parquet").to_pandas()
    assert (nvt_valid["item_id"] == etl_bench.OOV).sum() >= 5
    assert (nvt_valid["user_country"] == etl_bench.OOV).sum() >= 5
    assert (nvt_valid["device"] == etl_bench.NULL).any()
    assert nvt_valid["item_tags"].map(len).eq(0).any()
    assert nvt_valid["item_tags"].map(lambda v: etl_bench.OOV in v).any()
    assert nvt_valid["user_age"].dtype == np.float32


def test_suite_etl_and_training_sections_tiny(tmp_path):
    out = tmp_path / "results"
    res = run.main(["--etl-rows", "2000", "--train-rows", "2000", "--skip", "serving,e2e,etl_peers,serving_peers",
                    "--out", str(out), "--data-dir", str(tmp_path / "data")])
    saved, md = check_bench_results(res, out)
    assert set(saved["section_seconds"]) == {"etl", "train"}
    (e,) = saved["etl"]
    assert e["rows"] == 2000 and e["n_train"] + e["n_valid"] == 2000
    for side in ("nvt", "pandas"):
        assert {"seconds", "rows_per_s", "peak_rss_mb", "rss_after_imports_mb"} <= set(e[side])
        assert e[side]["peak_rss_mb"] >= e[side]["rss_after_imports_mb"] > 0
    assert e["outputs_equal"] is True and e["categoricals_identical"] is True
    assert e["time_ratio_nvt_over_pandas"] > 0
    t = saved["train"]
    assert {(r["feed"], r["shuffle"]) for r in t["runs"]} == {
        ("merlin", False), ("tfdata", False), ("merlin", True), ("tfdata", True)}
    assert all(r["rows"] == t["runs"][0]["rows"] for r in t["runs"])
    # same model, same data, same order: the tf.data feed gives the model what the Merlin loader gives it
    unshuffled = {r["feed"]: r["loss"] for r in t["runs"] if not r["shuffle"]}
    assert unshuffled["merlin"] == pytest.approx(unshuffled["tfdata"], rel=1e-5)
    assert t["ratio_merlin_over_tfdata"] > 0
    assert "## ETL" in md and "## Training" in md and "| 2,000 |" in md
    assert "## Serving" not in md


# --- moved from tests/test_etl_dask.py ------------------------------------------


def test_gpu_check_dry_run_pieces(tmp_path):
    """The GPU check script parses, and its GPU-vs-CPU output comparison works (the whole dry run,
    ~1-2 min, is run by hand: scripts/gpu_check.sh --device cpu)."""
    import numpy as np

    from benchmarks import gpu_check

    root = ROOT
    assert subprocess.run(["bash", "-n", str(root / "scripts" / "gpu_check.sh")]).returncode == 0
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    df = pd.DataFrame({"x": [3, 4], "f": np.array([0.5, 1.0], np.float32), "l": [np.array([3, 4]), np.array([5])]})
    df.to_parquet(a / "part_0.parquet")
    df.to_parquet(b / "part_0.parquet")
    assert gpu_check._compare(a, b)["equal"]
    df.assign(l=[np.array([3, 4]), np.array([6])]).to_parquet(b / "part_0.parquet")
    assert not gpu_check._compare(a, b)["equal"]
