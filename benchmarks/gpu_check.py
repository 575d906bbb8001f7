"""GPU check: the pipeline's GPU path end to end, with per-stage timings (docs/scale.md).

Small synthetic data -> split -> NVTabular ETL with ``etl.device=gpu`` (cudf through a dask-cuda
``LocalCUDACluster``, one worker per visible GPU, RMM pool) -> the same ETL on CPU for comparison
-> training (Merlin Models TF) -> export (in-process parity checks) -> a real Triton server via
``pipeline_lib.release.smoke`` (``pipeline_lib.serving.server.TritonServer``) -> served == offline over HTTP and
gRPC. Library calls only (no Prefect), so a failure points at one stage.

    python -m benchmarks.gpu_check --device gpu          # on a GPU machine (scripts/gpu_check.sh)
    python -m benchmarks.gpu_check --device cpu          # dry run of the same stages on CPU

Prints one line per stage and a JSON summary; exit status 0 only if every check passed.
``--json PATH`` also writes the summary.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

MODEL = "recsys"


def _environment(device: str) -> dict:
    env = {"python": platform.python_version(), "device": device}
    for mod in ("nvtabular", "merlin.core", "dask", "distributed", "dask_cuda", "pandas", "numpy", "pyarrow",
                "tensorflow", "cudf", "dask_cudf", "cupy", "rmm"):
        try:
            m = __import__(mod, fromlist=["__version__"])
            env[mod] = getattr(m, "__version__", "?")
        except Exception as exc:  # noqa: BLE001 - reported, the GPU stage fails later with the cause
            env[mod] = f"not importable ({type(exc).__name__})"
    try:
        env["gpus"] = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version",
                                      "--format=csv,noheader"], capture_output=True, text=True,
                                     timeout=20).stdout.strip().splitlines()
    except (OSError, subprocess.SubprocessError):
        env["gpus"] = []
    from merlin.core.compat import HAS_GPU

    env["merlin_has_gpu"] = bool(HAS_GPU)
    return env


def _compare(gpu_dir: Path, cpu_dir: Path) -> dict:
    """GPU-ETL output vs CPU-ETL output: integer/list columns identical, floats within 1e-5."""
    import numpy as np
    import pandas as pd

    a, b = pd.read_parquet(gpu_dir / "part_0.parquet"), pd.read_parquet(cpu_dir / "part_0.parquet")
    out = {"rows": [len(a), len(b)], "columns_equal": list(a.columns) == list(b.columns), "max_abs_diff": {}}
    if not out["columns_equal"] or len(a) != len(b):
        out["equal"] = False
        return out
    for c in a.columns:
        x, y = a[c].to_numpy(), b[c].to_numpy()
        if x.dtype == object:  # lists
            same = all(np.array_equal(np.asarray(u), np.asarray(v)) for u, v in zip(x, y))
            out["max_abs_diff"][c] = 0.0 if same else float("inf")
        else:
            out["max_abs_diff"][c] = float(np.max(np.abs(x.astype(np.float64) - y.astype(np.float64)))) if len(x) else 0.0
    out["equal"] = all(v <= 1e-5 for v in out["max_abs_diff"].values())
    return out


def run(summary: dict, device: str, work: Path, interactions: int, epochs: int, compare_cpu: bool,
        workers: int | None, rmm_pool_size: str | None) -> dict:
    """Fills ``summary`` (timings_s, checks, environment, ok) stage by stage, so a failure keeps
    what ran before it."""
    import numpy as np
    import pandas as pd

    timings: dict[str, float] = summary.setdefault("timings_s", {})
    checks: dict[str, object] = summary.setdefault("checks", {})

    def stage(name, fn, *a, **kw):
        t0 = time.perf_counter()
        result = fn(*a, **kw)
        timings[name] = round(time.perf_counter() - t0, 2)
        print(f"[gpu_check] {name:<14} {timings[name]:8.2f} s", flush=True)
        return result

    t_start = time.perf_counter()
    summary["environment"] = stage("imports", _environment, device)
    print(f"[gpu_check] environment: {json.dumps(summary['environment'])}", flush=True)

    from pipeline_lib.data import sources as data
    from pipeline_lib.etl import workflow as etl
    from pipeline_lib.export import ranking as export
    from pipeline_lib.release import smoke
    from pipeline_lib.models import ranking as train
    from pipeline_lib.config import load_config

    cfg = load_config(None, {
        "runs_dir": str(work / "runs"),
        "data": {"synthetic": {"n_interactions": interactions, "n_users": max(300, interactions // 100),
                               "n_items": max(150, interactions // 200)}},
        "etl": {"device": device, "dask": {"local_workers": workers, "rmm_pool_size": rmm_pool_size}},
        "model": {"epochs": epochs, "batch_size": 1024},
        "export": {"parity_rows": 64, "model_repository": str(work / "model_repository")},
        "serving": {"notify_live_server": False},
    })
    raw = stage("data", data.write_raw, cfg.data, cfg.seed, work / "raw")
    split = stage("split", etl.split_raw, raw, cfg.split, cfg.columns, cfg.seed, work / "split")
    etl_out = stage(f"etl_{device}", etl.fit_transform, cfg.columns, cfg.etl, split, work / "transformed")
    checks["etl_device"] = etl_out.device
    if device == "gpu" and etl_out.device != "gpu":
        raise AssertionError(f"ETL ran on {etl_out.device}, not on the GPU")
    if compare_cpu and device == "gpu":
        cpu_cfg = cfg.etl.model_copy(update={"device": "cpu", "dask": cfg.etl.dask.model_copy(update={"local_workers": None})})
        cpu_out = stage("etl_cpu", etl.fit_transform, cfg.columns, cpu_cfg, split, work / "transformed_cpu")
        cmp = _compare(etl_out.train_dir, cpu_out.train_dir)
        checks["gpu_etl_equals_cpu_etl"] = cmp["equal"]
        checks["gpu_vs_cpu_max_abs_diff"] = cmp["max_abs_diff"]
    model = stage("train", train.train, etl_out.train_dir, etl_out.valid_dir, cfg.model, cfg.columns.label,
                  cfg.seed, work / "model")
    checks["metrics"] = {k: v for k, v in model.metrics.items() if isinstance(v, (int, float))}
    rows = pd.read_parquet(split.valid).head(cfg.export.parity_rows)[cfg.columns.serving_columns].reset_index(drop=True)
    exp = stage("export", export.export_ensemble, etl_out.workflow_dir, model.model_dir, rows, cfg.columns.label,
                work / "staging", MODEL, 1, export.ExportOptions.from_config(cfg))
    checks["export_parity_max_abs_diff"] = exp.parity_max_abs_diff
    import nvtabular as nvt

    offline = export.offline_scores(nvt.Workflow.load(str(etl_out.workflow_dir)),
                                    exp.version_dir / "ensemble" / "model", rows, cfg.columns.label)
    res = stage("triton_serve", smoke.smoke_test, exp.staged_repository, MODEL, rows, offline,
                cfg.serving.smoke_atol, work / "serving", cfg.serving.startup_timeout_s)
    checks["served_equals_offline"] = bool(res.max_abs_diff <= cfg.serving.smoke_atol)
    checks["served_max_abs_diff"] = res.max_abs_diff
    checks["served_rows"] = res.n_rows
    timings["total"] = round(time.perf_counter() - t_start, 2)
    summary["ok"] = bool(checks["served_equals_offline"] and checks.get("gpu_etl_equals_cpu_etl", True)
                         and np.isfinite(res.max_abs_diff))
    return summary


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", choices=["gpu", "cpu"], default="gpu")
    p.add_argument("--interactions", type=int, default=200_000)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--workers", type=int, default=None, help="etl.dask.local_workers (GPU default: one per GPU)")
    p.add_argument("--rmm-pool-size", default="0.5", help="etl.dask.rmm_pool_size per GPU worker ('none' = no pool)")
    p.add_argument("--no-compare-cpu", action="store_true", help="skip the CPU ETL run compared with the GPU one")
    p.add_argument("--work", default=None, help="work folder (default: a temporary one)")
    p.add_argument("--json", default=None, help="also write the summary here")
    a = p.parse_args(argv)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="gpu_check-"))
    work.mkdir(parents=True, exist_ok=True)
    pool = None if a.rmm_pool_size.lower() == "none" else a.rmm_pool_size
    summary: dict = {"ok": False}
    try:
        run(summary, a.device, work, a.interactions, a.epochs, not a.no_compare_cpu, a.workers, pool)
    except Exception as exc:  # noqa: BLE001 - the summary says which stage failed (the last timing + 1)
        import traceback

        traceback.print_exc()
        summary["ok"] = False
        summary["error"] = f"{type(exc).__name__}: {exc}"
    summary["work"] = str(work)
    text = json.dumps(summary, indent=2, default=str)
    print(text)
    if a.json:
        Path(a.json).write_text(text)
    print(f"[gpu_check] {'PASSED' if summary['ok'] else 'FAILED'}", flush=True)
    return 0 if summary["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
