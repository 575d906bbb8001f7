"""Every ranking model type (tests/conftest.py `ranking_zoo`) exported once with the default options and served
by one real Triton (one model each); the model compiled to ONNX for serving (pipeline_lib/export/compiled_model.py):
verified equal to the SavedModel at export, falling back to the SavedModel with a reason, and served == offline."""
import json
import time

import numpy as np
import nvtabular as nvt
import pytest

from pipeline_lib.etl.fast_transform import tensors_from_columns
from pipeline_lib.export import compiled_model
from pipeline_lib.export.compiled_version import PLAN_FILE, CompiledPredictor, load_events
from pipeline_lib.export import ranking as export
from pipeline_lib.serving import repository
from pipeline_lib.serving.client import RecsysClient
from pipeline_lib.serving.server import TritonServer

pytestmark = pytest.mark.integration

ATOL = 1e-5
COMPILED = ["dlrm", "dcn"]  # the types the compiled model serves; deepfm falls back (below)


def _export(trained, model, tmp, rows, name: str = "recsys", **kw):
    return export.export_ensemble(trained.etl.workflow_dir, model.model_dir, rows, "click", tmp / "staged", name, 1,
                                  export.ExportOptions(atol=ATOL, **kw))


def _held_out(trained, n: int = 200):
    """Validation rows after the export's parity sample (the first 64)."""
    return trained.valid_rows(64 + n).iloc[64:].reset_index(drop=True)


def _model_inputs(direct, ensemble, raw) -> dict:
    """Raw rows -> the model's input tensors, through the version's own workflow op."""
    cols = export.raw_to_columns(raw[ensemble.input_schema.column_names])
    return tensors_from_columns(direct.wf_op.transform_columns(cols))


def _offline(trained, model, raw):
    return export.offline_scores(nvt.Workflow.load(str(trained.etl.workflow_dir)), model.model_dir, raw, "click")


def _events(server, at_least: int = 0, timeout_s: float = 10.0) -> list[dict]:
    """The server's load events so far, waiting up to ``timeout_s`` for ``at_least`` of them (a stub's log
    line may reach Triton's log file a moment after its answer)."""
    deadline = time.monotonic() + timeout_s
    while True:
        events = load_events(server.log_file.read_text(errors="replace"))
        if len(events) >= at_least or time.monotonic() > deadline:
            return events
        time.sleep(0.1)


@pytest.fixture(scope="module")
def zoo(trained, ranking_zoo, tmp_path_factory):
    """Each model type exported once (default options), published and promoted as model ``<type>`` of one repository."""
    tmp = tmp_path_factory.mktemp("zoo")
    repo = tmp / "model_repository"
    out = {}
    for kind, model in ranking_zoo.items():  # the models of test_ranking.py on this worker
        exp = _export(trained, model, tmp / kind, trained.valid_rows(64), name=kind)
        repository.publish(exp.version_dir, exp.config_path, repo, kind)
        repository.promote(repo, kind, 1)
        out[kind] = (model, exp)
    return repo, out


@pytest.fixture(scope="module")
def served(zoo):
    """One Triton serving every type, and the load events of its models at start (no request yet)."""
    repo, out = zoo
    server = TritonServer.on_free_ports(repo, log_file=repo.parent / "triton.log")
    server.start(timeout_s=300, models=list(out))
    yield server, _events(server, at_least=len(out))
    server.stop()


def test_every_model_type_is_served_like_offline(trained, zoo, served):
    _, out = zoo
    server, at_start = served
    rows = trained.valid_rows(32)
    for kind, (model, _) in out.items():
        offline = _offline(trained, model, rows)
        assert np.ptp(offline) > 0, kind
        with RecsysClient(server.grpc_url, "grpc", model_name=kind) as client:
            np.testing.assert_allclose(client.predict(rows), offline, atol=ATOL, rtol=0, err_msg=kind)
    # each model loaded once at start: the compiled version where it was written, else the full ensemble
    light = [json.loads((exp.version_dir / "run_info.json").read_text())["loads_without_tensorflow"]
             for _, exp in out.values()]
    assert sorted(e["path"] for e in at_start) == sorted("compiled" if x else "full" for x in light), at_start
    assert all(e["heavy_modules"] == [] for e in at_start if e["path"] == "compiled"), at_start


@pytest.mark.parametrize("kind", COMPILED)
def test_compiled_model_equals_savedmodel_on_held_out_rows(trained, zoo, kind):
    _, exp = zoo[1][kind]
    status = exp.compiled_model
    assert status["enabled"], status
    assert status["max_rows"] >= 1 and status["max_abs_diff"] <= ATOL
    assert status["timings"]["batch1"]["speedup"] > 1
    assert json.loads((exp.version_dir / "run_info.json").read_text())["compiled_model"] == status
    assert (exp.version_dir / "ensemble" / compiled_model.ONNX_FILE).is_file()

    ensemble = export.load_version(exp.version_dir)  # the exported copy, as the served model.py loads it
    direct = export.DirectPredictor.from_ensemble(ensemble)
    assert direct.tf_op.compiled is not None, f"{kind}: the compiled model was not loaded back"
    raw = _held_out(trained)
    batch = _model_inputs(direct, ensemble, raw)
    out = direct.tf_op.output_schema.column_names[0]
    want = direct.tf_op.savedmodel_tensors(batch)[out]
    np.testing.assert_allclose(direct.tf_op.compiled(batch)[out], want, atol=ATOL, rtol=0)
    for i in range(0, len(raw), 10):  # batch-1 requests: the path the compiled model serves
        one = _model_inputs(direct, ensemble, raw.iloc[[i]])
        got = direct.tf_op.predict_tensors(one)[out]
        assert got.shape == (1, 1)
        np.testing.assert_allclose(got, want[i:i + 1], atol=ATOL, rtol=0)


