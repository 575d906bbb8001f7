"""The whole Prefect flow on a small synthetic set, then the README's serve/predict commands."""
import json
import os
import shlex
import signal
import subprocess
import sys

import numpy as np
import pandas as pd
import pytest

from pipeline_lib.export import ranking as export
from pipeline_lib.report import uv_command
from pipeline_lib.serving.client import RecsysClient
from pipeline_lib.serving.server import TritonServer
from pipeline_lib.serving.server import free_ports

from tests.conftest import SMALL
from tests.support import ROOT

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def flow_run(prefect_harness, tmp_path_factory):
    from flows.pipeline import pipeline

    tmp = tmp_path_factory.mktemp("flow")
    # a seed of its own: no ETL cache hit on another module's run with the SMALL data
    overrides = {**SMALL, "seed": 11, "runs_dir": str(tmp / "runs"), "run_name": "it",
                 "export": {**SMALL["export"], "model_repository": str(tmp / "model_repository")}}
    summary = pipeline(overrides=overrides)
    return tmp, overrides, summary


def test_flow_runs_every_stage_and_publishes(flow_run):
    tmp, _, summary = flow_run
    run = tmp / "runs" / "it"
    assert list(summary["stage_seconds"]) == ["raw-data", "validate", "etl", "train", "export", "gate",
                                              "serving-smoke-test", "publish", "promote", "features"]
    # the promoted ranking version's feature snapshot, materialized by the features stage (user-id requests)
    fs = summary["feature_store"]
    assert fs["version"] == 1 and fs["online_store"] == "sqlite" and fs["users"] > 0 and fs["items"] > 0
    assert summary["gate"]["promote"] and summary["gate"]["served_version"] is None  # first run promotes
    assert summary["model_version"] == 1 and summary["etl_device"] == "cpu"
    assert summary["etl_path"].startswith("fast (verified against NVTabular")  # etl.fast_path, on CPU by default
    assert summary["etl_from"] == str(run / "transformed")  # first run in this session: no ETL cache hit
    assert summary["max_abs_diff_served_vs_offline"] <= 1e-5
    assert 0.5 < summary["metrics"]["auc"] <= 1
    # the headline figures are the test split's, each with its 95% interval; validation is labelled apart
    assert summary["metrics_split"] == "test" and summary["gate"]["outcome"] == "promoted"
    assert summary["intervals"]["auc"].startswith(f"{summary['metrics']['auc']:.4f} [")
    assert summary["validation_metrics"]["auc"] != summary["metrics"]["auc"]
    sizes = summary["split"]
    assert sizes["train"]["rows"] + sizes["valid"]["rows"] + sizes["test"]["rows"] == SMALL["data"]["synthetic"][
        "n_interactions"] and summary["metrics"]["n_test"] == sizes["test"]["rows"] and summary["warnings"] == []
    assert summary["gate"]["n_rows"] == sizes["test"]["rows"] and summary["gate"]["candidate"] == pytest.approx(
        summary["metrics"]["auc"], abs=1e-5)  # the gate scores the exported version on the same test rows
    # the baselines of the same split, beside the model, in the summary and in metrics.json
    assert set(summary["baselines"]) == {"logistic_regression", "item_click_rate"}
    assert all(0 <= b["auc"] <= 1 for b in summary["baselines"].values())
    assert summary["lift"].startswith(f"dlrm auc {summary['metrics']['auc']:.4f} is ")
    saved = json.loads((run / "model" / "metrics.json").read_text())
    assert saved["metrics"]["baselines"] == summary["baselines"] and saved["metrics"]["lift"] == summary["lift"]
    for f in ["config.yaml", "raw/interactions.parquet", "validated/stats.json", "split/train.parquet",
              "split/valid.parquet", "split/test.parquet",
              "transformed/workflow/workflow.pkl", "transformed/train/schema.pbtxt", "model/model/saved_model.pb",
              "model/metrics.json", "serving/smoke.json", "summary.json"]:
        assert (run / f).exists(), f
    assert (tmp / "model_repository" / "recsys" / "1" / "ensemble" / "ensemble.pkl").exists()
    # the smoke test's Triton loaded the compiled version: no TensorFlow / NVTabular / merlin in its model
    smoke = json.loads((run / "serving" / "smoke.json").read_text())
    assert [(e["path"], e["heavy_modules"]) for e in smoke["model_load"]] == [("compiled", [])]
    # ... and scored 5 users (one unknown) x 4 items (one unknown) sent as ids alone like the offline full rows
    assert smoke["n_user_id_requests"] == 20 and smoke["max_abs_diff_user_id"] <= 1e-5
    preds = summary["predictions"]
    np.testing.assert_allclose(preds["served_http"], preds["offline"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(preds["served_grpc"], preds["offline"], atol=1e-5, rtol=0)
    # how to query it: commands for the served model, its endpoints, a curl body of one raw row
    q = summary["query"]
    assert q["model_name"] == "recsys" and q["http"] == "127.0.0.1:8000" and q["grpc"] == "127.0.0.1:8001"
    assert q["serve"] == f"{uv_command()} run recsys serve --set export.model_repository={tmp / 'model_repository'} --set runs_dir={tmp / 'runs'}"
    assert q["predict"].startswith(q["serve"].replace(" serve ", " predict ")) and "notify_live_server" not in q["predict"]
    assert q["curl"].endswith(str(run / "serving" / "request.json"))
    assert '"name":"user_id"' in q["curl_user"] and '"name":"item_id"' in q["curl_user"] and "recommend" not in q
    assert '"name":"user_age"' not in q["curl_user"]
    from pipeline_lib.report import cli_summary

    text = cli_summary(summary)
    assert "served: model 'recsys' version 1" in text and f"{uv_command()} run recsys serve" in text and str(run) in text


def test_flow_run_is_recorded_in_prefect_with_artifacts(flow_run):
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey
    import asyncio

    async def read():
        async with get_client() as client:
            runs = await client.read_flow_runs()
            arts = await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=["served-predictions", "run-summary"])))
            return runs, arts

    runs, arts = asyncio.run(read())
    assert any(r.state.is_completed() for r in runs)
    # this module's promoted dlrm run (other test files on this worker share the Prefect database)
    ours = [r for r in runs if r.state.name == "Promoted" and "model:dlrm" in r.tags]
    assert ours and {"task:ranking", "model:dlrm", "outcome:promoted"} <= set(ours[0].tags)
    assert {a.key for a in arts} == {"served-predictions", "run-summary"}


