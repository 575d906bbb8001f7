"""latest.json -> latest.md (markdown tables)."""
from __future__ import annotations


def _f(x, nd=1):
    if x is None:
        return "–"
    if isinstance(x, bool):
        return "yes" if x else "**no**"
    if isinstance(x, float):
        return f"{x:,.{nd}f}"
    if isinstance(x, int):
        return f"{x:,}"
    return str(x)


def _served_model(s: dict) -> str:
    """What the serving section served: its own model, or (--serve-model-from-topk) the top-k flow's re-ranker."""
    if s.get("model_from_run"):
        return f"Model: the re-ranker of the top-k section's two-stage flow (`{s['model_from_run']}`)"
    return f"Model trained on {_f(s.get('model_rows'))} rows"


def _client(proto: str) -> str:
    """A served row's protocol as the report names it (``grpc+shm``: the shared-memory client)."""
    base = {"grpc": "gRPC", "http": "HTTP"}.get(proto.split("+")[0], proto)
    return f"{base}, shared-memory client" if proto.endswith("+shm") else f"{base}, default client"


def inprocess_target_rows(t: dict) -> list[list]:
    """Target rows of the served / in-process ratios (serving_bench.inprocess_ratios), one client."""
    from benchmarks.serving_bench import TARGET_P50_RATIO, TARGET_ROWS_RATIO

    rows = []
    for k, v in t.items():
        if k.endswith("_batch1_p50_over_inprocess"):
            proto = k[: -len("_batch1_p50_over_inprocess")]
            rows.append([f"served p50 <= {TARGET_P50_RATIO} x in-process, batch 1, {_client(proto)}, 1 client",
                         f"{v} x in-process", f"{v / TARGET_P50_RATIO:.2f}",
                         t[f"{proto}_batch1_p50_le_{TARGET_P50_RATIO}_inprocess"]])
        elif k.endswith("_batch1024_throughput_over_inprocess"):
            proto = k[: -len("_batch1024_throughput_over_inprocess")]
            rows.append([f"served rows/s >= {TARGET_ROWS_RATIO} x in-process, batch 1024, {_client(proto)}, 1 client",
                         f"{v} x in-process", f"{v / TARGET_ROWS_RATIO:.2f}",
                         t[f"{proto}_batch1024_throughput_ge_{TARGET_ROWS_RATIO}_inprocess"]])
    return rows


def _table(header: list[str], rows: list[list]) -> list[str]:
    out = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    out += ["| " + " | ".join(_f(c) if not isinstance(c, str) else c for c in r) + " |" for r in rows]
    return out + [""]


