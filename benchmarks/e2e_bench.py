"""End to end: the default run (``flows.pipeline.pipeline`` on the embedded synthetic default) from
process start to the first served prediction, with the flow's own per-stage wall times.

Runs in a child process with a private ``PREFECT_HOME`` (its own ephemeral Prefect API and
database, so no ETL cache hit from earlier runs and no clash with other Prefect users), into a
temporary ``runs_dir`` / ``model_repository``, with ``serving.notify_live_server: false``.
"First served prediction" = when the run's serving smoke test wrote ``serving/smoke.json``
(the scores Triton returned over HTTP and gRPC, already compared with offline scores).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path


def child_main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--work", required=True)
    p.add_argument("--result", required=True)
    p.add_argument("--overrides-json", default="{}")
    a = p.parse_args(argv)
    t_import = time.time()
    from flows.pipeline import pipeline

    t_flow = time.time()
    work = Path(a.work)
    over = {"runs_dir": str(work / "runs"), "export": {"model_repository": str(work / "model_repository")},
            "serving": {"notify_live_server": False}}
    extra = json.loads(a.overrides_json)
    for k, v in extra.items():
        over[k] = {**over.get(k, {}), **v} if isinstance(v, dict) and isinstance(over.get(k), dict) else v
    summary = pipeline(overrides=over)
    t_end = time.time()
    summary.pop("predictions", None)
    smoke = Path(summary["run_dir"]) / "serving" / "smoke.json"
    Path(a.result).write_text(json.dumps({
        "summary": summary, "t_import_start": t_import, "t_flow_start": t_flow, "t_end": t_end,
        "t_first_prediction": smoke.stat().st_mtime,
    }, default=str))


def bench(work: Path, overrides: dict | None = None, timeout_s: float = 900, prefect_api: str | None = None) -> dict:
    """The flow in a child process with a private Prefect home; ``prefect_api``: report to that running
    Prefect API instead of starting an ephemeral one (its start-up is then not measured)."""
    work.mkdir(parents=True, exist_ok=True)
    result = work / "e2e.json"
    env = dict(os.environ, PREFECT_HOME=str(work / "prefect_home"), TF_CPP_MIN_LOG_LEVEL="2",
               PYTHONWARNINGS="ignore", PREFECT_SERVER_ANALYTICS_ENABLED="false",
               # the ephemeral API starts in ~10-30 s; the default 20 s limit fails on a loaded machine
               PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="180")
    env.pop("PREFECT_API_URL", None)  # the ephemeral API of this run, unless one is given
    env.update({"PREFECT_API_URL": prefect_api} if prefect_api else {})
    cmd = [sys.executable, "-m", "benchmarks.e2e_bench", "--work", str(work), "--result", str(result),
           "--overrides-json", json.dumps(overrides or {})]
    t0 = time.time()
    with open(work / "e2e.log", "wb") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, timeout=timeout_s,
                            cwd=Path(__file__).resolve().parent.parent).returncode
    wall = time.time() - t0
    if rc != 0:
        tail = (work / "e2e.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"end-to-end run failed ({rc}):\n{tail}")
    r = json.loads(result.read_text())
    stages = r["summary"]["stage_seconds"]
    upto = 0.0
    for name, s in stages.items():  # stages in run order; the first prediction is the smoke test
        upto += s
        if name == "serving-smoke-test":
            break
    out = {
        "stage_seconds": stages,
        "stages_sum_seconds": round(sum(stages.values()), 2),
        "stages_sum_to_first_prediction_seconds": round(upto, 2),
        "python_imports_seconds": round(r["t_flow_start"] - r["t_import_start"], 2),
        "process_start_to_first_prediction_seconds": round(r["t_first_prediction"] - t0, 2),
        "process_wall_seconds": round(wall, 2),
        "flow_overhead_seconds": round(r["t_end"] - r["t_flow_start"] - sum(stages.values()), 2),
        "metrics": r["summary"].get("metrics"),
        "max_abs_diff_served_vs_offline": r["summary"].get("max_abs_diff_served_vs_offline"),
        "overrides": overrides or {},
        "prefect_api": "given" if prefect_api else "ephemeral",
    }
    (work / "bench.json").write_text(json.dumps(out, default=str))
    return out


def load(work: Path) -> dict:
    """The figures :func:`bench` measured into ``work`` (e.g. the top-k section's flow), read back."""
    return json.loads((work / "bench.json").read_text())


if __name__ == "__main__":
    child_main()