def _latest_artifacts(keys: list[str]) -> dict:
    """The newest artifact of each key in the test session's Prefect API."""
    import asyncio

    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterKey

    async def read():
        async with get_client() as client:
            return await client.read_artifacts(artifact_filter=ArtifactFilter(key=ArtifactFilterKey(any_=keys)))

    arts = {}
    for a in asyncio.run(read()):
        if a.key not in arts or a.created > arts[a.key].created:
            arts[a.key] = a
    return arts


def _table(artifact) -> list[dict]:
    return json.loads(artifact.data) if isinstance(artifact.data, str) else artifact.data


def test_flow_artifacts_are_readable_in_the_prefect_ui(flow_run):
    """Rounded figures, a narrow predictions table, the effective config, the learning curve as an
    embedded image, and a run summary that says what serves where and how to query it."""
    keys = ["metrics", "served-predictions", "run-summary", "effective-config", "learning-curve"]
    arts = _latest_artifacts(keys)
    assert set(arts) == set(keys)
    metrics = _table(arts["metrics"])
    auc = next(r["value"] for r in metrics if r["metric"] == "test auc")  # "0.5831 [0.5402, 0.6218]"
    value, lo, hi = (float(x) for x in auc.replace("[", "").replace("]", "").replace(",", "").split())
    assert lo <= value <= hi and all(len(x.replace("0.", "", 1)) <= 4 for x in auc.strip("]").split(" [")[0:1]), auc
    assert any(r["metric"] == "validation auc" for r in metrics)  # labelled apart
    rows = _table(arts["served-predictions"])
    assert all(len(v) <= 24 for r in rows for v in r.values()), rows[0]
    summary = arts["run-summary"].data
    assert "model **recsys** version **1**" in summary and "HTTP `127.0.0.1:8000`, gRPC `127.0.0.1:8001`" in summary
    assert f"{uv_command()} run recsys serve" in summary and "curl -s 127.0.0.1:8000/v2/models/recsys/infer" in summary
    assert "```yaml" in arts["effective-config"].data and "n_interactions: 6000" in arts["effective-config"].data
    assert "![dlrm learning curve](data:image/png;base64," in arts["learning-curve"].data


def test_metrics_artifact_holds_the_baselines_and_the_lift(flow_run):
    _, _, summary = flow_run
    rows = {r["metric"]: r["value"] for r in _table(_latest_artifacts(["metrics"])["metrics"])}
    assert float(rows["baseline logistic_regression: test auc"].split(" [")[0]) == pytest.approx(
        summary["baselines"]["logistic_regression"]["auc"], rel=1e-3)
    assert rows["baseline logistic_regression: test auc"].count("[") == 1  # with its interval
    assert "baseline item_click_rate: test logloss" in rows
    assert rows["lift over the best baseline"] == summary["lift"]


