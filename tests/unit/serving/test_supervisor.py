"""The supervisor's probe request, built from a model config alone, its decision whether an exited stub
died (from what /proc and Triton's index say), and the stub's identity read from its command line (the
fault tests run the loop itself against a real `recsys serve`: tests/integration/test_serve_faults.py)."""

import time

from pipeline_lib.serving.server import Stub, stub_of
from pipeline_lib.serving.supervisor import _DEAD, answered_by_model, probe_inputs, stub_death


def test_probe_row_from_a_config_fits_triton_checks():
    config = {"max_batch_size": 0, "input": [
        {"name": "user_id", "data_type": "TYPE_INT64", "dims": ["-1"]},
        {"name": "country", "data_type": "TYPE_STRING", "dims": ["-1"]},
        {"name": "tags__values", "data_type": "TYPE_INT64", "dims": ["-1"]},
        {"name": "tags__offsets", "data_type": "TYPE_INT32", "dims": ["-1"]},
        {"name": "exclude_item_ids", "data_type": "TYPE_INT64", "dims": ["-1"], "optional": True}]}
    inputs = {i.name(): i for i in probe_inputs(config)}
    assert set(inputs) == {"user_id", "country", "tags__values", "tags__offsets"}  # optional inputs left out
    assert inputs["user_id"].shape() == [1] and inputs["user_id"].datatype() == "INT64"
    assert inputs["country"].datatype() == "BYTES"
    assert inputs["tags__offsets"].shape() == [2]  # one row holding one list value: offsets [0, 1]
    batched = probe_inputs({"max_batch_size": 8, "input": [{"name": "x", "data_type": "TYPE_FP32", "dims": ["3"]}]})
    assert batched[0].shape() == [1, 3] and batched[0].datatype() == "FP32"


def test_only_cannot_run_answers_count_as_failures():
    assert _DEAD.search("Stub process 'recsys_0_0' is not healthy.")
    assert _DEAD.search("Request for unknown model: 'recsys' is not found")
    assert not _DEAD.search("bad request: input 'x' ends at 0 but 'y' has 1 values")
    assert not _DEAD.search("inference failed: ValueError: could not convert")
    # the models' own answers mean a live process, also a 503 of a user-id version whose feature store is down
    assert answered_by_model("unavailable: no feature store is set up for model 'ret' (...)")
    assert answered_by_model("unavailable: feature store unreachable (redis at 127.0.0.1:1): ConnectionError")
    assert answered_by_model("bad request: input 'k' must be >= 1")
    assert not answered_by_model("Stub process 'recsys_0_0' is not healthy.")
    assert not answered_by_model("Request for unknown model: 'recsys' is not found")  # Triton's own 400
    assert answered_by_model("unexpected shape for input 'k' for model 'recsys'")  # Triton read the request


def _stub(pid, version, model="recsys"):
    return Stub(pid, model, version, f"{model}_0_0")


def test_a_stub_exit_is_a_death_only_when_nothing_replaces_it():
    v1, v2 = _stub(10, 1), _stub(20, 2)
    # killed: its version READY, nothing loading, no other stub, fewer stubs than instances -> a death
    reason = stub_death("recsys", {10: v1}, {10: v1}, {}, {"1": "READY"}, 1)
    assert reason and "stub 10" in reason and "version 1 is READY" in reason
    # a failed version stays UNAVAILABLE in the index: not a reason to wait
    assert stub_death("recsys", {10: v1}, {10: v1}, {}, {"1": "READY", "3": "UNAVAILABLE"}, 1)
    # the served version's stub died while the version it replaced is still unloading -> a death
    assert stub_death("recsys", {20: v2}, {10: v1, 20: v2}, {10: v1}, {"1": "UNLOADING", "2": "READY"}, 1)


def test_a_stub_replaced_by_a_promotion_is_left_to_the_probe():
    v1, v2 = _stub(10, 1), _stub(20, 2)
    # promotion tail: the new version READY, the old one UNLOADING, its stub exits
    assert stub_death("recsys", {10: v1}, {10: v1}, {20: v2}, {"1": "UNLOADING", "2": "READY"}, 1) is None
    assert stub_death("recsys", {10: v1}, {10: v1, 20: v2}, {20: v2}, {"1": "UNAVAILABLE", "2": "READY"}, 1) is None
    # a new stub of the model since the last healthy probe (a load of another or the same version)
    assert stub_death("recsys", {10: v1}, {10: v1}, {30: _stub(30, 1)}, {"1": "READY"}, 1) is None
    assert stub_death("recsys", {10: v1}, {10: v1}, {20: v2}, {"1": "READY"}, 1) is None
    # a version loading
    assert stub_death("recsys", {10: v1}, {10: v1}, {}, {"1": "READY", "2": "LOADING"}, 1) is None
    # instance count lowered in place: as many stubs as the config asks for
    assert stub_death("recsys", {10: v1}, {10: v1, 11: _stub(11, 1)}, {11: _stub(11, 1)}, {"1": "READY"}, 1) is None
    assert stub_death("recsys", {10: v1}, {10: v1, 11: _stub(11, 1)}, {11: _stub(11, 1)}, {"1": "READY"}, 2)
    # a stub of another model (an ensemble's step): the probe judges
    other = _stub(40, 1, model="other")
    assert stub_death("recsys", {40: other}, {40: other}, {}, {"1": "READY"}, 1) is None


def test_stub_of_reads_a_python_backend_command_line(tmp_path, monkeypatch):
    import os
    import subprocess
    import sys

    fake = tmp_path / "triton_python_backend_stub"
    fake.symlink_to(sys.executable)
    model_py = tmp_path / "repo" / "recsys" / "7" / "model.py"
    model_py.parent.mkdir(parents=True)
    model_py.write_text("import time\ntime.sleep(30)\n")
    # the stub's argv as Triton 2.51's python backend writes it (observed in /proc/PID/cmdline)
    p = subprocess.Popen([str(fake), str(model_py), "triton_python_backend_shm_region_x", "1048576", "1048576",
                          str(os.getpid()), str(tmp_path), "336", "recsys_0_1", "DEFAULT"])
    try:
        for _ in range(100):
            s = stub_of(p.pid)
            if s is not None:
                break
            time.sleep(0.02)
        assert s == Stub(p.pid, "recsys", 7, "recsys_0_1")
    finally:
        p.kill()
        p.wait()
    assert stub_of(p.pid) is None  # gone
    assert stub_of(os.getpid()) is None  # not a stub


def test_the_repository_lock_can_be_tried_without_waiting(tmp_path):
    from pipeline_lib.serving import repository

    with repository.locked(tmp_path, "recsys") as held:
        assert held is True
        with repository.locked(tmp_path, "recsys", wait=False) as other:
            assert other is False  # a promotion holds it: the supervisor leaves the exit to its probe
    with repository.locked(tmp_path, "recsys", wait=False) as free:
        assert free is True
