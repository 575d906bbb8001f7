"""The task-family interface: every family implements it, one config switch picks it, family rules
live in the family, one gate and one parity check serve all of them, and the ETL task is cached
for every family (a session run here: real NVTabular, real Prefect task cache)."""
from pathlib import Path

import pytest

from pipeline_lib.config import load_config
from pipeline_lib.families import get_family
from pipeline_lib.paths import RunPaths

from tests.conftest import SMALL


@pytest.mark.integration
def test_a_session_run_is_etl_cached_on_the_second_run(prefect_harness, tmp_path):
    from prefect import flow

    from flows import tasks

    cfg = load_config(None, {**{k: SMALL[k] for k in ("serving",)}, "task": "session", "seed": 21,
                             "runs_dir": str(tmp_path / "runs"),
                             "session": {"synthetic": {"n_sessions": 300, "n_items": 40, "n_categories": 4}}})
    fam = get_family(cfg)

    @flow
    def two_etls() -> list:
        outs = []
        for name in ("first", "second"):
            paths = RunPaths(tmp_path / "runs" / name)
            raw = tasks.raw_data(fam, paths)
            outs.append(tasks.cached_etl(tasks.stage_timer({}), fam, paths, raw))
        return outs

    first, second = two_etls()
    assert Path(first.workflow_dir) == tmp_path / "runs" / "first" / "transformed" / "workflow"
    assert Path(second.workflow_dir) == Path(first.workflow_dir)  # the cached output of the first run
    assert not (tmp_path / "runs" / "second" / "transformed").exists()
    assert (Path(first.workflow_dir) / "workflow.pkl").exists() and first.device == "cpu"
