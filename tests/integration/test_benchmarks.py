"""The benchmark suite's serving, top-k and end-to-end sections at a tiny size, from one run of the
suite (``bench_serving_suite`` below: real Triton, a real two-stage flow). One module, so that pytest-xdist
(one file per worker) runs that suite once."""
from __future__ import annotations

import contextlib
import io
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

from benchmarks import run, serving_peers

from benchmarks import topk_bench
from tests.support import check_bench_section

pytestmark = pytest.mark.integration


# the tiny flow of the benchmark tests' top-k section (its two-stage run is also their e2e section)
TINY_FLOW = {"data": {"synthetic": {"n_users": 200, "n_items": 100, "n_interactions": 3000}},
             "model": {"epochs": 1, "batch_size": 256, "retrieval": {"epochs": 1}}, "export": {"parity_rows": 32}}


@dataclass
class BenchRun:
    results: dict  # what run.main returned
    saved: dict  # latest.json
    md: str  # latest.md
    printed: str  # the suite's stdout


@pytest.fixture(scope="module")
def bench_serving_suite(tmp_path_factory, prefect_harness) -> BenchRun:
    """One tiny run of the suite's serving, serving_peers, topk and e2e sections, shared by their tests:
    one two-stage flow that is both the top-k section's and the e2e section's (``--e2e-from-topk``),
    reporting to the session's Prefect API instead of starting its own; its DLRM re-ranker is the model
    of both serving sections (``--serve-model-from-topk``: no model trained for them), served with its
    dynamically batched variant and the peers on one server, one request per point."""
    tmp = tmp_path_factory.mktemp("bench-serving")
    out = tmp / "results"
    argv = ["--skip", "etl,train,etl_peers,impressions", "--with", "topk", "--serve-model-from-topk",
            "--serve-requests", "1", "--serve-seconds", "1", "--serve-one-triton",
            "--topk-overrides-json", json.dumps(TINY_FLOW), "--topk-ann-items", "4000", "--e2e-from-topk",
            "--prefect-api-url", prefect_harness, "--out", str(out), "--data-dir", str(tmp / "data")]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        res = run.main(argv)
    return BenchRun(res, json.loads((out / "latest.json").read_text()), (out / "latest.md").read_text(),
                    printed.getvalue())



def test_serving_section_tiny(bench_serving_suite):
    b = bench_serving_suite
    s = check_bench_section(b.saved, b.md, "serving")
    combos = {(r["protocol"], r["batch"], r["clients"]) for r in s["served"]}
    assert combos == {(p, b, k) for p in ("grpc", "http") for b in (1, 64, 1024) for k in (1, 8)}
    for r in s["served"]:
        assert r["errors"] == [] and r["requests"] >= 1
        assert r["p50_ms"] <= r["p95_ms"] <= r["p99_ms"] and r["rows_per_s"] > 0
    assert {(r["batch"], r["pass"]) for r in s["in_process"]} == {
        (b, p) for b in (1, 64, 1024) for p in ("before server", "after served runs")}
    assert s["one_triton"] is True  # the dynamically batched variant on the same server, as recsys_batched
    # the model served: the top-k section's re-ranker (the run folder of its flow; the work folder is gone)
    assert Path(s["model_from_run"]).parent.parts[-3:] == ("topk", "flow", "runs")
    assert s["model_rows"] is None and "Model: the re-ranker of the top-k section's two-stage flow" in b.md
    batched = s["dynamic_batching"]["served"]  # gRPC
    assert {(r["protocol"], r["batch"], r["clients"]) for r in batched} == {
        ("grpc", b, k) for b in (1, 64, 1024) for k in (1, 8)}
    assert all(r["errors"] == [] and r["requests"] >= 1 and r["executions_per_request"] > 0 for r in batched)
    assert all(b["fast_transform"] for b in s["breakdown"])
    assert s["max_abs_diff_served_vs_inprocess_grpc"] <= 1e-5
    assert s["max_abs_diff_served_vs_inprocess_http"] <= 1e-5
    tg = s["targets"]
    assert isinstance(tg["grpc_batch1_p50_le_3ms"], bool)
    assert isinstance(tg["grpc_batch1024_throughput_ge_0.8_inprocess"], bool)
    assert isinstance(tg["http_batch1024_throughput_ge_0.8_inprocess"], bool)
    assert isinstance(tg["grpc_batch1_8clients_p99_le_2x_p50"], bool)
    assert isinstance(tg["model_batch1_ge_3x_faster_than_savedmodel"], bool)
    assert "## Serving" in b.md and "### Targets" in b.md and "Same model with dynamic batching on" in b.md
    assert "p50 <= 3 ms, batch 1, gRPC, 1 client" in b.md and "p99 <= 2 x p50, 8 clients, http, batch1024" in b.md


def test_end_to_end_section_tiny(bench_serving_suite):
    """The e2e section's figures of a real flow run in a child process (here the top-k section's
    two-stage flow, --e2e-from-topk)."""
    b = bench_serving_suite
    e = check_bench_section(b.saved, b.md, "e2e")
    assert e["from_topk_section"] is True and e["prefect_api"] == "given"
    assert list(e["stage_seconds"])[:8] == ["raw-data", "validate", "etl", "train", "train-ranker", "export",
                                            "gate", "serving-smoke-test"]
    assert 0 < e["process_start_to_first_prediction_seconds"] <= e["process_wall_seconds"]
    assert e["stages_sum_to_first_prediction_seconds"] <= e["stages_sum_seconds"]
    assert e["max_abs_diff_served_vs_offline"] <= 1e-5
    assert "## End to end: the top-k section's two-stage flow" in b.md


