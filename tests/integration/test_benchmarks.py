"""The benchmark suite's serving, end-to-end and top-k sections at a tiny size (real Triton, real flows)."""
from __future__ import annotations
import json
import pytest
from benchmarks import run
from tests.support import check_bench_results


pytestmark = pytest.mark.integration


@pytest.mark.integration
def test_suite_serving_and_end_to_end_sections_tiny(tmp_path):
    out = tmp_path / "results"
    tiny_e2e = {"data": {"synthetic": {"n_users": 200, "n_items": 100, "n_interactions": 3000}},
                "model": {"epochs": 1, "batch_size": 256}, "export": {"parity_rows": 32},
                "gate": {"require_beat_baseline": False}}
    res = run.main(["--skip", "etl,train,etl_peers,serving_peers", "--serve-model-rows", "2000", "--serve-requests", "3",
                    "--serve-seconds", "2", "--e2e-overrides-json", json.dumps(tiny_e2e),
                    "--out", str(out), "--data-dir", str(tmp_path / "data")])
    saved, md = check_bench_results(res, out)
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
