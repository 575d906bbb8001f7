"""The flow's wiring of a competition (flows.tasks.compete) in a real Prefect flow run, with a fake family
that trains instantly: one task run per candidate, the winner's family and training go on, a failed
candidate is a leaderboard row, and the leaderboard artifacts are recorded for the run."""
import asyncio
import json
from pathlib import Path

from prefect import flow

from pipeline_lib.paths import RunPaths
from tests.unit.families.test_candidates import fake_family


@flow(name="compete-wiring")
def _compete(types: list[str], scores: dict, root: str) -> dict:
    from prefect.runtime import flow_run

    from flows import tasks

    timings: dict = {}
    fam, trained, comp = tasks.compete(tasks.stage_timer(timings), fake_family(scores, types), RunPaths(Path(root)), None)
    return {"type": fam.cfg.model.type, "dir": trained.model.model_dir, "rows": comp.rows(), "timings": timings,
            "flow_run_id": flow_run.id}


def _artifacts(flow_run_id: str) -> dict:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))

    return {a.key: a for a in asyncio.run(read())}


def test_the_flow_goes_on_with_the_winner_and_records_the_leaderboard(prefect_harness, tmp_path):
    out = _compete(["youtube_dnn", "mf", "two_tower"], {"youtube_dnn": RuntimeError("no GPU"), "mf": 0.4,
                                                        "two_tower": 0.3}, str(tmp_path))
    assert out["type"] == "mf" and out["dir"] == tmp_path / "model" / "candidates" / "mf" / "model"
    assert [(r["candidate"], r["winner"], r["error"]) for r in out["rows"]] == [
        ("youtube_dnn", False, "RuntimeError: no GPU"), ("mf", True, None), ("two_tower", False, None)]
    assert set(out["timings"]) == {"train-youtube_dnn", "train-mf", "train-two_tower"}
    assert (tmp_path / "model" / "leaderboard.png").exists()
    arts = _artifacts(str(out["flow_run_id"]))
    table = arts["leaderboard"].data
    table = json.loads(table) if isinstance(table, str) else table
    assert [row["candidate"] for row in table] == ["youtube_dnn", "mf (winner)", "two_tower"]
    assert "data:image/png;base64," in arts["leaderboard-plot"].data
