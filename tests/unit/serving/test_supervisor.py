"""The supervisor's probe request, built from a model config alone (the fault tests run the loop itself
against a real `recsys serve`: tests/integration/test_serve_faults.py)."""

from pipeline_lib.serving.supervisor import _DEAD, probe_inputs


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
