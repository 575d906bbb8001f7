"""Every ranking model type (tests/conftest.py `ranking_zoo`) exports and is served by a real Triton (one server, one model each)."""

import numpy as np
import pytest

from pipeline_lib.serving import repository
from pipeline_lib.serving.client import RecsysClient
from pipeline_lib.serving.server import TritonServer


pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def zoo(trained, ranking_zoo, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("zoo")
    rows = trained.valid_rows(32)
    repo = tmp / "model_repository"
    out = {}
    for kind, res in ranking_zoo.items():
        out[kind] = (res, trained.publish(res.model_dir, rows, repo, kind, 1, tmp / f"staged-{kind}"))
        repository.promote(repo, kind, 1)
    return repo, rows, out


@pytest.mark.integration
def test_every_model_type_is_served_like_offline(zoo):
    repo, rows, out = zoo
    server = TritonServer.on_free_ports(repo, log_file=repo.parent / "triton.log")
    with server.start(timeout_s=300, models=list(out)):
        for kind, (_, offline) in out.items():
            assert np.ptp(offline) > 0, kind
            with RecsysClient(server.grpc_url, "grpc", model_name=kind) as client:
                np.testing.assert_allclose(client.predict(rows), offline, atol=1e-5, rtol=0, err_msg=kind)
