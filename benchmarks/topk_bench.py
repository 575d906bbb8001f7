"""Top-k serving: retrieval-only (two-tower) and two-stage (two-tower + DLRM re-ranking 100
candidates) versions from one run of the real pipeline flow, served by Triton and run in-process.

For each version: the request path of the served ``model.py`` in-process, once through the compiled
numpy transform (``TopKRecommender.recommend_columns``, what a version verified at export serves)
and once through NVTabular (``TopKRecommender.recommend`` on the request frame, the fallback), at
batch 1 and 64; then Triton over gRPC and HTTP, one client, same batches. Served top-k is checked
equal to the in-process top-k first. The flow runs in a child process with a private Prefect home
(``e2e_bench.bench``) on a smaller synthetic set (20k interactions, 1 epoch; the default 2,000 users
and 1,000 items).

ANN (``ann_bench``, with ``ann_items``; ``make bench ARGS="--with topk"`` runs it on 1M items): a
synthetic catalogue of ``ann_items`` item embeddings of the default model's size, exact top-10
(``retrieval.top_k``) against the FAISS IVF-Flat index of :mod:`pipeline_lib.export.ann` with the default
``model.retrieval.ann`` parameters: index build time, p50 latency per query batch (1 and 64
queries) and recall@10 of the index against exact top-10 on held-out queries. Alone:
``uv run --frozen --no-sync python -m benchmarks.topk_bench --ann-only [--items N] [--quick]``.

User-id requests (``benchmarks.user_id.topk``): the two-stage version answers requests that carry only the user id
from the feature store its flow run filled; measured on this section's server (key ``user_id`` of the version) and
reported by the ``user_id`` section (``benchmarks/user_id.py``), which moves them into its own table.
"""
from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.latency import budget, timed

# a serving benchmark: its 1-epoch model is published whether or not it beats the baselines
RUN = {"model": {"type": "two_tower", "retrieval": {"k": 10, "rerank_with": "dlrm", "candidates": 100}},
       "gate": {"require_beat_baseline": False}}
DATA = {"data": {"synthetic": {"n_interactions": 20_000}}, "model": {"epochs": 1}}
NAMES = ("two_tower", "two_stage")
ANN_ITEMS = 1_000_000
ANN_CLUSTERS = 2_000  # synthetic embeddings: a mixture of this many Gaussian clusters (learned ones group)


