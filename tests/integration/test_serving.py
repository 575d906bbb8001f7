"""A real tritonserver process (from the nvidia-pytriton wheel) serving the exported ensemble."""
import json
import re
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from pipeline_lib.export import ranking as export
from pipeline_lib.export.compiled_version import load_events
from pipeline_lib.serving import repository
from pipeline_lib.serving.client import BadRequestError, RecsysClient, RequestError
from pipeline_lib.serving.server import ServerError, TritonServer
from pipeline_lib.release.smoke import smoke_test
from tests.support import start_redis

pytestmark = pytest.mark.integration
MAX_ROWS = 500
AGE_RANGE = {"user_age": (0.0, 150.0)}  # as columns.features[].min/max declare it
MAX_STRING, MAX_LIST = 64, 200  # export.max_string_bytes, export.max_list_length
# what tritonclient's InferenceServerException.status() says for an invalid-argument answer
INVALID = {"http": "400", "grpc": "StatusCode.INVALID_ARGUMENT"}


@pytest.fixture(scope="module")
def served(trained, tmp_path_factory):
    import nvtabular as nvt

    tmp = tmp_path_factory.mktemp("served")
    rows = trained.valid_rows(64)
    exp = export.export_ensemble(trained.etl.workflow_dir, trained.model.model_dir, rows, "click",
                                 tmp / "staged", "recsys", 1,
                                 export.ExportOptions(max_request_rows=MAX_ROWS, input_ranges=AGE_RANGE,
                                                      max_string_bytes=MAX_STRING, max_list_length=MAX_LIST))
    repo = tmp / "model_repository"
    repository.publish(exp.version_dir, exp.config_path, repo, "recsys")
    repository.promote(repo, "recsys", 1)
    offline = export.offline_scores(nvt.Workflow.load(str(trained.etl.workflow_dir)), trained.model.model_dir, rows, "click")
    server = TritonServer.on_free_ports(repo, log_file=tmp / "triton.log")
    server.start(timeout_s=240, models=["recsys"])
    yield server, rows, offline
    server.stop()


def test_the_default_version_loads_without_tensorflow_nvtabular_or_merlin(served):
    """The default export (compiled transform + compiled model) is loaded by the served model alone: its
    own log line, written from inside Triton's python stub, names no heavy module; one stub process only
    (no auto-complete stub importing model.py first)."""
    server, rows, offline = served
    with RecsysClient(server.grpc_url, "grpc") as client:
        np.testing.assert_allclose(client.predict(rows.head(8)), offline[:8], atol=1e-5, rtol=0)
    text = server.log_file.read_text(errors="replace")
    events = load_events(text)
    assert [e["path"] for e in events] == ["compiled"], events
    assert events[0]["heavy_modules"] == [] and events[0]["seconds"] < 10
    assert text.count("TRITONBACKEND_ModelInstanceInitialize") == 1


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
    from pipeline_lib.release.smoke import ServingMismatch

    repo = server.model_repository
    with pytest.raises(ServingMismatch, match="differ from offline"):
        smoke_test(repo, "recsys", rows.head(4), offline[:4] + 0.01, 1e-5, tmp_path)
    assert (tmp_path / "smoke.json").exists()


def test_server_start_errors_are_reported(tmp_path):
    with pytest.raises(ServerError, match="model repository not found"):
        TritonServer.on_free_ports(tmp_path / "missing").start()
    broken = tmp_path / "repo" / "recsys"
    (broken / "1").mkdir(parents=True)
    (broken / "config.pbtxt").write_text('backend: "python"\n')
    (broken / "1" / "model.py").write_text("raise ImportError('boom')\n")
    server = TritonServer.on_free_ports(tmp_path / "repo")
    with pytest.raises(ServerError, match="tritonserver exited|not ready"):
        server.start(timeout_s=120, models=["recsys"])
    assert server.process is None


