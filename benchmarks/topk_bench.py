"""Top-k serving: retrieval-only (two-tower) and two-stage (two-tower + DLRM re-ranking 100
candidates) versions, each produced by the real pipeline flow, served by Triton and run in-process.

For each version: the request path of the served ``model.py`` in-process, once through the compiled
numpy transform (``TopKRecommender.recommend_columns``, what a version verified at export serves)
and once through NVTabular (``TopKRecommender.recommend`` on the request frame, the fallback), at
batch 1 and 64; then Triton over gRPC and HTTP, one client, same batches. Served top-k is checked
equal to the in-process top-k first. Each flow runs in a child process with a private Prefect home
(``e2e_bench.bench``) on a smaller synthetic set (20k interactions, 1 epoch; the default 2,000 users and 1,000 items).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

RUNS = {
    "two_tower": {"model": {"type": "two_tower", "retrieval": {"k": 10}}},
    "two_stage": {"model": {"type": "two_tower", "retrieval": {"k": 10, "rerank_with": "dlrm", "candidates": 100}}},
}
DATA = {"data": {"synthetic": {"n_interactions": 20_000}}, "model": {"epochs": 1}}


def _timed(fn, n: int, seconds: float) -> dict:
    fn()
    lat, deadline = [], time.perf_counter() + seconds
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t0)
        if t0 > deadline:
            break
    a = np.asarray(lat) * 1000.0
    return {"requests": len(lat), "p50_ms": round(float(np.percentile(a, 50)), 3),
            "p99_ms": round(float(np.percentile(a, 99)), 3)}


def measure(repo: Path, model: str, rows: pd.DataFrame, quick: bool = False) -> dict:
    from pipeline_lib.client import RecsysClient
    from pipeline_lib.export import raw_to_columns
    from pipeline_lib.serving import TritonServer
    from pipeline_lib.topk import TOPK_DIR, TopKRecommender

    version = max(int(p.name) for p in (repo / model).iterdir() if p.name.isdigit())
    rec = TopKRecommender(repo / model / str(version) / TOPK_DIR)
    out = {"fast_transform": rec.fast_status, "candidates": rec.candidates, "k": rec.k,
           "catalogue_items": int(len(rec.item_ids)), "in_process": [], "served": []}
    n, secs = (30, 3.0) if quick else (150, 8.0)
    for batch in (1, 64):
        req = rows.head(batch)[rec.request_columns].reset_index(drop=True)
        cols = raw_to_columns(req)
        fast = _timed(lambda: rec.recommend_columns(cols), n, secs)
        nvt = _timed(lambda: rec.recommend(req), max(10, n // 5), secs)
        out["in_process"].append({"batch": batch, "compiled": fast, "nvtabular": nvt,
                                  "nvtabular_over_compiled_p50": round(nvt["p50_ms"] / fast["p50_ms"], 1)})
    server = TritonServer.on_free_ports(repo, log_file=repo.parent / f"triton_{model}.log")
    with server.start(timeout_s=300, models=[model]):
        for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
            with RecsysClient(url, protocol, model) as c:
                for batch in (1, 64):
                    req = rows.head(batch)[rec.request_columns].reset_index(drop=True)
                    ids, _ = c.recommend(req)
                    want, _ = rec.recommend_columns(raw_to_columns(req))
                    if not np.array_equal(ids, want):
                        raise AssertionError(f"{model}: served top-k differs from in-process top-k")
                    inputs = c.build_inputs(req)
                    outputs = [c._tc.InferRequestedOutput(x) for x in ("item_ids", "scores")]
                    r = _timed(lambda: c._client.infer(model, inputs, outputs=outputs), n, secs)
                    out["served"].append({"protocol": protocol, "batch": batch, **r})
    return out


def bench(work: Path, quick: bool = False, data: dict | None = None) -> dict:
    """``data``: config overrides for both flows (default: 50k synthetic interactions)."""
    from benchmarks import e2e_bench

    results = {}
    for name, over in RUNS.items():
        w = work / name
        model = f"topk_{name}"
        base = data or DATA
        flow = e2e_bench.bench(w, {**base, **over, "model": {**base.get("model", {}), **over["model"]},
                                   "export": {**base.get("export", {}), "model_name": model}})
        repo = w / "model_repository"
        split = Path(json.loads((w / "e2e.json").read_text())["summary"]["etl_from"]).parent / "split"
        rows = pd.read_parquet(split / "valid.parquet").sample(n=64, random_state=0).reset_index(drop=True)
        results[name] = {"flow_metrics": flow.get("metrics"), "flow_seconds": flow["process_wall_seconds"],
                         **measure(repo, model, rows, quick)}
    return results


def markdown(r: dict) -> list[str]:
    lines = ["| version | batch | in-process compiled p50 ms | in-process NVTabular p50 ms | NVTabular / compiled "
             "| served gRPC p50 ms (p99) | served HTTP p50 ms (p99) |", "|---|---|---|---|---|---|---|"]
    for name, v in r.items():
        served = {(s["protocol"], s["batch"]): s for s in v["served"]}
        for ip in v["in_process"]:
            b = ip["batch"]
            g, h = served.get(("grpc", b), {}), served.get(("http", b), {})
            lines.append(f"| {name} ({v['candidates']} candidates, {v['catalogue_items']} items) | {b} "
                         f"| {ip['compiled']['p50_ms']} | {ip['nvtabular']['p50_ms']} | {ip['nvtabular_over_compiled_p50']}x "
                         f"| {g.get('p50_ms')} ({g.get('p99_ms')}) | {h.get('p50_ms')} ({h.get('p99_ms')}) |")
    lines.append("")
    lines.append("Compiled transform enabled at export: "
                 + ", ".join(f"{k}: {v['fast_transform'].get('enabled')}" for k, v in r.items()))
    return lines
