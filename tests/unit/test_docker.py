"""Static checks of docker-compose.yml and docker/*.Dockerfile.

These machines have a docker client but no engine, so the images are never built or run here;
these tests check structure and wiring only (see docs/gpu.md).
"""
import os
import re
import shlex

import pytest
import yaml
from tests.support import ROOT

MERLIN = "nvcr.io/nvidia/merlin/merlin-tensorflow"


def _compose():
    with open(os.path.join(ROOT, "docker-compose.yml")) as f:
        return yaml.safe_load(f)


def _dockerfile(name):
    text = open(os.path.join(ROOT, "docker", name)).read()
    text = re.sub(r"\\\n", " ", text)  # join continuation lines
    return [line.strip() for line in text.splitlines() if line.strip() and not line.strip().startswith("#")]


def test_compose_services_health_checks_and_dependencies():
    c = _compose()
    services = c["services"]
    assert set(services) == {"postgres", "prefect-server", "worker", "triton", "redis", "dask-scheduler",
                             "dask-cuda-worker"}
    # the ETL cluster is opt-in (docker compose --profile dask): the default stack is unchanged
    assert {n for n, svc in services.items() if "profiles" in svc} == {"dask-scheduler", "dask-cuda-worker"}
    for name in ("postgres", "prefect-server", "triton", "redis"):
        assert services[name]["healthcheck"]["test"], name
    # user-id requests: the worker fills the Redis store, Triton reads it through the same Feast repo path
    assert services["worker"]["depends_on"]["redis"]["condition"] == "service_healthy"
    assert "feature-store:/app/feature_store" in services["worker"]["volumes"]
    assert "feature-store:/app/feature_store" in services["triton"]["volumes"]
    assert services["prefect-server"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert services["worker"]["depends_on"]["prefect-server"]["condition"] == "service_healthy"
    assert "postgresql+asyncpg://" in services["prefect-server"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert services["worker"]["environment"]["PREFECT_API_URL"] == "http://prefect-server:4200/api"


def test_compose_dask_pair_shares_the_runs_folder_with_the_pipeline_worker():
    s = _compose()["services"]
    sched, worker = s["dask-scheduler"], s["dask-cuda-worker"]
    assert "dask scheduler" in sched["command"] and "--port 8786" in sched["command"]
    assert worker["command"].startswith("dask-cuda-worker tcp://dask-scheduler:8786")
    assert worker["depends_on"]["dask-scheduler"]["condition"] == "service_healthy"
    # workers read the split and write the transformed data where the pipeline worker reads them
    assert "runs:/app/runs" in worker["volumes"] and "runs:/app/runs" in s["worker"]["volumes"]
    # the same image as the pipeline worker: the cloudpickled workflow needs the same packages
    assert sched["build"] == worker["build"] == s["worker"]["build"]
    (dev,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]


def test_compose_shares_the_model_repository_and_reserves_gpus():
    c = _compose()
    s = c["services"]
    assert "model-repository:/app/model_repository" in s["worker"]["volumes"]
    assert "model-repository:/models" in s["triton"]["volumes"]
    assert {"postgres-data", "model-repository", "runs"} <= set(c["volumes"])
    for name in ("worker", "triton"):
        (dev,) = s[name]["deploy"]["resources"]["reservations"]["devices"]
        assert dev["driver"] == "nvidia" and "gpu" in dev["capabilities"]
    # published ports bound to localhost only
    for svc in s.values():
        for port in svc.get("ports", []):
            assert port.startswith("127.0.0.1:"), port


def test_compose_builds_point_at_existing_dockerfiles_and_configs():
    s = _compose()["services"]
    for name in ("worker", "triton", "prefect-server"):
        assert os.path.exists(os.path.join(ROOT, s[name]["build"]["dockerfile"]))
    # the compose scheduler runs on SQLAlchemy < 2.1 like the local one (2.1 breaks Prefect 3.7's scheduler)
    server_build = _dockerfile(os.path.basename(s["prefect-server"]["build"]["dockerfile"]))
    assert any('"sqlalchemy>=2.0.30,<2.1"' in line for line in server_build if line.startswith("RUN"))
    worker_cmd = s["worker"]["command"]
    assert "prefect --no-prompt deploy --all" in worker_cmd and "--pool recsys-gpu" in worker_cmd
    prefect_yaml = yaml.safe_load(open(os.path.join(ROOT, "prefect.yaml")))
    cfg_path = prefect_yaml["deployments"][0]["parameters"]["config_path"]
    from pipeline_lib.config import load_config

    cfg = load_config(os.path.join(ROOT, cfg_path))
    assert cfg.serving.host == "triton" and cfg.serving.model_control == "explicit"
    assert str(cfg.export.model_repository) == "/app/model_repository"


@pytest.mark.parametrize("name", ["pipeline.Dockerfile", "triton.Dockerfile"])
def test_dockerfiles_build_on_merlin_and_copy_existing_paths(name):
    lines = _dockerfile(name)
    args = {m.group(1): m.group(2) for m in (re.match(r"ARG (\w+)=(\S+)", l) for l in lines) if m}
    (frm,) = [l for l in lines if l.startswith("FROM ")]
    image = re.sub(r"\$\{(\w+)\}", lambda m: args[m.group(1)], frm.split()[1])
    assert image.startswith(MERLIN + ":")
    copies = [l for l in lines if l.startswith("COPY ")]
    assert copies
    for line in copies:
        *srcs, _dst = shlex.split(line)[1:]
        for src in srcs:
            assert os.path.exists(os.path.join(ROOT, src)), f"{name}: COPY source {src} missing"
    assert any(l.startswith("HEALTHCHECK ") for l in lines)
    assert any(l.startswith(("CMD ", "ENTRYPOINT ")) for l in lines)
    assert any("pip install" in l and "-e ." in l for l in lines)


def test_triton_entrypoint_uses_explicit_control_and_restricts_the_admin_api():
    text = open(os.path.join(ROOT, "docker", "triton-entrypoint.sh")).read()
    assert "--model-control-mode=explicit" in text
    assert "--http-restricted-api=model-repository:triton-grpc-protocol-recsys-admin-key=" in text
    assert "--grpc-restricted-protocol=model-repository:recsys-admin-key=" in text
    assert os.access(os.path.join(ROOT, "docker", "triton-entrypoint.sh"), os.X_OK)
    from pipeline_lib.serving.repository import ADMIN_HEADER

    assert ADMIN_HEADER == "triton-grpc-protocol-recsys-admin-key"  # one name: HTTP header and gRPC metadata


def test_worker_image_uses_the_images_tritonserver_for_the_smoke_test():
    lines = " ".join(_dockerfile("pipeline.Dockerfile"))
    assert "TRITONSERVER_BIN=/opt/tritonserver/bin/tritonserver" in lines
    assert "TRITON_BACKEND_DIR=/opt/tritonserver/backends" in lines
