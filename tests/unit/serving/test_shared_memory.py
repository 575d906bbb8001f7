"""Sizes of outputs the shared-memory client can place in its output region (the regions themselves
are tested against a real Triton in tests/integration/test_serving.py)."""
from pipeline_lib.serving.shared_memory import output_bytes


def test_output_bytes_from_the_metadata_shape():
    assert output_bytes("FP32", [-1, 1], 1024, batch_dim=False) == 4096
    assert output_bytes("FP32", [-1, -1, 1], 7, batch_dim=True) == 28  # [1, rows, 1] with dynamic batching
    assert output_bytes("INT64", [-1, 10], 3, batch_dim=False) == 240


def test_outputs_of_unknown_size_stay_in_the_response():
    assert output_bytes("BYTES", [-1, 10], 3, batch_dim=False) is None
    assert output_bytes("FP32", [-1, -1], 3, batch_dim=False) is None  # e.g. top-k of a variable k
