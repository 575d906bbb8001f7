"""Top-k serving: retrieval-only (two-tower) and two-stage (two-tower + DLRM re-ranking 100
candidates) versions from one run of the real pipeline flow, served by Triton and run in-process.

For each version: the request path of the served ``model.py`` in-process, once through the compiled
numpy transform (``TopKRecommender.recommend_columns``, what a version verified at export serves)
and once through NVTabular (``TopKRecommender.recommend`` on the request frame, the fallback), at
batch 1 and 64; then Triton over gRPC and HTTP, one client, same batches. Served top-k is checked
equal to the in-process top-k first. The flow runs in a child process with a private Prefect home
(``e2e_bench.bench``) on a smaller synthetic set (20k interactions, 1 epoch; the default 2,000 users
and 1,000 items).
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

# a serving benchmark: its 1-epoch model is published whether or not it beats the baselines
RUN = {"model": {"type": "two_tower", "retrieval": {"k": 10, "rerank_with": "dlrm", "candidates": 100}},
       "gate": {"require_beat_baseline": False}}
DATA = {"data": {"synthetic": {"n_interactions": 20_000}}, "model": {"epochs": 1}}
NAMES = ("two_tower", "two_stage")


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


def in_process(repo: Path, model: str, rows: pd.DataFrame, quick: bool = False):
    """The served model.py's path in this process, compiled and NVTabular, at batch 1 and 64."""
    from pipeline_lib.export import raw_to_columns
    from pipeline_lib.topk import TOPK_DIR, TopKRecommender

    version = max(int(p.name) for p in (repo / model).iterdir() if p.name.isdigit())
    rec = TopKRecommender(repo / model / str(version) / TOPK_DIR)
    out = {"fast_transform": rec.fast_status, "candidates": rec.candidates, "k": rec.k,
           "catalogue_items": int(len(rec.item_ids)), "in_process": [], "served": []}
    n, secs = (30, 2.0) if quick else (100, 4.0)
    for batch in (1, 64):
        req = rows.head(batch)[rec.request_columns].reset_index(drop=True)
        cols = raw_to_columns(req)
        fast = _timed(lambda: rec.recommend_columns(cols), n, secs)
        nvt = _timed(lambda: rec.recommend(req), max(10, n // 5), secs)
        out["in_process"].append({"batch": batch, "compiled": fast, "nvtabular": nvt,
                                  "nvtabular_over_compiled_p50": round(nvt["p50_ms"] / fast["p50_ms"], 1)})
    return rec, out


def served(url: str, protocol: str, model: str, rec, rows: pd.DataFrame, quick: bool = False) -> list[dict]:
    """One client, batch 1 and 64; the served top-k is checked equal to the in-process top-k first."""
    from pipeline_lib.client import RecsysClient
    from pipeline_lib.export import raw_to_columns

    n, secs = (30, 2.0) if quick else (100, 4.0)
    out = []
    with RecsysClient(url, protocol, model) as c:
        for batch in (1, 64):
            req = rows.head(batch)[rec.request_columns].reset_index(drop=True)
            ids, _ = c.recommend(req)
            if not np.array_equal(ids, rec.recommend_columns(raw_to_columns(req))[0]):
                raise AssertionError(f"{model}: served top-k differs from in-process top-k")
            inputs = c.build_inputs(req)
            outputs = [c._tc.InferRequestedOutput(x) for x in ("item_ids", "scores")]
            r = _timed(lambda: c._client.infer(model, inputs, outputs=outputs), n, secs)
            out.append({"protocol": protocol, "batch": batch, **r})
    return out


def bench(work: Path, quick: bool = False, data: dict | None = None) -> dict:
    """``data``: config overrides for the flow (default: 20k synthetic interactions, 1 epoch). One
    two-stage flow; the retrieval-only version is exported from the same run's workflow and
    two-tower model (``topk.export_topk`` without a ranker, as the flow does for a retrieval run).
    Both versions are then served by one Triton."""
    import shutil

    from benchmarks import e2e_bench
    from pipeline_lib import repository, topk
    from pipeline_lib.config import ColumnsConfig
    from pipeline_lib.serving import TritonServer

    base = data or DATA
    flow = e2e_bench.bench(work / "flow", {**base, **RUN, "model": {**base.get("model", {}), **RUN["model"]},
                                          "export": {**base.get("export", {}), "model_name": "topk_two_stage"}})
    summary = json.loads((work / "flow" / "e2e.json").read_text())["summary"]
    etl_dir, run_dir = Path(summary["etl_from"]), Path(summary["run_dir"])
    split = etl_dir.parent / "split"
    rows = pd.read_parquet(split / "valid.parquet").sample(n=64, random_state=0).reset_index(drop=True)
    repo = work / "model_repository"
    shutil.copytree(work / "flow" / "model_repository" / "topk_two_stage", repo / "topk_two_stage")
    exp = topk.export_topk(etl_dir / "workflow", run_dir / "model" / "model", split / "train.parquet",
                           rows.head(32), ColumnsConfig(), 10, work / "staging", "topk_two_tower", 1)
    version, _ = repository.publish(exp.version_dir, exp.config_path, repo, "topk_two_tower")
    repository.promote(repo, "topk_two_tower", version)

    results, recs = {}, {}
    for name in NAMES:
        recs[name], out = in_process(repo, f"topk_{name}", rows, quick)
        results[name] = {"flow_metrics": flow.get("metrics"), "flow_seconds": flow["process_wall_seconds"], **out}
    server = TritonServer.on_free_ports(repo, log_file=work / "triton.log")
    with server.start(timeout_s=300, models=[f"topk_{n}" for n in NAMES]):
        for name in NAMES:
            for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
                results[name]["served"] += served(url, protocol, f"topk_{name}", recs[name], rows, quick)
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
