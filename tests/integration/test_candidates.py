"""Candidates compete in a real flow run: EASE (closed form) and two-tower (1 epoch) train on the same ETL output,
the better validation user_recall@10 wins, and the winner is what the run exports, gates and serves.
The selection and leaderboard functions are checked in tests/unit/families/test_candidates.py."""
import json
from pathlib import Path

import pytest

from pipeline_lib.serving import repository
from tests.conftest import SMALL

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def competition(prefect_harness, tmp_path_factory):
    from flows.pipeline import pipeline

    tmp = tmp_path_factory.mktemp("candidates")
    overrides = {**SMALL, "seed": 3, "task": "retrieval", "runs_dir": str(tmp / "runs"), "run_name": "cands",
                 "model": {**SMALL["model"], "candidates": [{"type": "ease"}, {"type": "two_tower"}],
                           "type": "mf"},  # a type no candidate has: what the run reports must be the winner
                 "export": {**SMALL["export"], "model_repository": str(tmp / "repo"), "model_name": "cands"}}
    return pipeline(overrides=overrides)


def test_both_candidates_train_and_the_best_on_validation_is_served(competition):
    summary = competition
    board = summary["leaderboard"]
    assert [r["candidate"] for r in board] == ["ease", "two_tower"] and summary["selection_metric"] == "user_recall@10"
    assert all(r["error"] is None and r["value"] is not None for r in board)
    winner = max(board, key=lambda r: r["value"])  # ties: the first listed (max keeps the first)
    assert [r["winner"] for r in board] == [r is winner for r in board]
    assert summary["model"] == winner["type"]
    run = Path(summary["run_dir"])
    for r in board:  # each in its own folder; its leaderboard figure is its own validation metric
        metrics = json.loads((run / "model" / "candidates" / r["candidate"] / "metrics.json").read_text())["metrics"]
        assert metrics["model"] == r["type"] and metrics["user_recall@10"] == pytest.approx(r["value"])
        assert r["train_seconds"] > 0 and r["size_bytes"] > 1000 and r["latency_ms"] > 0
        # reported beside the choice: its test figure with a bootstrap interval (never used to choose)
        assert r["test_metric"] == "recall@10" and r["test_ci_low"] <= r["test_value"] <= r["test_ci_high"]
    assert (run / "model" / "leaderboard.png").stat().st_size > 1000
    print(summary["stage_seconds"], board)


def test_the_leaderboard_is_a_prefect_artifact(competition):
    from tests.integration.test_flow import _latest_artifacts, _table

    arts = _latest_artifacts(["leaderboard", "leaderboard-plot"])  # a worker runs one test at a time: ours
    rows = _table(arts["leaderboard"])
    assert sorted(r["candidate"] for r in rows) == sorted(
        r["candidate"] + (" (winner)" if r["winner"] else "") for r in competition["leaderboard"])
    assert "data:image/png;base64," in arts["leaderboard-plot"].data


def test_the_served_version_is_the_winner(competition):
    summary = competition
    assert summary["gate"]["promote"] and summary["model_version"] == 1
    served = Path(summary["served_dir"])
    info = json.loads((served / "run_info.json").read_text())
    assert info["metrics"]["model"] == summary["model"]
    assert repository.served_version(Path(summary["served_dir"]).parents[1], "cands") == 1
    assert summary["served_topk_equals_offline"] if "served_topk_equals_offline" in summary else \
        summary["max_abs_diff_served_vs_offline"] <= 1e-4
    saved = json.loads((Path(summary["run_dir"]) / "summary.json").read_text())
    assert [r["candidate"] for r in saved["leaderboard"]] == ["ease", "two_tower"]
    # the test-time history: the served version knows its users by train + validation (seen items, history)
    import pandas as pd

    split = Path(summary["run_dir"]) / "split"
    train, valid = (pd.read_parquet(split / f"{n}.parquet") for n in ("train", "valid"))
    pairs = [p[p.click > 0][["user_id", "item_id"]].drop_duplicates() for p in (train, pd.concat([train, valid]))]
    in_cat = pairs[1][pairs[1].item_id.isin(train.item_id)]
    seen = json.loads((served / "topk" / "spec.json").read_text())["seen"]
    assert seen["n_pairs"] == len(in_cat) > len(pairs[0])


def test_the_flow_run_is_tagged_and_named_after_the_winner(competition):
    """The Prefect runs list names the model that won (and was promoted), not the configured ``model.type``."""
    import asyncio

    from prefect.client.orchestration import get_client

    async def read():
        async with get_client() as client:
            return await client.read_flow_runs()

    ours = [r for r in asyncio.run(read()) if (r.parameters.get("overrides") or {}).get("run_name") == "cands"]
    assert len(ours) == 1 and ours[0].state.name == "Promoted"
    winner = competition["model"]
    assert {"task:retrieval", f"model:{winner}", "outcome:promoted"} <= set(ours[0].tags)
    assert f"({winner})" in ours[0].state.message
