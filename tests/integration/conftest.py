"""Fixtures of the integration tests only."""
from __future__ import annotations

import contextlib
import io
import json
from dataclasses import dataclass

import pytest

from benchmarks import run

# the tiny flow of the benchmark tests' top-k section (its two-stage run is also their e2e section)
TINY_FLOW = {"data": {"synthetic": {"n_users": 200, "n_items": 100, "n_interactions": 3000}},
             "model": {"epochs": 1, "batch_size": 256, "retrieval": {"epochs": 1}}, "export": {"parity_rows": 32}}


@dataclass
class BenchRun:
    results: dict  # what run.main returned
    saved: dict  # latest.json
    md: str  # latest.md
    printed: str  # the suite's stdout


@pytest.fixture(scope="session")
def bench_serving_suite(tmp_path_factory, prefect_harness) -> BenchRun:
    """One tiny run of the suite's serving, serving_peers, topk and e2e sections, shared by their tests:
    one trained DLRM (the serving section's) for both serving sections, its dynamically batched
    variant on the serving section's server, a few requests per point, and one two-stage flow that is
    both the top-k section's and the e2e section's (``--e2e-from-topk``), reporting to the session's
    Prefect API instead of starting its own."""
    tmp = tmp_path_factory.mktemp("bench-serving")
    out = tmp / "results"
    argv = ["--skip", "etl,train,etl_peers", "--with", "topk", "--serve-model-rows", "2000",
            "--serve-requests", "3", "--serve-seconds", "1", "--serve-one-triton",
            "--topk-overrides-json", json.dumps(TINY_FLOW), "--topk-ann-items", "4000", "--e2e-from-topk",
            "--prefect-api-url", prefect_harness, "--out", str(out), "--data-dir", str(tmp / "data")]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        res = run.main(argv)
    return BenchRun(res, json.loads((out / "latest.json").read_text()), (out / "latest.md").read_text(),
                    printed.getvalue())