def in_process(repo: Path, model: str, rows: pd.DataFrame, calls: tuple = budget()):
    """The served model.py's path in this process, compiled and NVTabular, at batch 1 and 64;
    ``calls``: :func:`budget` (the NVTabular path gets a fifth of the calls, at least 10)."""
    from pipeline_lib.export.ranking import raw_to_columns
    from pipeline_lib.export.topk import TOPK_DIR, TopKRecommender

    version = max(int(p.name) for p in (repo / model).iterdir() if p.name.isdigit())
    rec = TopKRecommender(repo / model / str(version) / TOPK_DIR)
    out = {"fast_transform": rec.fast_status, "candidates": rec.candidates, "k": rec.k,
           "catalogue_items": int(len(rec.item_ids)), "in_process": [], "served": []}
    n, secs = calls
    for batch in (1, 64):
        req = rows.head(batch)[rec.request_columns].reset_index(drop=True)
        cols = raw_to_columns(req)
        fast = timed(lambda: rec.recommend_columns(cols), n, secs)
        nvt = timed(lambda: rec.recommend(req), max(min(n, 10), n // 5), secs)
        out["in_process"].append({"batch": batch, "compiled": fast, "nvtabular": nvt,
                                  "nvtabular_over_compiled_p50": round(nvt["p50_ms"] / fast["p50_ms"], 1)})
    return rec, out


def served(url: str, protocol: str, model: str, rec, rows: pd.DataFrame, calls: tuple = budget()) -> list[dict]:
    """One client, batch 1 and 64; the served top-k is checked equal to the in-process top-k first."""
    from pipeline_lib.serving.client import RecsysClient
    from pipeline_lib.export.ranking import raw_to_columns

    n, secs = calls
    out = []
    with RecsysClient(url, protocol, model) as c:
        for batch in (1, 64):
            req = rows.head(batch)[rec.request_columns].reset_index(drop=True)
            ids, _ = c.recommend(req)
            if not np.array_equal(ids, rec.recommend_columns(raw_to_columns(req))[0]):
                raise AssertionError(f"{model}: served top-k differs from in-process top-k")
            inputs = c.build_inputs(req)
            outputs = [c._tc.InferRequestedOutput(x) for x in ("item_ids", "scores")]
            r = timed(lambda: c._client.infer(model, inputs, outputs=outputs), n, secs)
            out.append({"protocol": protocol, "batch": batch, **r})
    return out


def _catalogue(n: int, dim: int, clustered: bool, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """``n`` item embeddings and 64 held-out queries: a mixture of ``ANN_CLUSTERS`` Gaussians (queries
    drawn from the same mixture), or isotropic Gaussian (no structure: the hard case for any index)."""
    rng = np.random.default_rng(seed)
    if not clustered:
        return rng.normal(size=(n, dim)).astype(np.float32), rng.normal(size=(64, dim)).astype(np.float32)
    centres = rng.normal(size=(ANN_CLUSTERS, dim))

    def draw(m: int) -> np.ndarray:
        return (centres[rng.integers(0, ANN_CLUSTERS, m)] + 0.3 * rng.normal(size=(m, dim))).astype(np.float32)
    return draw(n), draw(64)


def ann_case(n: int, dim: int, clustered: bool, quick: bool = False, k: int = 10) -> dict:
    """Exact vs FAISS top-k on one synthetic catalogue: build time, p50 per batch (1, 64), recall@k."""
    from pipeline_lib.export import ann
    from pipeline_lib.models import retrieval
    from pipeline_lib.config import AnnConfig

    items, queries = _catalogue(n, dim, clustered, seed=0)
    cfg = AnnConfig()
    t0 = time.perf_counter()
    index = ann.build_index(items, cfg.nlist or ann.default_nlist(n), cfg.seed)
    build_s = time.perf_counter() - t0
    nprobe = ann.set_nprobe(index, cfg.nprobe)
    t0 = time.perf_counter()
    exact_idx = retrieval.top_k(queries, items, k)[0]  # as a served exact version runs; the batch-64 figure
    exact64_ms = (time.perf_counter() - t0) * 1000.0
    recall = ann.ann_recall(exact_idx, ann.search(index, queries, items, k)[0])
    n_calls = 30 if quick else 100
    out = {"items": n, "dim": dim, "catalogue": "clustered" if clustered else "isotropic", "nlist": int(index.nlist),
           "nprobe": nprobe, "build_s": round(build_s, 2), "recall_at_10": round(recall, 4), "batches": []}
    for batch in (1, 64):
        q = queries[:batch]
        if batch == 1:
            exact = timed(lambda: retrieval.top_k(q, items, k), 3 if quick else 5, 5.0)
        else:
            exact = {"requests": 1, "p50_ms": round(exact64_ms, 3), "p99_ms": round(exact64_ms, 3)}
        approx = timed(lambda: ann.search(index, q, items, k), n_calls, 5.0)
        out["batches"].append({"batch": batch, "exact": exact, "ann": approx,
                               "exact_over_ann_p50": round(exact["p50_ms"] / approx["p50_ms"], 1)})
    return out


def ann_bench(n_items: int = ANN_ITEMS, quick: bool = False) -> dict:
    """The clustered catalogue (latency and recall) and, unless ``quick``, the isotropic one (recall
    at the same parameters on data with no structure). Embedding size: the default model's."""
    from pipeline_lib.config import ModelConfig

    dim = ModelConfig().embedding_dim
    cases = [ann_case(n_items, dim, True, quick)]
    if not quick:
        cases.append(ann_case(n_items, dim, False, quick))
    return {"cases": cases}


def flow_overrides(data: dict) -> dict:
    """``data`` (data/model/export overrides) with the two-stage run on top; ``model.retrieval`` is merged."""
    model = data.get("model", {})
    return {**data, **RUN, "model": {**model, **RUN["model"],
                                     "retrieval": {**model.get("retrieval", {}), **RUN["model"]["retrieval"]}},
            "export": {**data.get("export", {}), "model_name": "topk_two_stage"}}


def flow_run_dir(work: Path) -> Path:
    """The run folder of the two-stage flow :func:`bench` ran in ``work``."""
    return Path(json.loads((work / "flow" / "e2e.json").read_text())["summary"]["run_dir"])


def bench(work: Path, quick: bool = False, data: dict | None = None, ann_items: int = 0,
          calls: tuple | None = None, prefect_api: str | None = None) -> dict:
    """``data``: config overrides for the flow (default: 20k synthetic interactions, 1 epoch). One
    two-stage flow; the retrieval-only version is exported from the same run's workflow and
    two-tower model (``topk.export_topk`` without a ranker, as the flow does for a retrieval run).
    Both versions are then served by one Triton. ``ann_items``: also :func:`ann_bench` (key ``ann``).
    ``calls``: (calls, seconds) per timed point (default :func:`budget` of ``quick``); ``prefect_api``:
    see ``e2e_bench.bench``."""
    import shutil

    from benchmarks import e2e_bench, user_id
    from pipeline_lib.serving import repository
    from pipeline_lib.export import topk
    from pipeline_lib.config import ColumnsConfig
    from pipeline_lib.serving.server import TritonServer

    flow = e2e_bench.bench(work / "flow", flow_overrides(data or DATA), prefect_api=prefect_api)
    run_dir = flow_run_dir(work)
    etl_dir = Path(json.loads((run_dir / "summary.json").read_text())["etl_from"])
    split = etl_dir.parent / "split"
    rows = pd.read_parquet(split / "valid.parquet").sample(n=64, random_state=0).reset_index(drop=True)
    repo = work / "model_repository"
    shutil.copytree(work / "flow" / "model_repository" / "topk_two_stage", repo / "topk_two_stage")
    exp = topk.export_topk(etl_dir / "workflow", run_dir / "model" / "model", split / "train.parquet",
                           rows.head(32), topk.TopKSettings(ColumnsConfig(), k=10), work / "staging", "topk_two_tower")
    version, _ = repository.publish(exp.version_dir, exp.config_path, repo, "topk_two_tower")
    repository.promote(repo, "topk_two_tower", version)

    results, recs, calls = {}, {}, calls or budget(quick)
    for name in NAMES:
        recs[name], out = in_process(repo, f"topk_{name}", rows, calls)
        results[name] = {"flow_metrics": flow.get("metrics"), "flow_seconds": flow["process_wall_seconds"], **out}
    server = TritonServer.on_free_ports(repo, log_file=work / "triton.log")
    with server.start(timeout_s=300, models=[f"topk_{n}" for n in NAMES]):
        for name in NAMES:
            for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
                results[name]["served"] += served(url, protocol, f"topk_{name}", recs[name], rows, calls)
                if (repo / f"topk_{name}" / "feature_store.json").is_file():  # the flow's features stage filled it
                    results[name].setdefault("user_id", []).extend(
                        user_id.topk(url, protocol, repo / f"topk_{name}", calls, family=name))
    if ann_items:
        results["ann"] = ann_bench(ann_items, quick)
    return results


def markdown(r: dict) -> list[str]:
    lines = ["| version | batch | in-process compiled p50 ms | in-process NVTabular p50 ms | NVTabular / compiled "
             "| served gRPC p50 ms (p99) | served HTTP p50 ms (p99) |", "|---|---|---|---|---|---|---|"]
    for name, v in r.items():
        if name == "ann":
            continue
        served = {(s["protocol"], s["batch"]): s for s in v["served"]}
        for ip in v["in_process"]:
            b = ip["batch"]
            g, h = served.get(("grpc", b), {}), served.get(("http", b), {})
            lines.append(f"| {name} ({v['candidates']} candidates, {v['catalogue_items']} items) | {b} "
                         f"| {ip['compiled']['p50_ms']} | {ip['nvtabular']['p50_ms']} | {ip['nvtabular_over_compiled_p50']}x "
                         f"| {g.get('p50_ms')} ({g.get('p99_ms')}) | {h.get('p50_ms')} ({h.get('p99_ms')}) |")
    lines.append("")
    lines.append("Compiled transform enabled at export: "
                 + ", ".join(f"{k}: {v['fast_transform'].get('enabled')}" for k, v in r.items() if k != "ann"))
    return lines + (["", *ann_markdown(r["ann"])] if r.get("ann") else [])


def ann_markdown(r: dict) -> list[str]:
    lines = ["Exact vs ANN (FAISS IVF-Flat, `pipeline_lib/export/ann.py`) top-10 on a synthetic catalogue:", "",
             "| catalogue | batch | exact p50 ms | ANN p50 ms | exact / ANN | ANN recall@10 | index build s |",
             "|---|---|---|---|---|---|---|"]
    for c in r["cases"]:
        for b in c["batches"]:
            lines.append(f"| {c['items']:,} items x {c['dim']}, {c['catalogue']} (nlist {c['nlist']}, nprobe "
                         f"{c['nprobe']}) | {b['batch']} | {b['exact']['p50_ms']} | {b['ann']['p50_ms']} "
                         f"| {b['exact_over_ann_p50']}x | {c['recall_at_10']} | {c['build_s']} |")
    return lines


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks.topk_bench", description="exact vs ANN top-k alone")
    p.add_argument("--ann-only", action="store_true", help="run only the synthetic ANN benchmark")
    p.add_argument("--items", type=int, default=ANN_ITEMS)
    p.add_argument("--quick", action="store_true", help="the clustered catalogue only, fewer calls")
    a = p.parse_args()
    if a.ann_only:
        res = ann_bench(a.items, a.quick)
        print(json.dumps(res, indent=2))
        print("\n".join(ann_markdown(res)))
    else:
        p.error("give --ann-only (the full top-k benchmark runs from `make bench`; user-id figures of one published "
                "version: python -m benchmarks.user_id)")