def _ignore_sigint() -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def test_serve_and_predict_commands_on_the_published_repository(flow_run):
    """`recsys serve` (real Triton), raw rows over HTTP and gRPC == offline, `recsys predict`, clean stop."""
    tmp, overrides, _ = flow_run
    run = tmp / "runs" / "it"
    http, grpc, metrics = free_ports(3)
    sets = [f"export.model_repository={tmp / 'model_repository'}", f"serving.http_port={http}",
            f"serving.grpc_port={grpc}", f"serving.metrics_port={metrics}", f"runs_dir={tmp / 'runs'}"]
    args = sum((["--set", s] for s in sets), [])
    recsys = [sys.executable, "-m", "flows.cli"]
    # started with SIGINT ignored, as `recsys serve &` from a script gets it: Ctrl-C must still stop it
    proc = subprocess.Popen(recsys + ["serve", *args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                            preexec_fn=_ignore_sigint)
    try:
        # the offline reference while `recsys serve` starts Triton; row 0 is request.json's row (below)
        rows = pd.read_parquet(run / "split" / "valid.parquet").head(16)
        cols = [c for c in rows.columns if c not in ("click", "timestamp")]
        import nvtabular as nvt

        offline = export.offline_scores(nvt.Workflow.load(str(run / "transformed" / "workflow")),
                                        run / "model" / "model", rows[cols], "click")
        TritonServer(tmp / "model_repository", http_port=http).wait_ready(240, ["recsys"])
        for proto, port in (("http", http), ("grpc", grpc)):
            with RecsysClient(f"127.0.0.1:{port}", proto) as c:
                np.testing.assert_allclose(c.predict(rows[cols]), offline, atol=1e-5, rtol=0)
        rows_file = tmp / "rows.json"
        rows_file.write_text(rows[cols].head(3).to_json(orient="records"))
        out = subprocess.run(recsys + ["predict", "--rows", str(rows_file), "--protocol", "http", *args],
                             capture_output=True, text=True, timeout=120)
        assert out.returncode == 0, out.stderr
        printed = [float(line.split()[-1]) for line in out.stdout.strip().splitlines()[1:]]
        np.testing.assert_allclose(printed, offline[:3], atol=1e-5)
        # the curl example of the run summary: serving/request.json is one raw validation row
        import urllib.request

        req = urllib.request.Request(f"http://127.0.0.1:{http}/v2/models/recsys/infer",
                                     data=(run / "serving" / "request.json").read_bytes(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            answer = json.loads(r.read())
        np.testing.assert_allclose(answer["outputs"][0]["data"], offline[:1], atol=1e-5)
        # the summary's user-id curl body (user id + item id only) against the store the features stage filled:
        # the score of the same pair's full row read from the training data
        from pipeline_lib.features import snapshot

        body = shlex.split(flow_run[2]["query"]["curl_user"])[-1]
        req = urllib.request.Request(f"http://127.0.0.1:{http}/v2/models/recsys/infer", data=body.encode(),
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=60) as r:
            outs = json.loads(r.read())["outputs"]
        art = tmp / "model_repository" / "recsys" / "1" / "ensemble"
        pair = snapshot.offline_pairs(art, [rows["user_id"].iloc[0]], [rows["item_id"].iloc[0]])
        want = export.offline_scores(nvt.Workflow.load(str(run / "transformed" / "workflow")),
                                     run / "model" / "model", pair[cols], "click")
        scores = [o["data"] for o in outs if o["name"] not in ("cold_start", "request_id")][0]
        np.testing.assert_allclose(scores, want, atol=1e-5)
        trained_users = set(pd.read_parquet(run / "split" / "train.parquet")["user_id"])
        assert [o["data"] for o in outs if o["name"] == "cold_start"] == [[rows["user_id"].iloc[0] not in trained_users]]
    finally:
        proc.send_signal(signal.SIGINT)
        log, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, log
    assert "Triton ready" in log and "Triton stopped." in log


@pytest.mark.parametrize("stage, overrides, error", [
    ("validate", {"columns": {"label": "no_such_label"}}, "required column is missing"),
    # fails after train and export; the gate does not matter to this case. (The ONNX-compiled model
    # stays on: a Triton told to stop while it loads a model finishes the load first, and without it
    # the model loads TensorFlow and NVTabular, 15-20 s per smoke attempt instead of ~2 s.)
    ("serving-smoke-test", {"serving": {"startup_timeout_s": 0.01}, "gate": {"enabled": False}},
     "not ready after"),
])
def test_a_failed_run_leaves_the_served_version_untouched(flow_run, stage, overrides, error):
    from flows.pipeline import pipeline
    from pipeline_lib.serving import repository

    tmp, base, _ = flow_run
    repo = tmp / "model_repository"
    before = (repository.served_version(repo, "recsys"), repository.list_versions(repo, "recsys"),
              (repo / "recsys" / "config.pbtxt").read_bytes())
    bad = {**base, "run_name": None, **{k: {**base.get(k, {}), **v} for k, v in overrides.items()}}
    with pytest.raises(Exception, match=error):
        pipeline(overrides=bad)
    after = (repository.served_version(repo, "recsys"), repository.list_versions(repo, "recsys"),
             (repo / "recsys" / "config.pbtxt").read_bytes())
    assert after == before and before[0] == 1
    assert not [p for p in (repo / "recsys").iterdir() if p.name.startswith(".incoming")]


def test_csv_example_with_a_string_list_feature_is_served_like_offline(prefect_harness, tmp_path):
    """configs/examples/csv_users_items.yaml end to end: the genres list holds strings, which
    Triton delivers as bytes; the served workflow must map them exactly as in training."""
    from flows.pipeline import pipeline

    root = str(ROOT)
    over = {"runs_dir": str(tmp_path / "runs"), "export": {"model_repository": str(tmp_path / "repo"), "parity_rows": 64},
            "serving": {"notify_live_server": False}, "gate": {"require_beat_baseline": False}}
    cwd = os.getcwd()
    os.chdir(root)  # the example's fixture paths are relative to the project root
    try:
        summary = pipeline(config_path=os.path.join(root, "configs", "examples", "csv_users_items.yaml"), overrides=over)
    finally:
        os.chdir(cwd)
    preds = summary["predictions"]
    assert isinstance(preds["genres"].iloc[0][0], str)
    np.testing.assert_allclose(preds["served_grpc"], preds["offline"], atol=1e-5, rtol=0)
    np.testing.assert_allclose(preds["served_http"], preds["offline"], atol=1e-5, rtol=0)


def test_the_gate_refuses_a_worse_model_and_keeps_the_served_version(flow_run):
    from flows.pipeline import pipeline
    from pipeline_lib.serving import repository

    tmp, base, first = flow_run
    repo = tmp / "model_repository"
    served_before = repository.served_version(repo, "recsys")
    versions_before = repository.list_versions(repo, "recsys")
    # the baseline requirement on (as by default): an untrained model beats no baseline either
    # (no ONNX compile at export: the gate scores versions in batches the SavedModel answers)
    worse = {**base, "run_name": "worse", "model": {**base["model"], "learning_rate": 1e-9},
             "gate": {"require_beat_baseline": True}, "export": {**base["export"], "compiled_model": "off"}}
    state = pipeline(overrides=worse, return_state=True)
    summary = state.result()  # the summary dict, as a plain pipeline(...) call returns it
    g = summary["gate"]
    assert not g["promote"] and g["served_version"] == served_before
    # the Prefect UI tells a refused run from a promoted one, and the runs list can filter on tags
    from prefect import get_client

    with get_client(sync_client=True) as client:
        tags = client.read_flow_run(state.state_details.flow_run_id).tags
    # refused, or inside the noise of ~600 test rows: either way version 1 keeps serving
    assert g["outcome"] in ("refused", "inconclusive") and g["candidate"] < g["served"]
    assert state.name == g["outcome"].capitalize() and state.is_completed() and "at the gate" in state.message
    assert {"task:ranking", "model:dlrm", f"outcome:{g['outcome']}"} <= set(tags)
    assert f"served v{served_before}" in g["reason"] and f"version {served_before} keeps serving" in g["reason"]
    assert g["served_difference"]["value"] < 0 and g["baseline_difference"]["value"] < 0
    assert g["reason"].startswith(f"dlrm auc {summary['metrics']['auc']:.5f}"), g["reason"]
    assert summary["predictions"] is None and "serving-smoke-test" not in summary["stage_seconds"]
    # same raw data + ETL config + code: the etl task was a cache hit on the first run's output
    assert summary["etl_from"] == str(tmp / "runs" / "it" / "transformed")
    assert not (tmp / "runs" / "worse" / "transformed").exists()
    assert repository.served_version(repo, "recsys") == served_before
    assert repository.list_versions(repo, "recsys") == versions_before
    saved = json.loads((tmp / "runs" / "worse" / "gate.json").read_text())
    assert saved["promote"] is False and saved["metric"] == "auc"
