"""The closed loop, end to end (``make demo-online``): v1 served -> simulated traffic -> online evaluation ->
retrain on the feedback -> v2 promoted on the live Triton -> more traffic -> both versions' online CTR.

    uv run python -m benchmarks.online_demo --out /tmp/online-demo

Small synthetic run (the test suite's size, a few epochs), a real Triton (explicit model control, impression
log on), a real Prefect flow for each pipeline run and online evaluation (the temporary local API unless
PREFECT_API_URL is set: then the runs and their artifacts show in that UI). Writes ``<out>/demo.json`` and
prints the per-version table; the online report and plot are under ``<out>/runs/online/reports/``.
"""
from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path

import pandas as pd

import flows  # noqa: F401 - Prefect defaults before Prefect is imported
from flows.online import online_evaluation
from flows.pipeline import pipeline
from pipeline_lib.config import load_config
from pipeline_lib.data import sources
from pipeline_lib.online import evaluation, settings, simulate
from pipeline_lib.serving.client import RecsysClient
from pipeline_lib.serving.server import free_ports, server_from_config

KEY = "online-demo-key"


def overrides(out: Path, ports: list[int], epochs: int) -> dict:
    return {
        "runs_dir": str(out / "runs"),
        "data": {"synthetic": {"n_users": 300, "n_items": 150, "n_interactions": 6000}},
        "model": {"epochs": epochs, "batch_size": 256},
        "export": {"model_repository": str(out / "model_repository"), "parity_rows": 64},
        "gate": {"require_beat_baseline": False},
        "split": {"method": "time"},
        "serving": {"http_port": ports[0], "grpc_port": ports[1], "metrics_port": ports[2],
                    "admin_api_key": KEY, "notify_live_server": True, "supervisor": {"enabled": False}},
        "online": {"k": 5, "impressions": {"flush_seconds": 0.5}},
        "evaluation": {"bootstrap_resamples": 500},
    }


def traffic(cfg, pop, requests: int, seed: int, label: str) -> dict:
    with RecsysClient(f"{cfg.serving.host}:{cfg.serving.http_port}", "http") as client:
        result = simulate.run_traffic(client, pop, requests, cfg.online.k, candidates=20, seed=seed)
    inbox = settings.feedback_dir(cfg) / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    pd.DataFrame(result.feedback, columns=["request_id", "user_id", "item_id", "event", "ts"]).to_csv(
        inbox / f"clicks-{label}.csv", index=False)
    print(f"[{label}] {result.requests} requests ({result.failed} failed), versions {result.versions}, "
          f"{result.clicks} clicks / {result.shown} shown = CTR {result.ctr:.4f}", flush=True)
    return {"requests": result.requests, "failed": result.failed, "versions": result.versions,
            "shown": result.shown, "clicks": result.clicks, "ctr": result.ctr}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, default=Path("runs/online-demo"))
    p.add_argument("--requests", type=int, default=1500, help="simulated requests per phase")
    p.add_argument("--users", type=int, default=60)
    p.add_argument("--epochs", type=int, default=3)
    a = p.parse_args(argv)
    shutil.rmtree(a.out, ignore_errors=True)
    a.out.mkdir(parents=True)
    t0 = time.perf_counter()
    over = overrides(a.out, free_ports(3), a.epochs)
    cfg = load_config(None, over)
    summary: dict = {"phases": {}}

    v1 = pipeline(overrides=over)
    summary["v1_gate"] = v1.get("gate")
    log = pd.read_parquet(sources.write_raw(cfg.data, cfg.seed, a.out / "log", cfg.columns))
    pop = simulate.population(log, cfg, a.users, cfg.seed)
    server = server_from_config(cfg.serving, cfg.export.model_repository, cfg.export.model_name,
                                log_file=a.out / "triton.log", env=settings.server_env(cfg))
    server.start(timeout_s=300, models=[cfg.export.model_name])
    try:
        summary["phases"]["v1"] = traffic(cfg, pop, a.requests, 1, "v1")
        time.sleep(2 * cfg.online.impressions.flush_seconds)
        first = online_evaluation(overrides=over)
        summary["online_after_v1"] = evaluation.table_rows(first)
        # the newest rows (the feedback) are the test set; a gate that cannot tell the two apart on them
        # promotes (gate.on_inconclusive), so the demo always measures the retrained version online
        retrain = {**over, "online": {**over["online"], "retrain_on_feedback": True},
                   "gate": {**over["gate"], "on_inconclusive": "promote"}}
        v2 = pipeline(overrides=retrain)
        summary["v2_gate"] = v2.get("gate")
        summary["phases"]["v2"] = traffic(cfg, pop, a.requests, 2, "v2")
        time.sleep(2 * cfg.online.impressions.flush_seconds)
    finally:
        server.stop()  # clean stop: everything queued is written
    final = online_evaluation(overrides=over)
    summary["online"] = evaluation.table_rows(final)
    summary["comparisons"] = final["comparisons"]
    summary["seconds"] = round(time.perf_counter() - t0, 1)
    (a.out / "demo.json").write_text(json.dumps(summary, indent=2, default=str))
    print(evaluation.markdown(final))
    print(f"demo finished in {summary['seconds']} s; {a.out / 'demo.json'}")
    return summary


if __name__ == "__main__":
    main()