@pytest.fixture
def busy_port():
    """A port held by another listener, as when a second server or a test run took it first."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("endpoint", ["http_port", "grpc_port", "metrics_port"])
def test_a_taken_port_is_reported_naming_the_clash(tmp_path, busy_port, endpoint):
    """Triton exits on a taken gRPC port but keeps running without a taken HTTP or metrics
    endpoint; either way start() fails at once with the port in the message, and no process is left."""
    from pipeline_lib.serving.server import PortClash, free_ports

    ports = dict(zip(["http_port", "grpc_port", "metrics_port"], free_ports(3)))
    ports[endpoint] = busy_port
    (tmp_path / "repo").mkdir()
    server = TritonServer(tmp_path / "repo", log_file=tmp_path / "triton.log", **ports)
    with pytest.raises(PortClash) as err:
        server.start(timeout_s=60)
    assert f"127.0.0.1:{busy_port}' already in use" in str(err.value)
    assert server.process is None


def test_auto_ports_retry_when_a_picked_port_is_taken(tmp_path, busy_port, monkeypatch):
    """The race the CI run hit: a picked port is taken before Triton binds it. The first pick is
    forced to contain the taken port; start() must come up on fresh ports."""
    from pipeline_lib.serving import server as serving

    real, picks = serving.free_ports, []

    def first_pick_clashes(n, host="127.0.0.1"):
        got = real(n, host)
        if not picks:
            got[1] = busy_port  # the gRPC port: Triton exits on it
        picks.append(got)
        return got

    monkeypatch.setattr(serving, "free_ports", first_pick_clashes)
    (tmp_path / "repo").mkdir()
    server = TritonServer.on_free_ports(tmp_path / "repo", log_file=tmp_path / "triton.log")
    with server.start(timeout_s=120):
        assert len(picks) == 2 and server.grpc_port != busy_port
        assert [server.http_port, server.grpc_port, server.metrics_port] == picks[1]
        with httpclient.InferenceServerClient(server.http_url) as c:
            assert c.is_server_ready()
    assert "already in use" in (tmp_path / "triton.log").read_text()


def _bad(server, mutate, protocol="http"):
    """Send a request built from good rows and then broken by ``mutate``; return Triton's error."""
    _, rows, _ = server
    srv = server[0]
    with RecsysClient(srv.http_url if protocol == "http" else srv.grpc_url, protocol) as client:
        arrays = client.to_arrays(rows.head(3))
        mutate(arrays)
        with pytest.raises(InferenceServerException) as err:
            client.infer_arrays(arrays)
    return err.value


@pytest.mark.parametrize("protocol", ["http", "grpc"])
@pytest.mark.parametrize("case, mutate, expected", [
    ("1e40 overflows float32", lambda a: a.update(item_price=np.array([1.0, 1e40, 2.0]).astype(a["item_price"].dtype)),
     r"input 'item_price' (row 1: 1e\+40 is too large for the model's float32|has 1 non-finite value)"),
    ("outside the configured range", lambda a: a.update(user_age=np.array([30.0, 31.0, 999.0]).astype(a["user_age"].dtype)),
     r"input 'user_age' row 2: 999.0 is outside the range \[0.0, 150.0\]"),
    ("string too long", lambda a: a.update(user_country=np.array([b"x" * (MAX_STRING + 1)] * 3, dtype=object)),
     rf"input 'user_country' row 0 is {MAX_STRING + 1} bytes long; the limit is {MAX_STRING} bytes"),
    ("list too long", lambda a: a.update(item_tags__values=np.ones(MAX_LIST + 1, dtype=a["item_tags__values"].dtype),
                                         item_tags__offsets=np.array([0, 0, 0, MAX_LIST + 1], dtype=np.int32)),
     rf"input 'item_tags' row 2 has {MAX_LIST + 1} values; the limit is {MAX_LIST} per row"),
])
def test_values_the_model_cannot_score_are_refused_per_row(served, case, mutate, expected, protocol):
    """A finite value float32 cannot hold (scored NaN before), a value outside the config's min/max, an
    over-long string or list: invalid-argument naming the input and row, never a 200 with a NaN score."""
    import re

    err = _bad(served, mutate, protocol)
    assert re.search(expected, err.message()), f"{case}: {err.message()}"
    assert err.status() == INVALID[protocol] and isinstance(err, BadRequestError)


def test_every_answered_score_is_finite_even_for_extreme_in_range_values(served):
    """Values float32 holds but the model may overflow on (3e38 in a continuous input, no range
    declared): either finite scores or a clear invalid-argument answer -- never a NaN or inf score."""
    server, rows, offline = served
    extreme = rows.head(4).copy()
    extreme["item_price"] = [3.0e38, -3.0e38, 1.0e30, 5.0]
    with RecsysClient(server.http_url, "http") as client:
        try:
            got = client.predict(extreme)
        except BadRequestError as exc:
            assert "non-finite" in str(exc) and exc.status() == "400", str(exc)
        else:
            assert np.isfinite(got).all(), got
        np.testing.assert_allclose(client.predict(rows.head(4)), offline[:4], atol=1e-5, rtol=0)


