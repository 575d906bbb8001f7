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
MAX_ROWS = 500


@pytest.fixture(scope="module")
def served(trained, tmp_path_factory):
    import nvtabular as nvt

    tmp = tmp_path_factory.mktemp("served")
    rows = trained.valid_rows(64)
    exp = export.export_ensemble(trained.etl.workflow_dir, trained.model.model_dir, rows, "click",
                                 tmp / "staged", "recsys", 1, max_request_rows=MAX_ROWS)
    repo = tmp / "model_repository"
    repository.publish(exp.version_dir, exp.config_path, repo, "recsys")
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


def _bad(server, mutate):
    """Send a request built from good rows and then broken by ``mutate``; return Triton's error."""
    _, rows, _ = server
    srv = server[0]
    with RecsysClient(srv.http_url, "http") as client:
        arrays = client.to_arrays(rows.head(3))
        mutate(arrays)
        with pytest.raises(InferenceServerException) as err:
            client.infer_arrays(arrays)
    return str(err.value)


@pytest.mark.parametrize("case, mutate, expected", [
    ("unknown input name", lambda a: a.update(foo=np.array([1, 2, 3])),
     r"expected 9 inputs but got 10 .*Got input\(s\) \['foo'"),
    ("missing input", lambda a: a.pop("device"), r"missing required input\(s\) \['device'\]"),
    ("wrong dtype", lambda a: a.update(user_id=a["user_id"].astype(np.float32)),
     r"inference input 'user_id' data-type is 'FP32', but model 'recsys' expects 'INT64'"),
    ("wrong shape", lambda a: a.update(user_age=np.ones((3, 2))),
     r"unexpected shape for input 'user_age' for model 'recsys'. Expected \[-1\], got \[3,2\]"),
    ("row counts differ", lambda a: a.update(item_id=a["item_id"][:2]), r"bad request: inputs have different row counts"),
    ("bad list offsets", lambda a: a.update(item_tags__offsets=a["item_tags__offsets"][::-1].copy()),
     r"bad request: input 'item_tags__offsets' must start at 0"),
    ("empty batch", lambda a: [a.update({k: (v[:1] if k.endswith("__offsets") else v[:0])}) for k, v in list(a.items())],
     r"bad request: empty batch"),
])
def test_bad_requests_get_a_clear_error_and_the_server_keeps_answering(served, case, mutate, expected):
    server, rows, offline = served
    import re

    msg = _bad(served, mutate)
    assert re.search(expected, msg), f"{case}: {msg}"
    assert "Traceback" not in msg
    with RecsysClient(server.grpc_url, "grpc") as client:
        np.testing.assert_allclose(client.predict(rows.head(4)), offline[:4], atol=1e-5, rtol=0)


def test_very_large_batch_is_refused_clearly_and_a_batch_at_the_limit_is_served(served):
    server, rows, _ = served
    big = pd.concat([rows] * (MAX_ROWS // len(rows) + 1), ignore_index=True)
    with RecsysClient(server.grpc_url, "grpc") as client:
        with pytest.raises(InferenceServerException, match=rf"batch of {len(big)} rows exceeds the limit of {MAX_ROWS}"):
            client.predict(big)
        assert len(client.predict(big.head(MAX_ROWS))) == MAX_ROWS


def test_missing_continuous_values_are_filled_as_in_training(served, trained):
    import nvtabular as nvt

    server, rows, _ = served
    holes = rows.head(4).copy()
    holes.loc[[0, 2], "user_age"] = np.nan
    holes.loc[1, "item_price"] = None
    offline = export.offline_scores(nvt.Workflow.load(str(trained.etl.workflow_dir)), trained.model.model_dir, holes, "click")
    with RecsysClient(server.http_url, "http") as client:
        got = client.predict(holes)
    assert np.isfinite(got).all()
    np.testing.assert_allclose(got, offline, atol=1e-5, rtol=0)