def test_a_compiled_model_that_differs_falls_back_and_says_why(trained):
    ensemble = export.build_ensemble(nvt.Workflow.load(str(trained.etl.workflow_dir)), trained.model.model_dir, "click")
    direct = export.DirectPredictor.from_ensemble(ensemble)
    tf_op = direct.tf_op
    cols = direct.wf_op.transform_columns(export.raw_to_columns(_held_out(trained, 50)[ensemble.input_schema.column_names]))
    signature = tf_op.model.signatures["serving_default"]
    dtypes = {k: v.dtype.as_numpy_dtype for k, v in signature.structured_input_signature[1].items()}

    def off_by_a_little(arrays):  # a "SavedModel" the compiled model does not reproduce
        return {k: v + 1e-3 for k, v in tf_op.savedmodel_tensors(arrays).items()}

    compiled, onnx_bytes, status = compiled_model.compile_and_verify(
        signature, dtypes, tf_op.output_schema.column_names, cols, off_by_a_little, ATOL)
    assert compiled is None and onnx_bytes is None
    assert status["enabled"] is False
    assert "max |compiled - SavedModel|" in status["reason"] and f"> {ATOL}" in status["reason"]
    assert tf_op.compiled is None  # never enabled: this op serves the SavedModel


def test_a_model_it_cannot_compile_falls_back_and_says_why(trained, zoo):
    """DeepFM's wide part one-hot counts categories (DenseCountSparseOutput), which tf2onnx cannot convert:
    the export records why and the SavedModel serves (the export's own parity checks pass; served in
    test_every_model_type_is_served_like_offline)."""
    model, exp = zoo[1]["deepfm"]
    assert exp.compiled_model["enabled"] is False
    assert "DenseCountSparseOutput" in exp.compiled_model["reason"]
    assert not (exp.version_dir / "ensemble" / compiled_model.ONNX_FILE).exists()
    ensemble = export.load_version(exp.version_dir)
    direct = export.DirectPredictor.from_ensemble(ensemble)
    assert direct.tf_op.compiled is None
    raw = _held_out(trained, 20)
    got = direct.tf_op.predict_tensors(_model_inputs(direct, ensemble, raw))
    np.testing.assert_allclose(next(iter(got.values())).reshape(-1), _offline(trained, model, raw), atol=ATOL, rtol=0)


def test_compiled_model_off_keeps_the_savedmodel(trained, tmp_path):
    exp = _export(trained, trained.model, tmp_path, trained.valid_rows(32), compiled_model="off")
    assert exp.compiled_model == {"enabled": False, "reason": "export.compiled_model is off"}
    assert not (exp.version_dir / "ensemble" / compiled_model.ONNX_FILE).exists()
    # no compiled version: the served model loads the full ensemble (served so in test_serving.py)
    assert not (exp.version_dir / "ensemble" / PLAN_FILE).exists()
    assert CompiledPredictor.load(exp.version_dir / "ensemble") is None
    assert json.loads((exp.version_dir / "run_info.json").read_text())["loads_without_tensorflow"] is False


@pytest.mark.parametrize("kind", COMPILED)
def test_served_compiled_model_equals_offline(trained, zoo, served, kind):
    """Through a real Triton: one-row requests, a batch and a request of more rows than export verified the
    compiled model on (scored in chunks) equal the offline scores without loading anything more: no
    TensorFlow in the served model's process."""
    model, exp = zoo[1][kind]
    server, _ = served
    raw = _held_out(trained, 64)
    offline = _offline(trained, model, raw)
    before = _events(server)
    with RecsysClient(server.grpc_url, "grpc", model_name=kind) as client:
        ones = np.concatenate([client.predict(raw.iloc[[i]]) for i in range(16)])
        batch = client.predict(raw)
        beyond = np.arange(exp.compiled_model["largest_verified_batch"] + 1) % len(raw)
        big = client.predict(raw.iloc[beyond])
    np.testing.assert_allclose(ones, offline[:16], atol=ATOL, rtol=0)
    np.testing.assert_allclose(batch, offline, atol=ATOL, rtol=0)
    np.testing.assert_allclose(big, offline[beyond], atol=ATOL, rtol=0)
    # nothing loaded for any of them (a load's log line would follow its answer within moments)
    assert _events(server, at_least=len(before) + 1, timeout_s=2.0) == before