def test_top_k_section_tiny(bench_serving_suite):
    """Two versions from one real two-stage flow (two-tower; two-tower + DLRM), each served by Triton and
    run in-process, through the compiled transform and through NVTabular; served top-k equals
    in-process first; and the exact-vs-ANN part on a small synthetic catalogue."""
    b = bench_serving_suite
    r = check_bench_section(b.saved, b.md, "topk")
    assert set(r) == {"two_tower", "two_stage", "ann"}
    for name in topk_bench.NAMES:
        v = r[name]
        assert v["fast_transform"]["enabled"] is True, v["fast_transform"]
        assert {x["batch"] for x in v["in_process"]} == {1, 64}
        assert all(x["compiled"]["requests"] >= 1 and x["nvtabular"]["p50_ms"] > 0 for x in v["in_process"])
        assert {(s["protocol"], s["batch"]) for s in v["served"]} == {(p, b) for p in ("grpc", "http") for b in (1, 64)}
        assert all(1 <= s["requests"] <= 3 and s["p50_ms"] <= s["p99_ms"] for s in v["served"])
    assert r["two_stage"]["candidates"] == 100 and r["two_tower"]["candidates"] == 10
    # its user-id figures moved to the user_id section (test_user_id_section_tiny)
    assert "user_id" not in r["two_tower"] and "user_id" not in r["two_stage"]
    cases = r["ann"]["cases"]
    assert [(c["items"], c["catalogue"]) for c in cases] == [(4000, "clustered"), (4000, "isotropic")]
    assert all(0 <= c["recall_at_10"] <= 1 and [x["batch"] for x in c["batches"]] == [1, 64] for c in cases)
    assert "## Top-k serving" in b.md and "two_stage (100 candidates" in b.md and "Exact vs ANN" in b.md


def test_user_id_section_tiny(bench_serving_suite):
    """User-id vs full-feature requests, both served, in one table: the two-stage version's (its flow filled its
    store; measured on the top-k section's server) and the serving section's model made a ranking user-id version
    (snapshot + SQLite store here, its own Triton); every answer was checked equal to the full-feature one first."""
    b = bench_serving_suite
    r = check_bench_section(b.saved, b.md, "user_id")
    assert r["topk_measured"] is True and r["ranking_measured"] is True
    points = {(x["family"], x["protocol"], x["batch"]) for x in r["rows"]}
    assert points == {(f, p, n) for f in ("two_stage", "ranking") for p in ("grpc", "http") for n in (1, 64)}
    for x in r["rows"]:
        assert x["online_store"] == "sqlite" and x["user_id"]["requests"] >= 1 and x["full_features"]["requests"] >= 1
        assert 0 < x["store_lookup"]["p50_ms"] <= x["store_lookup"]["p99_ms"]
        assert x["user_id_minus_full_p50_ms"] == round(x["user_id"]["p50_ms"] - x["full_features"]["p50_ms"], 3)
        assert (x["feast_get_online_features"] is None) == (x["family"] == "ranking")
    assert "## User-id requests" in b.md and "| ranking | grpc | 64 |" in b.md and "| two_stage | http | 1 |" in b.md
    print("section seconds:", b.saved["section_seconds"])  # shown with -rP: what the user_id section adds


def test_serving_peers_on_one_triton(bench_serving_suite):
    """The serving_peers section of the suite's run: the serving section's trained model, and (with
    --serve-one-triton) the serving section's server, which also loads the stock and echo models."""
    b = bench_serving_suite
    s = check_bench_section(b.saved, b.md, "serving_peers")
    assert s["on_serving_server"] is True and "guest" not in b.saved["serving"]
    assert {"recsys", "stock", "echo", "0_transformworkflowtriton", "1_predicttensorflowtriton"} <= set(s["models"])
    assert s["max_abs_diff_served_vs_inprocess"]["recsys"] <= 1e-5
    for model in ("recsys", "stock", "echo"):
        b1, b1024 = s["served"][model]
        assert b1["errors"] == [] == b1024["errors"] and b1["batch"] == 1 and b1024["batch"] == 1024
        assert s["ratios"][model]["p50_over_inprocess"] > 0 and s["ratios"][model]["rows_per_s_over_inprocess"] > 0
    lines = serving_peers.ratio_lines(s)
    assert re.search(r"project ensemble: gRPC batch-1 p50 [\d.]+ ms = [\d.]+ x in-process \(target <= 1.5: (met|NOT met)\)",
                     lines[1])
    assert "target >= 0.8" in lines[1] and "stock merlin-systems" in lines[2] and "echo floor" in lines[3]
    printed = [x for x in b.printed.splitlines() if x.startswith("[peers] serving")]
    assert printed == [f"[peers] {x}" for x in lines if x.startswith("serving")]
    assert all(f"- {x}" in b.md for x in lines)
