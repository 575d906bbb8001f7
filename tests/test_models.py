"""Every ranking model type trains, exports and is served by a real Triton (one server, one model each)."""
import json

import numpy as np
import pytest

from pipeline_lib.export import ranking as export
from pipeline_lib.serving import repository
from pipeline_lib.models import ranking as train
from pipeline_lib.serving.client import RecsysClient
from pipeline_lib.serving.server import TritonServer

OTHERS = ["dcn", "deepfm", "wide_deep"]  # dlrm is covered by the shared `trained` fixture


@pytest.fixture(scope="module")
def zoo(trained, tmp_path_factory):
    import nvtabular as nvt

    tmp = tmp_path_factory.mktemp("zoo")
    rows = trained.valid_rows(32)
    wf = nvt.Workflow.load(str(trained.etl.workflow_dir))
    repo = tmp / "model_repository"
    out = {"dlrm": (trained.model, export.offline_scores(wf, trained.model.model_dir, rows, "click"))}
    for kind in OTHERS:
        cfg = trained.cfg.model.model_copy(update={"type": kind, "epochs": 2, "early_stopping_patience": 1})
        res = train.train(trained.etl.train_dir, trained.etl.valid_dir, cfg, "click", 0, tmp / kind)
        out[kind] = (res, export.offline_scores(wf, res.model_dir, rows, "click"))
    for kind, (res, _) in out.items():
        exp = export.export_ensemble(trained.etl.workflow_dir, res.model_dir, rows, "click", tmp / f"staged-{kind}",
                                     kind, 1)
        repository.publish(exp.version_dir, exp.config_path, repo, kind)
        repository.promote(repo, kind, 1)
    return repo, rows, out


@pytest.mark.parametrize("kind", ["dlrm"] + OTHERS)
def test_model_trains_with_metrics_history_and_learning_curve(zoo, kind):
    _, _, out = zoo
    res, _ = out[kind]
    saved = json.loads(res.metrics_path.read_text())
    assert saved["metrics"]["model"] == kind and 0.0 <= saved["metrics"]["auc"] <= 1.0
    assert saved["history"]["val_auc"] and len(saved["history"]["loss"]) == saved["metrics"]["epochs_run"]
    png = res.metrics_path.with_name("learning_curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.integration
def test_every_model_type_is_served_like_offline(zoo):
    repo, rows, out = zoo
    server = TritonServer.on_free_ports(repo, log_file=repo.parent / "triton.log")
    with server.start(timeout_s=300, models=list(out)):
        for kind, (_, offline) in out.items():
            assert np.ptp(offline) > 0, kind
            with RecsysClient(server.grpc_url, "grpc", model_name=kind) as client:
                np.testing.assert_allclose(client.predict(rows), offline, atol=1e-5, rtol=0, err_msg=kind)
