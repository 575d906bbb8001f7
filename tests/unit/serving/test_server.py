"""The Triton process wrapper's pieces that need no server."""
from pathlib import Path
import pytest
from pipeline_lib.serving.server import ServerOptions, TritonPaths, TritonServer

PATHS = TritonPaths(Path("/opt/tritonserver/bin/tritonserver"), Path("/opt/tritonserver/backends"), [])


def test_options_and_keyword_overrides_reach_the_command(tmp_path):
    opts = ServerOptions(http_port=9000, model_control="explicit", load_models=["recsys"], admin_api_key="k")
    server = TritonServer(tmp_path / "repo", opts, grpc_port=9001, log_file=tmp_path / "t.log")
    cmd = server.command(PATHS)
    assert "--http-port=9000" in cmd and "--grpc-port=9001" in cmd and "--load-model=recsys" in cmd
    assert any(a.startswith("--http-restricted-api=model-repository:") and a.endswith("=k") for a in cmd)
    assert server.log_file == tmp_path / "t.log" and opts.grpc_port == 8001  # the options object is not changed
    default = TritonServer(tmp_path / "repo")
    assert default.log_file == (tmp_path / "triton.log").resolve() and "--model-control-mode=none" in default.command(PATHS)
    # every config this project writes is complete: no auto-complete stub importing model.py before the instance
    assert "--disable-auto-complete-config" in default.command(PATHS)
    assert "--disable-auto-complete-config" not in TritonServer(tmp_path, auto_complete_config=True).command(PATHS)
    with pytest.raises(TypeError):
        TritonServer(tmp_path / "repo", http_prot=1)

def test_free_ports_are_distinct():
    from pipeline_lib.serving.server import free_ports

    ports = free_ports(64)
    assert len(set(ports)) == 64 and all(p > 0 for p in ports)