def markdown(r: dict) -> str:
    m = r.get("machine", {})
    lines = [
        f"# Benchmark results ({r.get('mode', '?')} mode)", "",
        f"{r.get('started', '')} → {r.get('finished', '(running)')}, total {_f(r.get('total_seconds'))} s; "
        f"{m.get('cpus')} CPUs ({m.get('cpu_model', '')}), {m.get('memory_gb')} GB, Python {m.get('python')}, "
        f"commit {m.get('git_commit', '')}; load average at start {m.get('load_average_at_start')}, "
        f"at end {m.get('load_average_at_end', '–')}. Shared, noisy machine: compare ratios within this run.", "",
    ]
    if r.get("errors"):
        lines += ["**Errors:**", ""] + [f"- {k}: `{v[:300]}`" for k, v in r["errors"].items()] + [""]

    if r.get("etl"):
        lines += ["## ETL: pipeline NVTabular workflow vs plain pandas (same transforms, same parquet)", "",
                  "Fit on train, transform train + valid, write parquet; rows/s over train + valid rows; "
                  "peak RSS of each side's own child process (after-import RSS in brackets).", ""]
        rows = []
        for e in r["etl"]:
            n, p = e["nvt"], e["pandas"]
            rows.append([e["rows"], n["seconds"], n["rows_per_s"], f"{_f(n['peak_rss_mb'], 0)} ({_f(n['rss_after_imports_mb'], 0)})",
                         p["seconds"], p["rows_per_s"], f"{_f(p['peak_rss_mb'], 0)} ({_f(p['rss_after_imports_mb'], 0)})",
                         f"**{e['time_ratio_nvt_over_pandas']}**", e["peak_mem_ratio_nvt_over_pandas"],
                         f"{_f(e.get('categoricals_identical'))} / {e.get('max_float_abs_diff', 0):.1e}"])
        lines += _table(["rows", "NVT s", "NVT rows/s", "NVT peak MB", "pandas s", "pandas rows/s", "pandas peak MB",
                         "time NVT/pandas", "peak mem NVT/pandas", "categoricals identical / max float diff"], rows)
        from benchmarks import etl_bench

        lines += ["- " + etl_bench.target_line(e) for e in r["etl"]] + [""]

    if r.get("train"):
        t = r["train"]
        lines += ["## Training: DLRM, Merlin loader vs tf.data (same parquet, same model)", "",
                  f"One epoch, batch {t['batch_size']}, samples/s excluding the first batch (tracing).", ""]
        rows = [[x["feed"], "yes" if x["shuffle"] else "no", x["rows"], x["samples_per_s"],
                 x["samples_per_s_incl_first_batch"], x["epoch_seconds"], f"{x['loss']:.5f}"] for x in t["runs"]]
        lines += _table(["feed", "shuffle", "rows", "samples/s", "samples/s incl. 1st batch", "epoch s", "loss"], rows)
        lines += [f"Merlin / tf.data samples/s: **{t.get('ratio_merlin_over_tfdata')}** unshuffled, "
                  f"**{t.get('ratio_merlin_over_tfdata_shuffled')}** shuffled.", ""]

    if r.get("serving"):
        s = r["serving"]
        lines += ["## Serving: Triton (python backend) vs the same ensemble in-process", "",
                  f"{_served_model(s)}; server start {s.get('server_start_seconds')} s; "
                  f"served == in-process scores: max |diff| gRPC {s.get('max_abs_diff_served_vs_inprocess_grpc')}, "
                  f"HTTP {s.get('max_abs_diff_served_vs_inprocess_http')}, gRPC shared-memory client "
                  f"{s.get('max_abs_diff_served_vs_inprocess_grpc+shm')}. Protocol `grpc+shm`: the same-host client "
                  "(`RecsysClient(shared_memory=True)`), else the default client. Latency per request as seen by the client; "
                  "server columns are Triton's own statistics per request (queue = waiting for the single model "
                  "instance; compute = the python backend's execute).", ""]
        rows = [[x["protocol"], x["batch"], x["clients"], x.get("requests"), x.get("p50_ms"), x.get("p95_ms"),
                 x.get("p99_ms"), x.get("rows_per_s"), x.get("server_queue_ms"), x.get("server_compute_infer_ms"),
                 "; ".join(x.get("errors") or []) or ""]
                for x in s["served"] + s.get("served_shared_memory", [])]
        rows += [[f"in-process ({x.get('pass', '')})", x["batch"], 1, x["requests"], x["p50_ms"], x["p95_ms"],
                  x["p99_ms"], x["rows_per_s"], None, None, ""] for x in s["in_process"]]
        lines += _table(["protocol", "batch", "clients", "requests", "p50 ms", "p95 ms", "p99 ms", "rows/s",
                         "server queue ms", "server compute ms", "errors"], rows)
        if s.get("dynamic_batching"):
            d = s["dynamic_batching"]
            lines += [f"Same model with dynamic batching on ({d['config']}; gRPC, one instance): requests queued "
                      "while the instance is busy are scored in one call (executions/request < 1).", ""]
            rows = [[x["protocol"], x["batch"], x["clients"], x.get("requests"), x.get("p50_ms"), x.get("p95_ms"),
                     x.get("p99_ms"), x.get("rows_per_s"), x.get("server_queue_ms"), x.get("server_compute_infer_ms"),
                     x.get("executions_per_request"), "; ".join(x.get("errors") or []) or ""] for x in d["served"]]
            lines += _table(["protocol", "batch", "clients", "requests", "p50 ms", "p95 ms", "p99 ms", "rows/s",
                             "server queue ms", "server compute ms", "executions/request", "errors"], rows)
        if s.get("breakdown"):
            lines += ["In-process time per request, by part of model.py's path (median ms); the last column is "
                      "the same workflow op executed by NVTabular (the path before the compiled transform), "
                      "measured in the same loop:", ""]
            rows = [[b["batch"], b.get("fast_transform"), b.get("compiled_model"), b["median_ms"]["request"],
                     b["median_ms"]["checks"], b["median_ms"]["workflow_op"], b["median_ms"]["tensorflow_op"],
                     b["median_ms"]["other"], b["median_ms"]["nvtabular_workflow_op"], b["median_ms"].get("savedmodel_op")]
                    for b in s["breakdown"]]
            lines += _table(["batch", "compiled transform", "compiled model", "request (model.py path)", "request checks",
                             "workflow op", "model op", "other", "NVTabular workflow op", "SavedModel call"], rows)
        t = s.get("targets", {})
        lines += ["### Targets", ""]
        rows = []
        if "grpc_batch1_p50_ms" in t:
            rows.append(["p50 <= 3 ms, batch 1, gRPC, 1 client", f"{t['grpc_batch1_p50_ms']} ms",
                         f"{t['grpc_batch1_p50_over_3ms']:.2f}", t["grpc_batch1_p50_le_3ms"]])
        if "model_batch1_savedmodel_over_served_op" in t:
            v = t["model_batch1_savedmodel_over_served_op"]
            rows.append(["model part of a batch-1 request >= 3x faster than the SavedModel call (in-process)",
                         f"{v}x", f"{v / 3:.2f}", t["model_batch1_ge_3x_faster_than_savedmodel"]])
        rows += inprocess_target_rows(t)
        for k, v in t.items():
            if k.endswith("_p99_over_p50"):
                base = k[: -len("_p99_over_p50")]
                proto, batch, _ = base.split("_")
                rows.append([f"p99 <= 2 x p50, 8 clients, {proto}, {batch}", f"p99/p50 = {v}", f"{v / 2:.2f}",
                             t[f"{base}_p99_le_2x_p50"]])
        lines += _table(["target", "measured", "measured / target", "met"], rows)

    if r.get("etl_peers") or r.get("serving_peers"):
        lines += _peers(r)

    if r.get("e2e"):
        e = r["e2e"]
        what = ("the top-k section's two-stage flow (`--e2e-from-topk`)" if e.get("from_topk_section")
                else "default run (`flows.pipeline.pipeline`, embedded default)")
        lines += [f"## End to end: {what}", "",
                  f"Process start → first served prediction: **{e['process_start_to_first_prediction_seconds']} s** "
                  f"(Python imports {e['python_imports_seconds']} s; whole process {e['process_wall_seconds']} s; "
                  f"Prefect/flow overhead outside the stages {e['flow_overhead_seconds']} s, which includes starting "
                  "the ephemeral Prefect API). Validation AUC "
                  f"{_f((e.get('metrics') or {}).get('auc'), 3)}.", ""]
        st = e["stage_seconds"]
        lines += _table(list(st.keys()) + ["sum"], [list(st.values()) + [e["stages_sum_seconds"]]])

    if r.get("topk"):
        from benchmarks.topk_bench import markdown as topk_markdown

        lines += ["## Top-k serving: retrieval and two-stage (`benchmarks/topk_bench.py`)", "",
                  "Per request, one client; in-process = the served model.py's path in this process.", ""]
        lines += topk_markdown(r["topk"]) + [""]

    if r.get("user_id"):
        from benchmarks.user_id import markdown as user_id_markdown

        lines += ["## User-id requests: the feature store behind the endpoint (`benchmarks/user_id.py`)", ""]
        lines += user_id_markdown(r["user_id"]) + [""]

    if r.get("impressions"):
        from benchmarks.impressions_bench import markdown as impressions_markdown

        lines += impressions_markdown(r["impressions"])

    if r.get("section_seconds"):
        lines += ["Section wall times (s): " + ", ".join(f"{k} {v}" for k, v in r["section_seconds"].items()), ""]
    return "\n".join(lines)


