"""One real Prefect flow run with the tune stage on."""
import json
import pandas as pd
import pytest
from tests.conftest import SMALL


pytestmark = pytest.mark.integration


# a narrow space: every trial takes seconds
FAST_SPACE = {"epochs": [1, 2], "batch_size": [512], "embedding_dim": [8, 16], "mlp_width": [32, 64],
              "mlp_depth": [1, 1]}


@pytest.mark.integration
def test_flow_with_tune_trains_the_best_trial(prefect_harness, tmp_path):
    """The real flow: a tune task between ETL and training, its files and artifacts, and the trained
    model built with the best trial's params. A gate margin no model meets ends the run before
    serving (covered by test_flow.py), which keeps this test short."""
    from flows.pipeline import pipeline

    over = {**SMALL, "seed": 13, "runs_dir": str(tmp_path / "runs"), "run_name": "tuned",
            "export": {**SMALL["export"], "model_repository": str(tmp_path / "model_repository")},
            "gate": {"require_beat_baseline": True, "min_lift_over_baseline": 10.0},
            "tune": {"enabled": True, "n_trials": 2, "pruning": False, "space": FAST_SPACE}}
    state = pipeline(overrides=over, return_state=True)
    summary = state.result()
    run = tmp_path / "runs" / "tuned"
    assert list(summary["stage_seconds"])[:5] == ["raw-data", "validate", "etl", "tune", "train"]
    trials = pd.read_csv(run / "tune" / "trials.csv")
    best = json.loads((run / "tune" / "best_config.json").read_text())
    assert len(trials) == 2 and trials.loc[trials["best"], "number"].item() == best["best_trial"]
    assert summary["tune"]["best_trial"] == best["best_trial"] and summary["tune"]["best_params"] == best["params"]
    # training used the best params: its epochs, and the embedding width of the saved model
    saved = json.loads((run / "model" / "metrics.json").read_text())
    assert saved["metrics"]["epochs_run"] == best["params"]["epochs"]
    assert _embedding_widths(run / "model" / "model") == {best["params"]["embedding_dim"]}
    arts = _artifacts(state.state_details.flow_run_id)
    table = json.loads(arts["tune-trials"].data) if isinstance(arts["tune-trials"].data, str) else arts["tune-trials"].data
    assert [r["number"] for r in table] == ["0", "1"]
    assert "![optimisation history](data:image/png;base64," in arts["tune-history"].data
    assert f"tune: best of 2 trials is #{best['best_trial']}" in arts["run-summary"].data


def _embedding_widths(model_dir) -> set[int]:
    import tensorflow as tf

    # the saved weights (the SavedModel has no Keras layer traces, so no `.variables` list when loaded)
    shapes = tf.train.load_checkpoint(str(model_dir / "variables" / "variables")).get_variable_to_shape_map()
    return {int(s[-1]) for k, s in shapes.items() if k.endswith("/embeddings/.ATTRIBUTES/VARIABLE_VALUE") and len(s) == 2}


def _artifacts(flow_run_id) -> dict:
    import asyncio

    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(
                artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))

    return {a.key: a for a in asyncio.run(read())}
