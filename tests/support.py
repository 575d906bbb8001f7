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
