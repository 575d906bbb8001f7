"""The benchmark suite's pieces at a tiny size: its pandas ETL baseline computes exactly what the
pipeline's NVTabular workflow computes, the default plan and the caps, the feeds' summary and shuffling.
The sections' JSON/markdown structure: tests/integration/test_bench_peers.py (ETL, peers, training) and
test_benchmarks.py (serving, top-k, end to end). No timing assertions (the figures depend on the machine)."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest

from benchmarks import etl_bench, latency, run, serving_bench, topk_bench, train_bench, user_id
from pipeline_lib.data import synthetic
from pipeline_lib.etl import workflow as etl
from pipeline_lib.config import ColumnsConfig, SplitConfig, SyntheticConfig
import subprocess
from tests.support import ROOT


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


def test_the_default_run_keeps_its_full_plan():
    """The options the tests use to make the suite cheap are all off by default (`make bench`)."""
    a = run.parse_args([])
    assert not (a.train_one_interpreter or a.train_unshuffled_only or a.serve_one_triton or a.e2e_from_topk
                or a.prefect_api_url or a.serve_model_from_topk)
    assert a.topk_overrides_json is None and a.topk_ann_items is None and a.serve_requests is None
    plan = serving_bench.Plan()
    assert (plan.batches, plan.concurrency, plan.protocols) == ((1, 64, 1024), (1, 8), ("grpc", "http"))
    assert plan.model_from_run is None and serving_bench.WARMUP == 3
    assert [plan.budget(b) for b in plan.batches] == [(300, 8.0), (200, 8.0), (40, 8.0)]
    assert plan.breakdown_calls() == 30
    assert latency.budget() == (100, 4.0) and latency.budget(True) == (30, 2.0)


def test_serving_the_topk_reranker_needs_the_topk_section():
    with pytest.raises(SystemExit, match="--with topk"):
        run.skipped_sections(run.parse_args(["--serve-model-from-topk"]))
    assert "topk" not in run.skipped_sections(run.parse_args(["--serve-model-from-topk", "--with", "topk"]))


def test_request_caps_shrink_every_timed_point():
    plan = serving_bench.Plan(quick=True, requests_cap=3, seconds_cap=1.0)
    assert [plan.budget(b) for b in (1, 64, 1024)] == [(3, 1.0), (3, 1.0), (3, 1.0)]
    assert serving_bench.Plan(quick=True).budget(1024) == (10, 4.0) and plan.breakdown_calls() == 3
    assert serving_bench.Plan(requests_cap=500).budget(1) == (300, 8.0)  # a cap never raises the budget
    assert latency.budget(False, 3, 0.5) == (3, 0.5) and latency.budget(True, 500) == (30, 2.0)


def test_timed_stops_at_the_call_cap_or_once_the_seconds_pass():
    calls = []
    r = latency.timed(lambda: calls.append(1), 5, 60.0)
    assert r["requests"] == 5 and len(calls) == 6 and 0 <= r["p50_ms"] <= r["p99_ms"]  # + one warm-up call
    assert latency.timed(lambda: None, 1000, 0.0)["requests"] == 1  # the first call past the deadline ends it


def test_user_id_table_has_one_row_per_family_point_and_says_what_did_not_run():
    point = {"p50_ms": 1.0, "p99_ms": 2.0, "requests": 3}
    rows = [{"family": "ranking", "protocol": "grpc", "batch": 64, "full_features": point, "user_id": point,
             "user_id_minus_full_p50_ms": 0.0, "store_lookup": point, "feast_get_online_features": None,
             "online_store": "sqlite"}]
    md = "\n".join(user_id.markdown({"rows": rows, "topk_measured": False, "ranking_measured": True}))
    assert "| ranking | grpc | 64 | 1.0 (2.0) | 1.0 (2.0) | 0.0 | 1.0 (2.0) | – | sqlite |" in md
    assert "`--with topk` adds them" in md and "No ranking rows" not in md
    assert "No ranking rows" in "\n".join(user_id.markdown({"rows": [], "topk_measured": True}))


def test_topk_flow_overrides_keep_the_two_stage_run():
    assert topk_bench.flow_overrides(topk_bench.DATA) == {
        "data": {"synthetic": {"n_interactions": 20_000}}, "gate": {"require_beat_baseline": False},
        "model": {"epochs": 1, "type": "two_tower", "retrieval": {"k": 10, "rerank_with": "dlrm", "candidates": 100}},
        "export": {"model_name": "topk_two_stage"}}
    tiny = topk_bench.flow_overrides({"model": {"retrieval": {"epochs": 1, "k": 5}}, "export": {"parity_rows": 8}})
    assert tiny["model"]["retrieval"] == {"epochs": 1, "k": 10, "rerank_with": "dlrm", "candidates": 100}
    assert tiny["export"] == {"parity_rows": 8, "model_name": "topk_two_stage"} and tiny["model"]["type"] == "two_tower"


def test_training_summary_pairs_the_feeds():
    runs = [{"feed": f, "shuffle": sh, "samples_per_s": v}
            for (f, sh), v in zip(train_bench.RUNS, (1000, 500, 300, None))]
    assert [(r["feed"], r["shuffle"]) for r in runs] == [
        ("merlin", False), ("tfdata", False), ("merlin", True), ("tfdata", True)]
    s = train_bench.summary(Path("t"), 64, runs)
    assert s["ratio_merlin_over_tfdata"] == 2.0 and s["ratio_merlin_over_tfdata_shuffled"] is None
    assert s["runs"] == runs and s["batch_size"] == 64
    unshuffled = train_bench.summary(Path("t"), 64, runs[:2])  # --train-unshuffled-only
    assert unshuffled["ratio_merlin_over_tfdata"] == 2.0 and unshuffled["ratio_merlin_over_tfdata_shuffled"] is None


def test_tfdata_feed_shuffles_whole_rows(tmp_path):
    """The tf.data feed's shuffled path (not trained on in the suite test): every row exactly once per
    epoch, in another order, each row's list values and label still its own."""
    from merlin.io import Dataset

    n = 37
    df = pd.DataFrame({"a": np.arange(n, dtype=np.int64), "tags": [list(range(i % 4)) + [i] for i in range(n)],
                       "click": (np.arange(n) % 2).astype(np.int64)})
    df.to_parquet(tmp_path / "part_0.parquet", index=False)
    schema = Dataset(str(tmp_path), engine="parquet").schema
    ds, rows = train_bench.tf_dataset(tmp_path, schema, "click", 8, shuffle=True)
    seen = []
    for x, y in ds:
        values, offsets = x["tags__values"].numpy(), x["tags__offsets"].numpy()
        for k, a in enumerate(x["a"].numpy()):
            assert list(values[offsets[k]:offsets[k + 1]]) == df["tags"][a] and y.numpy()[k] == df["click"][a]
            seen.append(int(a))
    assert rows == n and sorted(seen) == list(range(n)) and seen != list(range(n))


