"""Where a served request's time goes (not part of ``make bench``; needs py-spy and pyinstrument,
which are NOT project dependencies):

    uv pip install py-spy pyinstrument          # into .venv only; `uv sync` removes them again
    uv run --frozen --no-sync python -m benchmarks.profile_serving [--seconds 15] [--batch 1]

1. serves a small model like the serving benchmark, drives it with one gRPC client at the given
   batch size, and samples the python-backend stub process (the process that runs model.py:
   request tensors -> workflow -> TensorFlow -> response) with ``py-spy record``; prints the share of
   samples spent in each part of the request path;
2. profiles the same request in-process with pyinstrument (model.py's path) and prints
   the call tree.

Writes benchmarks/results/profile_*.txt.
"""
from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from pathlib import Path

import psutil

from benchmarks import serving_bench

RESULTS = Path(__file__).resolve().parent / "results"

# (label, frame-name substrings), checked in order: the first match (innermost-first) labels a sample
BUCKETS = [
    ("compiled model (ONNX Runtime)", ("CompiledModel.__call__",)),
    ("TensorFlow SavedModel call", ("InProcessTensorflow.transform", "savedmodel_tensors", "predict_tensors")),
    ("compiled workflow transform (numpy)", ("CompiledWorkflow.__call__",)),
    ("NVTabular Workflow._transform_df (ops: Categorify, Normalize, ...)", ("_transform_df",)),
    ("TensorTable -> pandas (to_df) / bytes decode", ("to_df", "str.decode", "StringMethods")),
    ("pandas -> TensorTable (from_df)", ("from_df",)),
    ("merlin DAG runtime (other)", ("Runtime.transform", "ensemble.transform", "Ensemble.transform")),
    ("request checks / TensorTable()", ("check_request", "TensorTable.__init__")),
    ("response (tensor_table_to_triton_response)", ("tensor_table_to_triton_response",)),
    ("python backend: reading inputs", ("get_input_tensor_by_name", "as_numpy")),
]


def summarize_raw(path: Path, total_seconds: float) -> list[tuple[str, float]]:
    """py-spy raw (collapsed) stacks -> share of wall samples per bucket (idle = not in execute)."""
    counts: Counter = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, n = line.rsplit(" ", 1)
        n = int(n)
        total += n
        frames = stack.split(";")
        if not any("execute" in f and "model.py" in f for f in frames):
            counts["outside execute (stub waiting / IPC with the Triton process)"] += n
            continue
        for label, keys in BUCKETS:
            if any(k in f for f in frames for k in keys):
                counts[label] += n
                break
        else:
            counts["execute: other"] += n
    return [(k, 100.0 * v / total) for k, v in counts.most_common()] if total else []


def main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--seconds", type=float, default=15.0)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--data-dir", default=str(RESULTS / ".data"))
    a = p.parse_args(argv)
    py_spy = shutil.which("py-spy") or str(Path(sys.executable).with_name("py-spy"))
    RESULTS.mkdir(parents=True, exist_ok=True)
    from pipeline_lib.serving.client import RecsysClient
    from pipeline_lib.serving.server import TritonServer

    work = Path(tempfile.mkdtemp(prefix="recsys-profile-"))
    sm = serving_bench.prepare_model(work, Path(a.data_dir))
    server = TritonServer.on_free_ports(sm.repo, log_file=work / "triton.log", model_control="explicit", load_models=[serving_bench.MODEL])
    server.start(timeout_s=300, models=[serving_bench.MODEL])
    report = [f"# py-spy of the python backend stub, gRPC, batch {a.batch}, 1 client, {a.seconds:.0f} s", ""]
    try:
        stubs = [c for c in psutil.Process(server.process.pid).children(recursive=True)
                 if "stub" in " ".join(c.cmdline())]
        stub = stubs[0].pid
        stop = threading.Event()
        lat = []

        def load():
            with RecsysClient(server.grpc_url, "grpc", serving_bench.MODEL) as c:
                arrays = c.to_arrays(sm.rows.iloc[: a.batch])
                while not stop.is_set():
                    t0 = time.perf_counter()
                    c.infer_arrays(arrays)
                    lat.append(time.perf_counter() - t0)

        th = threading.Thread(target=load, daemon=True)
        th.start()
        time.sleep(2)
        raw = RESULTS / f"profile_stub_batch{a.batch}.raw"
        subprocess.run([py_spy, "record", "--pid", str(stub), "-d", str(int(a.seconds)), "-r", "200", "-f", "raw",
                        "-o", str(raw)], check=True, capture_output=True)
        stop.set()
        th.join(timeout=30)
        import numpy as np

        report.append(f"requests: {len(lat)}, client p50 {np.percentile(np.array(lat) * 1e3, 50):.2f} ms")
        report.append("")
        report += [f"{share:5.1f}%  {label}" for label, share in summarize_raw(raw, a.seconds)]
    finally:
        server.stop()

    # in-process call tree of one request path
    from pyinstrument import Profiler

    inproc = serving_bench.InProcess(sm.ensemble_dir)
    arrays = inproc.arrays(sm.rows.iloc[: a.batch])
    for _ in range(5):
        inproc(arrays)
    prof = Profiler(interval=0.0005)
    prof.start()
    n = 0
    t_end = time.perf_counter() + 5
    while time.perf_counter() < t_end:
        inproc(arrays)
        n += 1
    prof.stop()
    report += ["", f"# pyinstrument, in-process (model.py path: checks, DirectPredictor), batch {a.batch}, {n} calls in 5 s", "",
               prof.output_text(unicode=False, color=False, show_all=False)]
    text = "\n".join(report)
    (RESULTS / f"profile_serving_batch{a.batch}.txt").write_text(text)
    print(text)
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