def _peers(r: dict) -> list[str]:
    """The peers section: the pipeline's ETL and serving next to what a user could pick instead."""
    lines = ["## Peers: the pipeline next to stock NVTabular / merlin-systems, pandas, polars and a no-op model", ""]
    if r.get("etl_peers"):
        from benchmarks import etl_peers

        lines += ["ETL (same transforms, same parquet, own child process each; pipeline = NVTabular + the "
                  "project's fast paths, stock = the same workflow with them off). Outputs compared with the "
                  "pipeline's (categoricals identical, floats within "
                  f"{etl_peers.FLOAT_TOL:g}) before the ratios count.", ""]
        rows = [[e["rows"], e["nvt"]["seconds"], e["nvt_stock"]["seconds"], e["pandas"]["seconds"],
                 e["polars"]["seconds"], f"**{e['nvt_stock']['nvt_time_over_peer']}**",
                 f"**{e['pandas']['nvt_time_over_peer']}**", f"**{e['polars']['nvt_time_over_peer']}**",
                 " / ".join(f"{_f(e[p]['equal'])} ({e[p]['max_float_abs_diff']:.1e})" for p in etl_peers.PEERS)]
                for e in r["etl_peers"]]
        lines += _table(["rows", "pipeline s", "stock NVT s", "pandas s", "polars s", "time pipeline/stock",
                         "time pipeline/pandas (target <= 1)", "time pipeline/polars",
                         "equal: pandas / stock / polars (max float diff)"], rows)
        lines += ["- " + x for e in r["etl_peers"] for x in etl_peers.ratio_lines(e)] + [""]
    if r.get("serving_peers"):
        from benchmarks import serving_peers

        s = r["serving_peers"]
        lines += [f"Serving, one Triton (models {', '.join(s['models'])}; start {s['server_start_seconds']} s), "
                  "one gRPC client; in-process = the project's version run like its model.py in the bench process.", ""]
        diffs = s["max_abs_diff_served_vs_inprocess"]
        rows = [[m, x.get("p50_ms"), f"**{x.get('p50_over_inprocess')}**", x.get("rows_per_s"),
                 f"**{x.get('rows_per_s_over_inprocess')}**", f"{diffs[m]:.1e}" if m in diffs else "–"]
                for m, x in s["ratios"].items()]
        rows.append(["in-process", s["in_process"]["p50_ms"], "1", s["in_process"]["rows_per_s"], "1", "–"])
        lines += _table(["model", "batch-1 p50 ms", "p50 / in-process (project: target <= 1.5)", "batch-1024 rows/s",
                         "rows/s / in-process (project: target >= 0.8)", "max abs diff served vs in-process"], rows)
        lines += ["- " + x for x in serving_peers.ratio_lines(s)] + [""]
    return lines