def test_bodies_triton_cannot_parse_are_refused_before_the_model_and_the_server_keeps_answering(served):
    """Malformed JSON, ``null``, a string where a number belongs, ``data`` not matching ``shape``: Triton's
    HTTP front-end refuses them before any model runs, with a message naming the JSON field. Triton 2.51
    answers them with status 500 (upstream server#8762; docs/serving.md): the status is recorded here, so
    an upgrade that answers 400 shows up. gRPC messages are typed: none of these can be sent there."""
    import json

    import requests

    server, rows, offline = served
    url = f"http://{server.http_url}/v2/models/recsys/infer"
    good = {"name": "user_age", "shape": [1], "datatype": "FP64", "data": [30.0]}
    bodies = {
        "malformed": ('{"inputs": [', r"failed to parse the request JSON buffer"),
        "null body": ("null", r"Unable to parse 'inputs'"),
        "null data": (json.dumps({"inputs": [{**good, "data": None}]}), r"Unable to parse 'data'"),
        "string for a number": (json.dumps({"inputs": [{**good, "data": ["thirty"]}]}), r"Unable to parse 'data'"),
        "shape mismatch": (json.dumps({"inputs": [{**good, "shape": [3]}]}), r"Unable to parse 'data'"),
    }
    for case, (body, expected) in bodies.items():
        r = requests.post(url, data=body, headers={"Content-Type": "application/json"}, timeout=30)
        assert r.status_code in (400, 500) and r.status_code != 200, (case, r.status_code, r.text)
        assert re.search(expected, r.json()["error"]), (case, r.text)
    with RecsysClient(server.grpc_url, "grpc") as client:
        np.testing.assert_allclose(client.predict(rows.head(4)), offline[:4], atol=1e-5, rtol=0)


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
    ("infinite continuous value", lambda a: a.update(user_age=np.where(np.arange(len(a["user_age"])) == 1, np.inf,
                                                                       a["user_age"]).astype(a["user_age"].dtype)),
     r"bad request: input 'user_age' has 1 non-finite value\(s\) \(e.g. row 1: inf\)"),
    ("-inf continuous value", lambda a: a.update(item_price=np.full_like(a["item_price"], -np.inf)),
     r"bad request: input 'item_price' has 3 non-finite value\(s\)"),
])
@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_bad_requests_get_a_clear_error_and_the_server_keeps_answering(served, case, mutate, expected, protocol):
    """Triton's own checks and the model's request checks alike answer invalid-argument (HTTP 400,
    gRPC INVALID_ARGUMENT) with the message naming the field; the client raises BadRequestError."""
    server, rows, offline = served
    import re

    err = _bad(served, mutate, protocol)
    msg = err.message()
    assert re.search(expected, msg), f"{case}: {msg}"
    assert "Traceback" not in msg
    assert err.status() == INVALID[protocol], f"{case}: {err.status()} {msg}"
    assert isinstance(err, BadRequestError) and isinstance(err, RequestError)
    with RecsysClient(server.grpc_url, "grpc") as client:
        np.testing.assert_allclose(client.predict(rows.head(4)), offline[:4], atol=1e-5, rtol=0)


