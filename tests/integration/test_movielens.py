"""MovieLens-100K by config: the loader on a small synthetic fixture in the exact ml-100k layout,
then the whole Prefect flow (data -> validate + drift -> ETL -> train -> export -> Triton -> publish)
from configs/examples/movielens100k.yaml pointed at that fixture."""
import json
import shutil
import time

import numpy as np
import pandas as pd
import pytest

from pipeline_lib.config import load_config
from pipeline_lib.data.sources import write_raw
from pipeline_lib.errors import DataValidationError
from pipeline_lib.validate.data import validate_raw
from tests.support import ML, ML_EXAMPLE, ml_config

pytestmark = pytest.mark.integration


@pytest.mark.integration
def test_movielens_flow_end_to_end_with_drift_against_the_previous_run(prefect_harness, tmp_path):
    from flows.pipeline import pipeline

    # a previous run whose users were 30 years older: its stats.json is what this run compares with
    older = tmp_path / "older"
    shutil.copytree(ML, older)
    users = pd.read_csv(older / "u.user", sep="|", header=None, dtype=str)
    users[1] = (users[1].astype(int) + 30).astype(str)
    users.to_csv(older / "u.user", sep="|", header=False, index=False)
    prev_cfg = load_config(ML_EXAMPLE, ml_config(tmp_path, older))
    prev = tmp_path / "runs" / "previous"
    raw = write_raw(prev_cfg.data, prev_cfg.seed, prev / "raw", prev_cfg.columns)
    (prev / "validated").mkdir(parents=True)
    validate_raw(raw, prev_cfg.columns, prev_cfg.validation).save(prev / "validated" / "stats.json")

    summary = pipeline(config_path=str(ML_EXAMPLE), overrides=ml_config(tmp_path, run_name="ml"))
    run = tmp_path / "runs" / "ml"
    assert list(summary["stage_seconds"]) == ["raw-data", "validate", "etl", "train", "export", "gate",
                                              "serving-smoke-test", "publish", "promote", "features"]
    assert summary["model_version"] == 1 and summary["max_abs_diff_served_vs_offline"] <= 1e-5
    assert sum(summary["split"][part]["rows"] for part in ("train", "valid", "test")) == 600
    assert summary["metrics"]["n_train"] == summary["split"]["train"]["rows"]
    assert 0 <= summary["metrics"]["auc"] <= 1
    preds = summary["predictions"]
    # etl.history is on in the example: the served requests carry the user-history features
    assert {"genres", "occupation", "age", "history_count", "history_positive_rate", "history_gap_s",
            "item_id_history"} <= set(preds.columns)
    np.testing.assert_allclose(preds["served_http"], preds["offline"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(preds["served_grpc"], preds["offline"], atol=1e-5, rtol=0)
    assert (tmp_path / "model_repository" / "recsys" / "1" / "ensemble" / "ensemble.pkl").exists()
    # user-id requests with the history: the snapshot holds the history features and recent items (as the next
    # row's), the smoke test scored id-only (user, item) pairs like their full rows, the features stage filled it
    from pipeline_lib.features.snapshot import Snapshot

    snap = Snapshot.load(tmp_path / "model_repository" / "recsys" / "1" / "ensemble" / "features")
    assert {"history_count", "history_positive_rate", "history_gap_s", "item_id_history"} <= set(snap.user_columns)
    smoke = json.loads((run / "serving" / "smoke.json").read_text())
    assert smoke["n_user_id_requests"] == 20 and smoke["max_abs_diff_user_id"] <= 1e-5
    assert summary["feature_store"]["version"] == 1 and summary["feature_store"]["snapshot"] == snap.id

    raw = pd.read_parquet(run / "raw" / "interactions.parquet")
    assert raw["genres"].map(len).min() >= 1 and set(raw["liked"].unique()) == {0, 1}
    stats = json.loads((run / "validated" / "stats.json").read_text())
    assert stats["files"]["items"].endswith("ml-100k/u.item") and stats["n_rows"] == 600
    drift = json.loads((run / "validated" / "drift.json").read_text())
    assert drift["previous"] == str(prev / "validated" / "stats.json") and drift["drifted"]
    assert ("age", "mean") in {(f["column"], f["metric"]) for f in drift["findings"]}

    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    import asyncio

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["data-drift"])))

    arts = asyncio.run(read())  # the session's Prefect API holds other modules' runs too: take the newest
    assert arts and "| age | mean |" in max(arts, key=lambda a: a.created).data


@pytest.mark.integration
def test_flow_stops_at_bad_data_with_one_message_and_no_retries(prefect_harness, tmp_path):
    from flows.pipeline import pipeline

    t0 = time.perf_counter()
    with pytest.raises(DataValidationError) as err:
        pipeline(config_path=str(ML_EXAMPLE), overrides=ml_config(tmp_path, tmp_path / "no-such-dir", run_name="bad"))
    assert time.perf_counter() - t0 < 10  # raw-data retries (2 s + 10 s) are for transient errors only
    assert len(err.value.problems) == 4 and "no-such-dir/u.data: column '*': file not found" in str(err.value)
    assert not (tmp_path / "runs" / "bad" / "validated").exists()
