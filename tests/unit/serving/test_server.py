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
    # the key itself never reaches argv: a placeholder the LD_PRELOAD shim replaces inside tritonserver
    assert "--http-restricted-api=model-repository:triton-grpc-protocol-recsys-admin-key=@RECSYS_ADMIN_KEY@" in cmd
    assert "--grpc-restricted-protocol=model-repository:recsys-admin-key=@RECSYS_ADMIN_KEY@" in cmd
    assert not any("=k" in a for a in cmd) and "--strict-readiness=false" in cmd
    assert server.log_file == tmp_path / "t.log" and opts.grpc_port == 8001  # the options object is not changed
    default = TritonServer(tmp_path / "repo")
    assert default.log_file == (tmp_path / "triton.log").resolve() and "--model-control-mode=none" in default.command(PATHS)
    # every config this project writes is complete: no auto-complete stub importing model.py before the instance
    assert "--disable-auto-complete-config" in default.command(PATHS)
    assert "--disable-auto-complete-config" not in TritonServer(tmp_path, auto_complete_config=True).command(PATHS)
    assert not any("restricted" in a for a in TritonServer(tmp_path, restrict_repository_api=False).command(PATHS))
    with pytest.raises(TypeError):
        TritonServer(tmp_path / "repo", http_prot=1)

def test_free_ports_are_distinct():
    from pipeline_lib.serving.server import free_ports

    ports = free_ports(64)
    assert len(set(ports)) == 64 and all(p > 0 for p in ports)


def test_admin_key_file_is_private_and_the_shim_builds(tmp_path, monkeypatch):
    import os
    import stat

    from pipeline_lib.serving import admin_key

    monkeypatch.setenv("RECSYS_CACHE_DIR", str(tmp_path / "cache"))
    path = admin_key.key_path("127.0.0.1", 9000)
    admin_key.write_key(path, "s3cret")
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o600 and stat.S_IMODE(os.stat(path.parent).st_mode) == 0o700
    assert admin_key.read_key("127.0.0.1", 9000) == "s3cret" and admin_key.read_key("127.0.0.1", 9001) is None
    import shutil

    if shutil.which("cc") or shutil.which("gcc"):  # CI has a compiler; without one start() scrubs argv instead
        lib = admin_key.shim_library()
        assert lib is not None and lib.stat().st_size > 0