def test_one_repository_serves_the_batched_variant_under_its_own_name(tmp_path):
    """--serve-one-triton: the published version and, as recsys_batched, the same version with the
    config the export writes for dynamic batching (pipeline_lib's own install_serving_model)."""
    model = tmp_path / "model_repository" / "recsys"
    (model / "1").mkdir(parents=True)
    (model / "1" / "model.py").write_text("# model\n")
    (model / "config.pbtxt").write_text('name: "recsys"\nbackend: "python"\n'
                                        'input { name: "device" data_type: TYPE_STRING dims: -1 }\n'
                                        'parameters { key: "max_request_rows" value { string_value: "512" } }\n')
    sm = serving_bench.ServedModel(tmp_path / "model_repository", 1, tmp_path, pd.DataFrame(), {})
    assert sorted(p.name for p in serving_bench.one_repository(sm, tmp_path / "a", False).iterdir()) == ["recsys"]
    repo = serving_bench.one_repository(sm, tmp_path / "b", True)
    assert sorted(p.name for p in repo.iterdir()) == ["recsys", "recsys_batched"]
    assert (repo / "recsys" / "config.pbtxt").read_text() == (model / "config.pbtxt").read_text()
    batched = (repo / "recsys_batched" / "config.pbtxt").read_text()
    assert 'name: "recsys_batched"' in batched and "allow_ragged_batch: true" in batched
    assert "max_batch_size: 16" in batched and "dynamic_batching {" in batched and '"512"' in batched
    assert "def execute" in (repo / "recsys_batched" / "1" / "model.py").read_text()


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
