"""The peers of `make bench` at a tiny size: polars and stock NVTabular compute what the pipeline's ETL
computes (checked on nulls, empty lists and unseen values), the suite prints every peer ratio line
with its target; the ETL and training sections of the same run. The serving peers are checked in
test_benchmarks.py (one suite run). No timing assertions."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmarks import etl_bench, etl_peers, run
from pipeline_lib.config import ColumnsConfig
from tests.support import check_bench_results

pytestmark = pytest.mark.integration


def _edge_cases(split_dir: Path) -> None:
    """Missing values, empty lists and values never seen in training, written into a cached split."""
    train, valid = split_dir / "train.parquet", split_dir / "valid.parquet"
    df = pd.read_parquet(train)
    every = np.arange(len(df))
    df.loc[every % 17 == 0, "item_price"] = np.nan
    df.loc[every % 19 == 0, "user_country"] = None
    df["item_tags"] = [[] if i % 23 == 0 else t for i, t in zip(every, df["item_tags"])]
    df.to_parquet(train, index=False)
    v = pd.read_parquet(valid)
    v.loc[:3, "user_id"] = 99_999_999
    v.loc[4:7, "device"] = "a-device-never-seen"
    v["item_tags"] = [[123_456] if i < 3 else t for i, t in enumerate(v["item_tags"])]
    v.to_parquet(valid, index=False)


def test_polars_and_stock_nvtabular_equal_the_pipeline_etl(tmp_path, monkeypatch):
    d = etl_bench.prepare_data(2000, tmp_path / "data")
    _edge_cases(Path(d["train"]).parent)
    columns = ColumnsConfig()
    nvt = etl_bench.nvt_fit_transform(columns, d["train"], d["valid"], tmp_path / "nvt")
    pol = etl_peers.polars_fit_transform(columns, d["train"], d["valid"], tmp_path / "polars")
    monkeypatch.setenv("RECSYS_NVT_FAST_FLATTEN", "0")  # what the nvt_stock child sets
    stock = etl_bench.nvt_fit_transform(columns, d["train"], d["valid"], tmp_path / "stock", fast_path=False)
    for peer, tol in ((pol, 1e-6), (stock, 0.0)):
        for part in ("train_dir", "valid_dir"):
            cmp = etl_bench.compare_outputs(nvt[part], peer[part])
            assert cmp["columns_nvt"] == cmp["columns_pandas"] == columns.input_columns
            assert all(cmp["dtypes_equal"].values()), cmp["dtypes_equal"]
            assert cmp["categoricals_identical"], cmp["max_abs_diff"]
            assert cmp["max_float_abs_diff"] <= tol, cmp["max_abs_diff"]
    got = pd.read_parquet(Path(pol["valid_dir"]) / "part_0.parquet")
    assert (got["user_id"].head(4) == etl_bench.OOV).all() and (got["device"].iloc[4:8] == etl_bench.OOV).all()
    assert all(list(tags) == [etl_bench.OOV] for tags in got["item_tags"].head(3))
    train_out = pd.read_parquet(Path(pol["train_dir"]) / "part_0.parquet")
    assert (train_out["user_country"] == etl_bench.NULL).any() and train_out["item_tags"].map(len).eq(0).any()


def test_suite_etl_peers_and_training_sections_tiny(tmp_path, capsys):
    """One tiny run of the ETL, ETL peers and training sections: the peers reuse the ETL section's
    pipeline and pandas runs, the suite prints every peer ratio line with its target, and the training
    section trains on the ETL section's output of the same size with both feeds."""
    out = tmp_path / "results"
    res = run.main(["--etl-rows", "2000", "--peers-etl-rows", "2000", "--train-rows", "2000",
                    "--skip", "serving,serving_peers,impressions,e2e,user_id",
                    "--train-one-interpreter", "--train-unshuffled-only",  # the shuffled path: tests/unit/test_benchmarks.py
                    "--out", str(out), "--data-dir", str(tmp_path / "data")])
    saved, md = check_bench_results(res, out)
    assert set(saved["section_seconds"]) == {"etl", "etl_peers", "train"}
    (e,) = saved["etl_peers"]
    assert e["nvt"]["reused_from_etl_section"] and e["pandas"]["reused_from_etl_section"]
    assert "reused_from_etl_section" not in e["nvt_stock"] and "reused_from_etl_section" not in e["polars"]
    for peer in etl_peers.PEERS:
        assert e[peer]["equal"] is True and e[peer]["categoricals_identical"] is True, (peer, e[peer])
        assert e[peer]["nvt_time_over_peer"] > 0
    assert e["nvt_stock"]["max_float_abs_diff"] == 0.0  # the fast paths change no value
    printed = capsys.readouterr().out
    lines = [x for x in printed.splitlines() if x.startswith("[peers] ETL 2,000 rows")]
    assert len(lines) == 3, printed[-3000:]
    assert re.search(r"plain pandas time = [\d.]+ \(target <= 1.0: (met|NOT met)\); outputs equal: yes", lines[0])
    assert "stock NVTabular (fast paths off) time = " in lines[1] and "polars time = " in lines[2]
    assert "## Peers" in md and "| 2,000 |" in md
    _check_etl_and_training(saved, md)


def _check_etl_and_training(saved: dict, md: str) -> None:
    """The ETL and training sections of a run at 2,000 rows (training on the ETL section's output)."""
    (e,) = saved["etl"]
    assert e["rows"] == 2000 and e["n_train"] + e["n_valid"] == 2000
    for side in ("nvt", "pandas"):
        assert {"seconds", "rows_per_s", "peak_rss_mb", "rss_after_imports_mb"} <= set(e[side])
        assert e[side]["peak_rss_mb"] >= e[side]["rss_after_imports_mb"] > 0
    assert e["outputs_equal"] is True and e["categoricals_identical"] is True
    assert e["time_ratio_nvt_over_pandas"] > 0
    t = saved["train"]
    assert [(r["feed"], r["shuffle"]) for r in t["runs"]] == [("merlin", False), ("tfdata", False)]
    assert all(r["rows"] == t["runs"][0]["rows"] for r in t["runs"])
    # same model, same data, same order: the tf.data feed gives the model what the Merlin loader gives it
    unshuffled = {r["feed"]: r["loss"] for r in t["runs"] if not r["shuffle"]}
    assert unshuffled["merlin"] == pytest.approx(unshuffled["tfdata"], rel=1e-5)
    assert t["ratio_merlin_over_tfdata"] > 0 and t["ratio_merlin_over_tfdata_shuffled"] is None
    assert "## ETL" in md and "## Training" in md and "| 2,000 |" in md
    assert "## Serving" not in md
