"""The benchmark suite at a tiny size: its pandas ETL baseline computes exactly what the pipeline's
NVTabular workflow computes, and every section writes the JSON/markdown structure. No timing
assertions (the figures depend on the machine)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from benchmarks import etl_bench, run
from pipeline_lib.data import synthetic
from pipeline_lib.etl import workflow as etl
from pipeline_lib.config import ColumnsConfig, SplitConfig, SyntheticConfig


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


def _check_common(res: dict, out: Path) -> tuple[dict, str]:
    saved = json.loads((out / "latest.json").read_text())
    md = (out / "latest.md").read_text()
    assert saved["errors"] == {} == res["errors"]
    assert {"started", "finished", "machine", "params", "section_seconds", "total_seconds"} <= set(saved)
    assert saved["machine"]["cpus"] >= 1
    assert md.startswith("# Benchmark results")
    return saved, md


def test_suite_etl_and_training_sections_tiny(tmp_path):
    out = tmp_path / "results"
    res = run.main(["--etl-rows", "2000", "--train-rows", "2000", "--skip", "serving,e2e",
                    "--out", str(out), "--data-dir", str(tmp_path / "data")])
    saved, md = _check_common(res, out)
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


@pytest.mark.integration
def test_suite_serving_and_end_to_end_sections_tiny(tmp_path):
    out = tmp_path / "results"
    tiny_e2e = {"data": {"synthetic": {"n_users": 200, "n_items": 100, "n_interactions": 3000}},
                "model": {"epochs": 1, "batch_size": 256}, "export": {"parity_rows": 32},
                "gate": {"require_beat_baseline": False}}
    res = run.main(["--skip", "etl,train", "--serve-model-rows", "2000", "--serve-requests", "3",
                    "--serve-seconds", "2", "--e2e-overrides-json", json.dumps(tiny_e2e),
                    "--out", str(out), "--data-dir", str(tmp_path / "data")])
    saved, md = _check_common(res, out)
    s = saved["serving"]
    combos = {(r["protocol"], r["batch"], r["clients"]) for r in s["served"]}
    assert combos == {(p, b, k) for p in ("grpc", "http") for b in (1, 64, 1024) for k in (1, 8)}
    for r in s["served"]:
        assert r["errors"] == [] and r["requests"] >= 1
        assert r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] and r["rows_per_s"] > 0
    assert {r["batch"] for r in s["in_process"]} == {1, 64, 1024}
    batched = s["dynamic_batching"]["served"]  # the dynamically batched variant, gRPC
    assert {(r["batch"], r["clients"]) for r in batched} == {(b, k) for b in (1, 64, 1024) for k in (1, 8)}
    assert all(r["errors"] == [] and r["requests"] >= 1 for r in batched)
    assert all(b["fast_transform"] for b in s["breakdown"])
    assert s["max_abs_diff_served_vs_inprocess_grpc"] <= 1e-5
    assert s["max_abs_diff_served_vs_inprocess_http"] <= 1e-5
    tg = s["targets"]
    assert isinstance(tg["grpc_batch1_p50_le_3ms"], bool)
    assert isinstance(tg["grpc_batch1024_throughput_ge_0.8_inprocess"], bool)
    assert isinstance(tg["grpc_batch1_8clients_p99_le_2x_p50"], bool)
    assert isinstance(tg["model_batch1_ge_3x_faster_than_savedmodel"], bool)
    e = saved["e2e"]
    assert list(e["stage_seconds"])[:7] == ["raw-data", "validate", "etl", "train", "export", "gate",
                                            "serving-smoke-test"]
    assert e["process_start_to_first_prediction_seconds"] <= e["process_wall_seconds"]
    assert e["max_abs_diff_served_vs_offline"] <= 1e-5
    assert "## Serving" in md and "### Targets" in md and "## End to end" in md


@pytest.mark.integration
def test_top_k_section_tiny(tmp_path):
    """Two real flows (two-tower; two-tower + DLRM), each version served by Triton and run in-process,
    through the compiled transform and through NVTabular; served top-k equals in-process first."""
    from benchmarks import topk_bench

    tiny = {"data": {"synthetic": {"n_users": 200, "n_items": 100, "n_interactions": 3000}},
            "model": {"epochs": 1, "batch_size": 256}, "export": {"parity_rows": 32}}
    r = topk_bench.bench(tmp_path, quick=True, data=tiny)
    assert set(r) == {"two_tower", "two_stage"}
    for name, v in r.items():
        assert v["fast_transform"]["enabled"] is True, v["fast_transform"]
        assert {x["batch"] for x in v["in_process"]} == {1, 64}
        assert all(x["compiled"]["requests"] >= 1 and x["nvtabular"]["p50_ms"] > 0 for x in v["in_process"])
        assert {(s["protocol"], s["batch"]) for s in v["served"]} == {(p, b) for p in ("grpc", "http") for b in (1, 64)}
        assert all(s["p50_ms"] <= s["p99_ms"] for s in v["served"])
    assert r["two_stage"]["candidates"] == 100 and r["two_tower"]["candidates"] == 10
    md = "\n".join(topk_bench.markdown(r))
    assert "two_stage (100 candidates" in md
