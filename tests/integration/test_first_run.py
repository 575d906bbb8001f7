"""The README's run command path on a machine that never ran Prefect or this project.

`recsys run` as a subprocess, with an empty Prefect home, no Prefect API configured and an empty
project cache: Prefect starts its temporary server, which first creates and migrates a new
database (this timed out on 2-core machines with Prefect's 20 s default), the flow runs every
stage, and the run ends with predictions served by a real Triton.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from tests.support import ROOT

pytestmark = pytest.mark.integration


def fresh_env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(tmp / "prefect-home"), RECSYS_CACHE_DIR=str(tmp / "recsys-cache"),
               MPLCONFIGDIR=str(tmp / "mpl"))
    return env


def test_recsys_run_with_an_empty_prefect_home_ends_with_served_predictions(tmp_path):
    env = fresh_env(tmp_path)
    assert not Path(env["PREFECT_HOME"]).exists()
    sets = [f"runs_dir={tmp_path / 'runs'}", f"export.model_repository={tmp_path / 'model_repository'}",
            "serving.notify_live_server=false", "run_name=first",
            # this test is about the first run, not the model (`make run` covers the default): no baseline
            # requirement, and one epoch on half the small config's data
            "gate.require_beat_baseline=false", "model.epochs=1", "data.synthetic.n_interactions=3000"]
    cmd = [sys.executable, "-m", "flows.cli", "run", "--config", str(ROOT / "configs" / "small.yaml")]
    out = subprocess.run(cmd + sum((["--set", s] for s in sets), []), cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=1200)
    printed = out.stdout + out.stderr
    assert out.returncode == 0, printed[-5000:]
    assert "Starting temporary server" in printed  # no API configured: Prefect's own temporary server
    assert "Served predictions" in printed
    assert "served: model 'recsys' version 1" in out.stdout  # the closing summary, not a JSON dump
    assert "Warning" not in printed, printed[-5000:]  # known-harmless library warnings are silenced
    summary = json.loads((tmp_path / "runs" / "first" / "summary.json").read_text())
    assert summary["model_version"] == 1 and summary["served_version"] == 1
    assert summary["max_abs_diff_served_vs_offline"] <= 1e-5
    home = Path(env["PREFECT_HOME"])
    assert (home / "prefect.db").stat().st_size > 0  # the database was created in the empty home
    # the persisted ETL result went to this home, not to ~/.prefect/storage (Prefect 3.7's default)
    assert any((home / "storage").iterdir())
    assert (Path(env["RECSYS_CACHE_DIR"])).is_dir()  # the Triton backend folder was set up from scratch
