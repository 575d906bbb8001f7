"""The peers of `make bench` at a tiny size: polars and stock NVTabular compute what the pipeline's ETL
computes (checked on nulls, empty lists and unseen values), the suite prints every peer ratio line
with its target. The serving peers are checked in test_benchmarks.py (one suite run). No timing assertions."""
from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from benchmarks import etl_bench, etl_peers, run
from pipeline_lib.config import ColumnsConfig

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


def test_suite_prints_the_etl_peer_ratios(tmp_path, capsys):
    out = tmp_path / "results"
    res = run.main(["--etl-rows", "2000", "--peers-etl-rows", "2000", "--skip", "train,serving,serving_peers,e2e",
                    "--out", str(out), "--data-dir", str(tmp_path / "data")])
    assert res["errors"] == {}
    (e,) = json.loads((out / "latest.json").read_text())["etl_peers"]
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
    md = (out / "latest.md").read_text()
    assert "## Peers" in md and "| 2,000 |" in md
