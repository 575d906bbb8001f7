"""Plain helpers shared by unit and integration tests (fixtures live in tests/conftest.py)."""
from __future__ import annotations

import json
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ML = ROOT / "tests" / "fixtures" / "ml-100k"
ML_EXAMPLE = ROOT / "configs" / "examples" / "movielens100k.yaml"


def ml_config(tmp: Path, path: Path = ML, **over):
    base = {"data": {"path": str(path)}, "runs_dir": str(tmp / "runs"),
            "export": {"model_repository": str(tmp / "model_repository"), "parity_rows": 64},
            "model": {"epochs": 1, "batch_size": 128}, "serving": {"notify_live_server": False},
            "gate": {"require_beat_baseline": False}}  # 1 epoch on 480 rows: not about the baselines
    return base | over


def check_bench_results(res: dict, out: Path) -> tuple[dict, str]:
    """What every benchmark section writes: latest.json without errors, its header fields, latest.md."""
    saved = json.loads((out / "latest.json").read_text())
    md = (out / "latest.md").read_text()
    assert saved["errors"] == {} == res["errors"]
    assert {"started", "finished", "machine", "params", "section_seconds", "total_seconds"} <= set(saved)
    assert saved["machine"]["cpus"] >= 1
    assert md.startswith("# Benchmark results")
    return saved, md


def check_bench_section(saved: dict, md: str, name: str) -> dict:
    """One section of a benchmark run (latest.json, latest.md): no error, its wall time, the run's header
    fields; -> the section's results."""
    assert name not in saved["errors"], saved["errors"][name]
    assert name in saved["section_seconds"] and saved["machine"]["cpus"] >= 1
    assert {"started", "finished", "machine", "params", "total_seconds"} <= set(saved)
    assert md.startswith("# Benchmark results")
    return saved[name]


def start_redis():
    """A real redis-server on a free loopback port (no persistence), answering PING; -> (process, port), or None
    when redis-server is not installed (apt-get install redis-server; .ci/run installs it). The caller stops it."""
    import shutil
    import subprocess
    import time

    from pipeline_lib.serving.server import free_port

    exe = shutil.which("redis-server")
    if exe is None:
        return None
    port = free_port()
    proc = subprocess.Popen([exe, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 10
    while True:
        try:
            import socket

            with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
                s.sendall(b"PING\r\n")
                if s.recv(16).startswith(b"+PONG"):
                    return proc, port
        except OSError:
            pass
        if time.time() > deadline or proc.poll() is not None:
            proc.terminate()
            raise RuntimeError(f"redis-server did not start on port {port}")
        time.sleep(0.1)