def test_very_large_batch_is_refused_clearly_and_a_batch_at_the_limit_is_served(served):
    server, rows, _ = served
    big = pd.concat([rows] * (MAX_ROWS // len(rows) + 1), ignore_index=True)
    for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
        with RecsysClient(url, protocol) as client:
            with pytest.raises(BadRequestError, match=rf"batch of {len(big)} rows exceeds the limit of {MAX_ROWS}") as err:
                client.predict(big)
            assert err.value.status() == INVALID[protocol]
            assert len(client.predict(big.head(MAX_ROWS))) == MAX_ROWS


@pytest.mark.parametrize("protocol", ["http", "grpc"])
def test_a_bad_request_is_a_client_error_on_the_wire(served, protocol):
    """Plain tritonclient, no RecsysClient: the model's own check (row counts) reaches the client as
    HTTP 400 / gRPC INVALID_ARGUMENT, not INTERNAL / 500, with the model's message."""
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import np_to_triton_dtype

    server, rows, _ = served
    with RecsysClient(server.http_url, "http") as cl:
        arrays = cl.to_arrays(rows.head(3))
    arrays["user_id"] = arrays["user_id"][:2]
    tc, url = (httpclient, server.http_url) if protocol == "http" else (grpcclient, server.grpc_url)
    inputs = []
    for name, arr in arrays.items():
        inp = tc.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
        inp.set_data_from_numpy(arr)
        inputs.append(inp)
    c = tc.InferenceServerClient(url)
    try:
        with pytest.raises(InferenceServerException) as err:
            c.infer("recsys", inputs)
    finally:
        c.close()
    assert err.value.status() == INVALID[protocol]
    assert err.value.message().startswith("bad request: inputs have different row counts: ")
    assert "user_id=2" in err.value.message()


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


# --- dynamic batching (serving.dynamic_batching) ---------------------------------------------------


@pytest.fixture(scope="module")
def served_batched(trained, tmp_path_factory):
    """The same model exported with Triton's dynamic batcher on, and a queue delay long enough that
    concurrent requests are really executed together; with the compiled model off, so the SavedModel
    and the full ensemble (TensorFlow, NVTabular) serve it, loaded at start."""
    import nvtabular as nvt

    from pipeline_lib.config import DynamicBatchingConfig

    tmp = tmp_path_factory.mktemp("served_batched")
    rows = trained.valid_rows(200)
    db = DynamicBatchingConfig(enabled=True, max_batch_size=8, max_queue_delay_microseconds=20_000)
    exp = export.export_ensemble(trained.etl.workflow_dir, trained.model.model_dir, rows.head(64), "click",
                                 tmp / "staged", "recsys", 1,
                                 export.ExportOptions(max_request_rows=MAX_ROWS, dynamic_batching=db,
                                                      compiled_model="off"))
    repo = tmp / "model_repository"
    repository.publish(exp.version_dir, exp.config_path, repo, "recsys")
    repository.promote(repo, "recsys", 1)
    rows = rows.copy()
    rows.loc[::5, "item_tags"] = pd.Series([[]] * len(rows.loc[::5]), index=rows.index[::5])  # empty lists too
    offline = export.offline_scores(nvt.Workflow.load(str(trained.etl.workflow_dir)), trained.model.model_dir, rows, "click")
    server = TritonServer.on_free_ports(repo, log_file=tmp / "triton.log")
    server.start(timeout_s=240, models=["recsys"])
    yield server, rows, offline
    server.stop()


def test_dynamic_batching_config_is_written(served_batched):
    server, _, _ = served_batched
    events = load_events(server.log_file.read_text(errors="replace"))
    assert [e["path"] for e in events] == ["full"] and "tensorflow" in events[0]["heavy_modules"], events
    cfg = (server.model_repository / "recsys" / "config.pbtxt").read_text()
    assert "max_batch_size: 8" in cfg and "max_queue_delay_microseconds: 20000" in cfg
    assert cfg.count("allow_ragged_batch: true") == cfg.count("input {")


def test_dynamic_batching_concurrent_clients_get_their_own_rows(served_batched):
    """8 clients at once, each request a different slice (1-7 rows, list lengths 0-n): every answer
    equals the offline scores of exactly its own rows, and Triton executed requests together."""
    import threading

    server, rows, offline = served_batched
    with httpclient.InferenceServerClient(server.http_url) as c:
        before = c.get_inference_statistics("recsys")["model_stats"][0]
    failures, answered = [], []

    def client(k: int) -> None:
        rng = np.random.default_rng(k)
        proto, url = ("grpc", server.grpc_url) if k % 2 else ("http", server.http_url)
        try:
            with RecsysClient(url, proto) as cl:
                for _ in range(12):
                    n = int(rng.integers(1, 8))
                    start = int(rng.integers(0, len(rows) - n))
                    got = cl.predict(rows.iloc[start:start + n])
                    answered.append(n)
                    if got.shape != (n,) or not np.allclose(got, offline[start:start + n], atol=1e-5, rtol=0):
                        failures.append((k, start, n, got, offline[start:start + n]))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            failures.append((k, repr(exc)))

    threads = [threading.Thread(target=client, args=(k,)) for k in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not failures, failures[:2]
    assert len(answered) == 96
    with httpclient.InferenceServerClient(server.http_url) as c:
        after = c.get_inference_statistics("recsys")["model_stats"][0]
    requests = int(after["inference_count"]) - int(before["inference_count"])
    executions = int(after["execution_count"]) - int(before["execution_count"])
    assert requests == 96
    assert executions < requests, f"no request was batched with another ({executions} executions)"


def test_dynamic_batching_a_bad_request_fails_alone(served_batched):
    """A malformed request queued together with good ones gets its own clear error; the others are served."""
    import threading

    server, rows, offline = served_batched
    errors, good = [], []

    def bad() -> None:
        with RecsysClient(server.http_url, "http") as cl:
            arrays = cl.to_arrays(rows.head(3))
            arrays["item_id"] = arrays["item_id"][:2]
            for _ in range(5):
                try:
                    cl.infer_arrays(arrays)
                except BadRequestError as exc:
                    errors.append(str(exc))

    def ok(k: int) -> None:
        try:
            with RecsysClient(server.grpc_url, "grpc") as cl:
                for _ in range(5):
                    good.append(bool(np.allclose(cl.predict(rows.iloc[k:k + 4]), offline[k:k + 4], atol=1e-5, rtol=0)))
        except Exception as exc:  # noqa: BLE001 - reported by the assertion below
            good.append(repr(exc))

    threads = [threading.Thread(target=bad)] + [threading.Thread(target=ok, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(errors) == 5 and all(e.startswith("[400] bad request: inputs have different row counts")
                                    for e in errors), errors[:1]
    assert len(good) == 20 and all(g is True for g in good), good


def test_dynamic_batching_request_with_two_batch_entries_is_refused_clearly(served_batched):
    """A request is one batch entry ([1, rows]); a [2, ...] request gets a clear error, not wrong scores."""
    from tritonclient.utils import np_to_triton_dtype

    server, rows, _ = served_batched
    with RecsysClient(server.http_url, "http") as cl:
        arrays = cl.to_arrays(rows.head(2))
    inputs = []
    for name, arr in arrays.items():
        inp = httpclient.InferInput(name, [2, len(arr)], np_to_triton_dtype(arr.dtype))
        inp.set_data_from_numpy(np.stack([arr, arr]))
        inputs.append(inp)
    with httpclient.InferenceServerClient(server.http_url) as c:
        with pytest.raises(InferenceServerException, match=r"bad request: input '\w+' has shape \[2, \d+\]; with dynamic batching") as err:
            c.infer("recsys", inputs)
    assert err.value.status() == "400"



def _shm_regions(server) -> dict:
    """The system shared-memory regions registered with the server: name -> key."""
    with httpclient.InferenceServerClient(server.http_url) as c:
        return {r["name"]: r["key"] for r in c.get_system_shared_memory_status()}


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_shared_memory_client_returns_the_default_clients_scores(served, protocol):
    """RecsysClient(shared_memory=True): the same scores and version as the default client, bit for bit,
    for one row, the parity rows and a request too big for its first regions (replaced by bigger ones)."""
    server, rows, offline = served
    url = server.http_url if protocol == "http" else server.grpc_url
    big = rows.sample(MAX_ROWS, replace=True, random_state=0).reset_index(drop=True)
    big["item_tags"] = [list(range(100)) for _ in range(len(big))]  # 400 kB of list values
    with RecsysClient(url, protocol) as plain, RecsysClient(url, protocol, shared_memory=True) as fast:
        for request in (rows.head(1), rows, big, rows):
            (want, want_version), (got, got_version) = plain.infer(request), fast.infer(request)
            assert got_version == want_version and np.array_equal(got, want)
        np.testing.assert_allclose(fast.predict(rows), offline, atol=1e-5, rtol=0)
        regions = fast.shared_memory_regions
        assert len(regions) == 2 and min(size for _, size in regions.values()) >= 1 << 16
        assert {n: k for n, (k, _) in regions.items()}.items() <= _shm_regions(server).items()


def test_shared_memory_client_bad_request_is_a_client_error_naming_the_field(served):
    server, rows, offline = served
    with RecsysClient(server.grpc_url, "grpc", shared_memory=True) as client:
        with pytest.raises(RequestError, match=r"missing field\(s\) \['device'\]"):
            client.predict(rows.drop(columns=["device"]))
        with pytest.raises(RequestError, match=r"field 'item_tags' row 1: expected a list, got str 'x'"):
            client.predict(rows.head(2).assign(item_tags=[[1], "x"]))
        bad = rows.head(3).copy()
        bad.loc[1, "user_age"] = np.inf
        with pytest.raises(BadRequestError, match="input 'user_age' has 1 non-finite value") as err:
            client.predict(bad)
        assert err.value.status() == INVALID["grpc"]
        np.testing.assert_allclose(client.predict(rows.head(4)), offline[:4], atol=1e-5, rtol=0)


def test_shared_memory_regions_are_released_on_close(served):
    """close() unregisters both regions from the server and removes them from /dev/shm."""
    server, rows, _ = served
    client = RecsysClient(server.grpc_url, "grpc", shared_memory=True)
    assert client.shared_memory_regions == {}  # registered on the first call
    client.predict(rows.head(2))
    regions = client.shared_memory_regions
    assert len(regions) == 2 and all(Path("/dev/shm" + key).exists() for key, _ in regions.values())
    assert set(regions) <= set(_shm_regions(server))
    client.close()
    assert client.shared_memory_regions == {} and not set(regions) & set(_shm_regions(server))
    assert not any(Path("/dev/shm" + key).exists() for key, _ in regions.values())


def test_dynamic_batching_shared_memory_client_gets_its_own_rows(served_batched):
    """With the dynamic batcher a request is one batch entry ([1, rows], scores [1, rows, 1]): the
    shared-memory client sizes its output region for that and returns the default client's scores."""
    server, rows, offline = served_batched
    with RecsysClient(server.grpc_url, "grpc") as plain, RecsysClient(server.grpc_url, "grpc", shared_memory=True) as fast:
        for request in (rows.head(1), rows.head(37)):
            got = fast.predict(request)
            assert np.array_equal(got, plain.predict(request))
    np.testing.assert_allclose(got, offline[:37], atol=1e-5, rtol=0)


# -- ranking by user id: user_id + item_id, every other column from the feature store ------------------------


UID_BATCH_DELAY_US = 100_000  # recsys_uid_batched: long enough that requests sent together are queued together


def _with_dynamic_batching(config: Path, max_batch_size: int, delay_us: int) -> None:
    """A version config with Triton's dynamic batcher on, as ``export.install_serving_model`` writes it for
    ``serving.dynamic_batching`` (every input a ragged-batch input; one request = one batch entry)."""
    import tritonclient.grpc.model_config_pb2 as mc
    from google.protobuf import text_format

    cfg = text_format.Parse(config.read_text(), mc.ModelConfig())
    cfg.max_batch_size = max_batch_size
    for inp in cfg.input:
        inp.allow_ragged_batch = True
    cfg.dynamic_batching.max_queue_delay_microseconds = delay_us
    config.write_text(text_format.MessageToString(cfg))


@pytest.fixture(scope="module")
def ranking_redis():
    """A real redis-server for ``recsys_uid_redis`` (tests.support.start_redis); None when it is not installed."""
    started = start_redis()
    yield started
    if started is not None and started[0].poll() is None:
        started[0].terminate()
        started[0].wait(timeout=10)


@pytest.fixture(scope="module")
def served_by_id(trained, served, ranking_redis, tmp_path_factory):
    """The served version again, with a feature snapshot of the training split and user-id requests in its config,
    as ``recsys_uid`` (its SQLite store filled, as the flow's features stage does), ``recsys_uid_batched`` (the same
    with Triton's dynamic batcher on, reading the same store), ``recsys_nostore`` (its feature_store.json names a
    store that does not exist) and, where redis-server is installed, ``recsys_uid_redis`` (its store a real Redis,
    ``ranking_redis``): one more Triton serving them."""
    import shutil

    import nvtabular as nvt

    from pipeline_lib.features import serving as feature_serving
    from pipeline_lib.features import snapshot, store

    server, _, _ = served
    tmp = tmp_path_factory.mktemp("served_by_id")
    cols = trained.cfg.columns
    vdir = tmp / "staged" / "1"
    shutil.copytree(server.model_repository / "recsys" / "1", vdir)
    art = vdir / export.ENSEMBLE_SUBDIR
    items = [cols.item_id] + [f.name for f in cols.features if f.side.value == "item"]
    snapshot.write_snapshot(art, pd.read_parquet(trained.split.train),
                            [c for c in cols.serving_columns if c not in items], items, cols, None, 0)
    config = vdir / repository.VERSION_CONFIG
    feature_serving.allow_user_id_requests(config, cols.user_id, (cols.item_id,))
    repo = tmp / "model_repository"
    text = config.read_text()
    names = ["recsys_uid", "recsys_nostore", "recsys_uid_batched"] + (["recsys_uid_redis"] if ranking_redis else [])
    for name in names:
        config.write_text(text.replace('name: "recsys"', f'name: "{name}"', 1))
        if name == "recsys_uid_batched":  # as export_ensemble writes serving.dynamic_batching, then user-id inputs
            _with_dynamic_batching(config, max_batch_size=8, delay_us=UID_BATCH_DELAY_US)
        repository.publish(vdir, config, repo, name)
        repository.promote(repo, name, 1)
    settings = store.StoreSettings(tmp / "feature_store" / "recsys_uid")
    store.materialize(settings, repo / "recsys_uid" / "1" / export.ENSEMBLE_SUBDIR, 1)
    store.write_pointer(repo / "recsys_uid", settings)
    store.write_pointer(repo / "recsys_uid_batched", settings)
    if ranking_redis:
        redis = store.StoreSettings(tmp / "redis_fs" / "recsys_uid_redis", "redis", f"127.0.0.1:{ranking_redis[1]}")
        store.materialize(redis, repo / "recsys_uid_redis" / "1" / export.ENSEMBLE_SUBDIR, 1)
        store.write_pointer(repo / "recsys_uid_redis", redis)
    store.write_pointer(repo / "recsys_nostore", store.StoreSettings(tmp / "feature_store" / "never_filled"))
    workflow = nvt.Workflow.load(str(trained.etl.workflow_dir))

    def offline(users: list, item_ids: list) -> np.ndarray:
        rows = snapshot.offline_pairs(art, users, item_ids)[cols.serving_columns]
        return export.offline_scores(workflow, trained.model.model_dir, rows, "click")

    by_id = TritonServer.on_free_ports(repo, log_file=tmp / "triton.log")
    by_id.start(timeout_s=240, models=names)
    yield by_id, art, offline
    by_id.stop()


def test_ranking_by_user_id_equals_the_offline_scores_of_the_stored_rows(served_by_id):
    """One user id for several item ids (broadcast) and one (user, item) pair per row: the scores equal the
    offline scores of the same pairs' full rows read from the training data, over HTTP and gRPC; an unknown user
    gets the cold-start row and ``cold_start``, an unknown item the item defaults; a full-feature request still
    answers as before (``cold_start`` false)."""
    from pipeline_lib.features import snapshot

    server, art, offline = served_by_id
    users, items = snapshot.stored_users(art, 3), snapshot.stored_items(art, 4)
    unknown_user, unknown_item = snapshot.unknown_id(users), snapshot.unknown_id(items)
    asked = items + [unknown_item]
    pair_users = users + [unknown_user]
    pair_items = items[:len(pair_users)]
    for url, protocol in ((server.http_url, "http"), (server.grpc_url, "grpc")):
        with RecsysClient(url, protocol, "recsys_uid") as c:
            scores, cold = c.predict_user([users[0]], asked, "user_id", "item_id")
            np.testing.assert_allclose(scores, offline([users[0]] * len(asked), asked), atol=1e-5, rtol=0)
            assert cold.tolist() == [False] * len(asked)
            scores, cold = c.predict_user(pair_users, pair_items, "user_id", "item_id")
            np.testing.assert_allclose(scores, offline(pair_users, pair_items), atol=1e-5, rtol=0)
            assert cold.tolist() == [False] * len(users) + [True] and np.isfinite(scores).all()
            full = snapshot.offline_pairs(art, users, items[:3])[c.raw_columns]
            np.testing.assert_allclose(c.predict(full), offline(users, items[:3]), atol=1e-5, rtol=0)


def test_ranking_by_user_id_bad_requests_name_the_field(served_by_id):
    server, _, _ = served_by_id
    with RecsysClient(server.grpc_url, "grpc", "recsys_uid") as c:
        with pytest.raises(BadRequestError, match="input 'user_id' has 2 values") as err:
            c.predict_user([1, 2], [1, 2, 3], "user_id", "item_id")
        assert err.value.status() == INVALID["grpc"]
    with httpclient.InferenceServerClient(server.http_url) as c:
        items = httpclient.InferInput("item_id", [2], "INT64")
        items.set_data_from_numpy(np.array([1, 2], dtype=np.int64))
        with pytest.raises(InferenceServerException, match="user_id") as err:
            c.infer("recsys_uid", [items])
        assert err.value.status() == "400"


def test_ranking_by_user_id_without_a_reachable_store_is_503_and_full_rows_still_answer(served_by_id):
    from pipeline_lib.features import snapshot

    server, art, offline = served_by_id
    users, items = snapshot.stored_users(art, 2), snapshot.stored_items(art, 2)
    with RecsysClient(server.http_url, "http", "recsys_nostore") as c:
        with pytest.raises(InferenceServerException, match="unavailable: feature store") as err:
            c.predict_user(users, items, "user_id", "item_id")
        assert err.value.status() == "503"
        full = snapshot.offline_pairs(art, users, items)[c.raw_columns]
        np.testing.assert_allclose(c.predict(full), offline(users, items), atol=1e-5, rtol=0)
    with RecsysClient(server.grpc_url, "grpc", "recsys_nostore") as c:
        with pytest.raises(InferenceServerException) as err:
            c.predict_user(users, items, "user_id", "item_id")
        assert "UNAVAILABLE" in str(err.value.status())
    # the supervisor's probe (required inputs only: a user-id request here) gets the model's own 503: the model
    # is alive, no restart (a restart cannot bring the store back; full-feature requests answer meanwhile)
    from pipeline_lib.serving.supervisor import probe

    assert probe(server.http_url, "recsys_nostore") is None


def _together(calls: list) -> list:
    """``calls`` (no-argument functions) started at the same moment, one thread each; -> their results (an
    exception's repr for a call that raised)."""
    import threading

    barrier, out = threading.Barrier(len(calls)), [None] * len(calls)

    def run(k: int) -> None:
        barrier.wait()
        try:
            out[k] = calls[k]()
        except Exception as exc:  # noqa: BLE001 - reported by the caller's assertion
            out[k] = repr(exc)

    threads = [threading.Thread(target=run, args=(k,)) for k in range(len(calls))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def _executions(server, model: str) -> tuple[int, int]:
    with httpclient.InferenceServerClient(server.http_url) as c:
        s = c.get_inference_statistics(model)["model_stats"][0]
    return int(s["inference_count"]), int(s["execution_count"])


def test_ranking_by_user_id_with_dynamic_batching_answers_each_request_as_offline(served_by_id):
    """A ranking version with Triton's dynamic batcher on, user-id and full-feature requests sent at the same
    moment by several clients (HTTP and gRPC): every answer equals the offline scores of its own pairs. Triton
    queues requests with the same set of inputs into one execution, and never puts a user-id request (optional
    inputs left out) in one execution with a full-feature request: its batcher only joins requests whose inputs
    match those of the request that opened the batch (docs/serving.md, "Ranking by user id")."""
    from pipeline_lib.features import snapshot

    server, art, offline = served_by_id
    users, items = snapshot.stored_users(art, 4), snapshot.stored_items(art, 6)
    with RecsysClient(server.grpc_url, "grpc", "recsys_uid_batched") as c:
        columns = c.raw_columns
    want = {u: offline([u] * len(items), items) for u in users}
    full = {u: snapshot.offline_pairs(art, [u] * len(items), items)[columns] for u in users}

    def client(k: int) -> RecsysClient:  # its own client in its own thread (the HTTP client is not thread-safe)
        return RecsysClient(server.http_url if k % 2 else server.grpc_url, "http" if k % 2 else "grpc",
                            "recsys_uid_batched")

    def by_id(k: int):
        def call():
            with client(k) as c:
                return c.predict_user([users[k]], items, "user_id", "item_id")[0]
        return call

    def by_rows(k: int):
        def call():
            with client(k) as c:
                return c.predict(full[users[k]])
        return call

    def rounds(calls: list, n: int) -> tuple[int, int]:
        """``n`` rounds of ``calls`` sent together, every answer checked; -> (requests, executions) Triton counted."""
        r0, e0 = _executions(server, "recsys_uid_batched")
        for _ in range(n):
            for (kind, k), got in zip(calls, _together([by_id(k) if kind == "id" else by_rows(k) for kind, k in calls])):
                assert not isinstance(got, str), (kind, got)
                np.testing.assert_allclose(got, want[users[k]], atol=1e-5, rtol=0, err_msg=kind)
        # Triton updates its statistics after a response is sent: wait (up to 5 s) until every request is counted,
        # so the last requests of one call are not counted in the next
        deadline = time.monotonic() + 5.0
        r1, e1 = _executions(server, "recsys_uid_batched")
        while r1 - r0 < n * len(calls) and time.monotonic() < deadline:
            time.sleep(0.05)
            r1, e1 = _executions(server, "recsys_uid_batched")
        return r1 - r0, e1 - e0

    same_id, same_full = rounds([("id", 0), ("id", 1)], 4), rounds([("rows", 0), ("rows", 1)], 4)
    mixed_pairs = rounds([("id", 0), ("rows", 1)], 4)
    mixed = rounds([("id", 0), ("rows", 1), ("id", 2), ("rows", 3)], 3)
    counts = {"same_id": same_id, "same_full": same_full, "mixed_pairs": mixed_pairs, "mixed": mixed}
    assert [n for n, _ in counts.values()] == [8, 8, 8, 12], counts
    assert same_id[1] < 8 and same_full[1] < 8, counts  # sent together, same inputs: queued into one execution
    assert mixed_pairs[1] == 8, counts  # a user-id and a full-feature request sent together: never one execution
    assert mixed[1] >= 6, counts  # at best the two of each kind joined, each round


def test_ranking_by_user_id_through_redis_equals_offline_and_a_stopped_redis_is_503(served_by_id, ranking_redis):
    """``recsys_uid_redis`` reads a real Redis online store: the same scores as the offline scores of the stored
    rows over gRPC and HTTP; with Redis stopped, user-id requests are UNAVAILABLE (HTTP 503) and full-feature
    requests still answer. Last in the file: it stops the module's Redis."""
    from pipeline_lib.features import snapshot

    if ranking_redis is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server; .ci/run installs it)")
    server, art, offline = served_by_id
    users, items = snapshot.stored_users(art, 3), snapshot.stored_items(art, 5)
    assert json.loads((server.model_repository / "recsys_uid_redis" / "feature_store.json").read_text())[
        "online_store"] == "redis"
    for url, protocol in ((server.grpc_url, "grpc"), (server.http_url, "http")):
        with RecsysClient(url, protocol, "recsys_uid_redis") as c:
            scores, cold = c.predict_user([users[1]], items, "user_id", "item_id")
            np.testing.assert_allclose(scores, offline([users[1]] * len(items), items), atol=1e-5, rtol=0)
            scores, cold = c.predict_user(users, items[:3], "user_id", "item_id")
            np.testing.assert_allclose(scores, offline(users, items[:3]), atol=1e-5, rtol=0)
            assert cold.tolist() == [False] * 3
    ranking_redis[0].terminate()
    ranking_redis[0].wait(timeout=10)
    with RecsysClient(server.http_url, "http", "recsys_uid_redis") as c:
        with pytest.raises(InferenceServerException, match="unavailable: feature store") as err:
            c.predict_user(users, items[:3], "user_id", "item_id")
        assert err.value.status() == "503"
        full = snapshot.offline_pairs(art, users, items[:3])[c.raw_columns]
        np.testing.assert_allclose(c.predict(full), offline(users, items[:3]), atol=1e-5, rtol=0)
