"""A real tritonserver process (from the nvidia-pytriton wheel) serving the exported ensemble."""
import numpy as np
import pandas as pd
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from pipeline_lib import export, repository
from pipeline_lib.client import RecsysClient, RequestError
from pipeline_lib.serving import ServerError, TritonServer
from pipeline_lib.smoke import free_port, smoke_test

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def served(trained, tmp_path_factory):
    import nvtabular as nvt

    tmp = tmp_path_factory.mktemp("served")
    rows = trained.valid_rows(64)
    exp = export.export_ensemble(trained.etl.workflow_dir, trained.model.model_dir, rows, "click",
                                 tmp / "staged", "recsys", 1)
    repo = tmp / "model_repository"
    repository.publish(exp.version_dir, exp.config_path, repo, "recsys", 1)
    repository.promote(repo, "recsys", 1)
    offline = export.offline_scores(nvt.Workflow.load(str(trained.etl.workflow_dir)), trained.model.model_dir, rows, "click")
    server = TritonServer(repo, http_port=free_port(), grpc_port=free_port(), metrics_port=free_port(),
                          log_file=tmp / "triton.log")
    server.start(timeout_s=240, models=["recsys"])
    yield server, rows, offline
    server.stop()


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_served_scores_equal_offline(served, protocol):
    server, rows, offline = served
    url = server.http_url if protocol == "http" else server.grpc_url
    with RecsysClient(url, protocol) as client:
        got = client.predict(rows)
        one = client.predict(rows.head(1))
    assert got.shape == (len(rows),)
    np.testing.assert_allclose(got, offline, atol=1e-5, rtol=0)
    np.testing.assert_allclose(one, offline[:1], atol=1e-5, rtol=0)


def test_rows_as_dicts_with_unseen_categories(served):
    server, rows, offline = served
    records = rows.head(2).to_dict(orient="records")
    records[1] = {**records[1], "user_country": "ZZ-never-seen", "item_tags": [424242]}
    with RecsysClient(server.http_url, "http") as client:
        got = client.predict(records)
    assert got[0] == pytest.approx(offline[0], abs=1e-5)
    assert 0.0 < got[1] < 1.0 and np.isfinite(got[1])


def test_missing_field_is_a_clear_client_error(served):
    server, rows, _ = served
    with RecsysClient(server.http_url, "http") as client:
        with pytest.raises(RequestError, match=r"missing field\(s\) \['device'\]"):
            client.predict(rows.drop(columns=["device"]))


def test_bad_request_gets_an_error_and_the_server_keeps_answering(served):
    server, rows, offline = served
    with httpclient.InferenceServerClient(server.http_url) as c:
        bad = httpclient.InferInput("user_id", [2], "FP32")
        bad.set_data_from_numpy(np.array([1.0, 2.0], dtype=np.float32))
        with pytest.raises(InferenceServerException):
            c.infer("recsys", [bad])
        assert c.is_server_live() and c.is_model_ready("recsys")
    with RecsysClient(server.grpc_url, "grpc") as client:
        np.testing.assert_allclose(client.predict(rows.head(4)), offline[:4], atol=1e-5, rtol=0)


def test_smoke_test_gate_fails_on_mismatch(trained, served, tmp_path):
    """The pipeline's gate raises when served scores differ from the offline reference."""
    server, rows, offline = served
    from pipeline_lib.smoke import ServingMismatch

    repo = server.model_repository
    with pytest.raises(ServingMismatch, match="differ from offline"):
        smoke_test(repo, "recsys", rows.head(4), offline[:4] + 0.01, 1e-5, tmp_path)
    assert (tmp_path / "smoke.json").exists()


def test_server_start_errors_are_reported(tmp_path):
    with pytest.raises(ServerError, match="model repository not found"):
        TritonServer(tmp_path / "missing").start()
    broken = tmp_path / "repo" / "recsys"
    (broken / "1").mkdir(parents=True)
    (broken / "config.pbtxt").write_text('backend: "python"\n')
    (broken / "1" / "model.py").write_text("raise ImportError('boom')\n")
    server = TritonServer(tmp_path / "repo", http_port=free_port(), grpc_port=free_port(), metrics_port=free_port())
    with pytest.raises(ServerError, match="tritonserver exited|not ready"):
        server.start(timeout_s=120, models=["recsys"])
    assert server.process is None
