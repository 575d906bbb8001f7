"""MovieLens-100K by config: the loader on a small synthetic fixture in the exact ml-100k layout,
then the whole Prefect flow (data -> validate + drift -> ETL -> train -> export -> Triton -> publish)
from configs/examples/movielens100k.yaml pointed at that fixture."""
import json
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline_lib.config import load_config
from pipeline_lib.data.sources import load_movielens100k, write_raw
from pipeline_lib.errors import DataValidationError
from pipeline_lib.validate.data import validate_raw

ROOT = Path(__file__).resolve().parents[1]
ML = ROOT / "tests" / "fixtures" / "ml-100k"
EXAMPLE = ROOT / "configs" / "examples" / "movielens100k.yaml"


def ml_config(tmp: Path, path: Path = ML, **over):
    base = {"data": {"path": str(path)}, "runs_dir": str(tmp / "runs"),
            "export": {"model_repository": str(tmp / "model_repository"), "parity_rows": 64},
            "model": {"epochs": 1, "batch_size": 128}, "serving": {"notify_live_server": False},
            "gate": {"require_beat_baseline": False}}  # 1 epoch on 480 rows: not about the baselines
    return base | over


def test_fixture_is_in_the_ml100k_format():
    data = (ML / "u.data").read_text().splitlines()
    assert len(data) >= 300 and all(len(line.split("\t")) == 4 for line in data)
    genres = [line.split("|") for line in (ML / "u.genre").read_text().splitlines() if line]
    assert len(genres) == 19 and genres[1] == ["Action", "1"]
    items = (ML / "u.item").read_bytes().decode("latin-1").splitlines()
    assert all(len(line.split("|")) == 5 + 19 for line in items)
    assert all(len(line.split("|")) == 5 for line in (ML / "u.user").read_text().splitlines())


def test_loader_turns_genre_flags_into_a_list_and_derives_the_label(tmp_path):
    tables = {t.role: t for t in load_movielens100k(ML)}
    items = tables["items"].df.set_index("item_id")
    for line in (ML / "u.item").read_bytes().decode("latin-1").splitlines()[:10]:
        f = line.split("|")
        assert items.loc[int(f[0]), "genres"] == [g for g, flag in enumerate(f[5:]) if flag == "1"]
        assert items.loc[int(f[0]), "title"] == f[1]
    assert items.loc[4, "title"].startswith("Café")  # latin-1
    assert np.isnan(items["release_year"].iloc[-1]) and items["genres"].iloc[-1] == [0]  # the "unknown" movie
    cfg = load_config(EXAMPLE, ml_config(tmp_path))
    raw = write_raw(cfg.data, cfg.seed, tmp_path / "raw", cfg.columns)
    df = pd.read_parquet(raw)
    ratings = pd.read_csv(ML / "u.data", sep="\t", header=None, names=["u", "i", "r", "t"])
    assert len(df) == len(ratings)
    np.testing.assert_array_equal(df["liked"], (ratings["r"] >= 4).astype(int))
    assert df["liked"].dtype == np.int64
    assert {"user_id", "item_id", "timestamp", "age", "gender", "occupation", "genres", "release_year"} <= set(df.columns)
    report = validate_raw(raw, cfg.columns, cfg.validation)
    assert report.stats["genres"]["kind"] == "list" and report.stats["occupation"]["cardinality"] == 7


def test_missing_or_malformed_ml100k_files(tmp_path):
    bad = tmp_path / "ml"
    shutil.copytree(ML, bad)
    (bad / "u.user").unlink()
    (bad / "u.genre").write_text("unknown|0\nAction|1\n")  # 2 genres but u.item has 19 flags
    with pytest.raises(DataValidationError) as err:
        load_movielens100k(bad)
    msg = str(err.value)
    assert f"{bad}/u.user: column '*': file not found (expected the GroupLens ml-100k layout)" in msg
    with pytest.raises(DataValidationError, match=r"u.item: column '\*': expected 5 \+ 2 genre columns"):
        (bad / "u.user").write_text((ML / "u.user").read_text())
        load_movielens100k(bad)


@pytest.mark.integration
def test_movielens_flow_end_to_end_with_drift_against_the_previous_run(prefect_harness, tmp_path):
    from flows.pipeline import pipeline

    # a previous run whose users were 30 years older: its stats.json is what this run compares with
    older = tmp_path / "older"
    shutil.copytree(ML, older)
    users = pd.read_csv(older / "u.user", sep="|", header=None, dtype=str)
    users[1] = (users[1].astype(int) + 30).astype(str)
    users.to_csv(older / "u.user", sep="|", header=False, index=False)
    prev_cfg = load_config(EXAMPLE, ml_config(tmp_path, older))
    prev = tmp_path / "runs" / "previous"
    raw = write_raw(prev_cfg.data, prev_cfg.seed, prev / "raw", prev_cfg.columns)
    (prev / "validated").mkdir(parents=True)
    validate_raw(raw, prev_cfg.columns, prev_cfg.validation).save(prev / "validated" / "stats.json")

    summary = pipeline(config_path=str(EXAMPLE), overrides=ml_config(tmp_path, run_name="ml"))
    run = tmp_path / "runs" / "ml"
    assert list(summary["stage_seconds"]) == ["raw-data", "validate", "etl", "train", "export", "gate",
                                              "serving-smoke-test", "publish", "promote"]
    assert summary["model_version"] == 1 and summary["max_abs_diff_served_vs_offline"] <= 1e-5
    assert summary["metrics"]["n_train"] + summary["metrics"]["n_valid"] == 600
    assert 0 <= summary["metrics"]["auc"] <= 1
    preds = summary["predictions"]
    assert {"genres", "occupation", "age"} <= set(preds.columns)
    np.testing.assert_allclose(preds["served_http"], preds["offline"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(preds["served_grpc"], preds["offline"], atol=1e-5, rtol=0)
    assert (tmp_path / "model_repository" / "recsys" / "1" / "ensemble" / "ensemble.pkl").exists()

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
        pipeline(config_path=str(EXAMPLE), overrides=ml_config(tmp_path, tmp_path / "no-such-dir", run_name="bad"))
    assert time.perf_counter() - t0 < 10  # raw-data retries (2 s + 10 s) are for transient errors only
    assert len(err.value.problems) == 4 and "no-such-dir/u.data: column '*': file not found" in str(err.value)
    assert not (tmp_path / "runs" / "bad" / "validated").exists()


@pytest.mark.integration
def test_cli_run_on_bad_data_prints_one_error_without_a_stack_trace(tmp_path):
    """`recsys run` (real Prefect flow): bad ratings stop it with file, column, count and example."""
    import subprocess
    import sys

    bad = tmp_path / "ml"
    shutil.copytree(ML, bad)
    lines = (bad / "u.data").read_text().splitlines()
    lines[5] = lines[5].rsplit("\t", 2)[0] + "\tfive\t" + lines[5].rsplit("\t", 1)[1]
    (bad / "u.data").write_text("\n".join(lines) + "\n")
    out = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--config", str(EXAMPLE),
                          "--set", f"data.path={bad}", "--set", f"runs_dir={tmp_path / 'runs'}"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert (f"error: raw data failed validation (1 problem(s)):\n  - {bad}/u.data: column 'rating': "
            f"label_rule 'rating >= 4': value missing or not a number [1 rows] (e.g. 'five')") in out.stderr
