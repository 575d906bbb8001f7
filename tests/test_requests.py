"""The one request reader both python-backend models use (pipeline_lib.validate.requests)."""
import numpy as np
import pytest

from pipeline_lib.validate.requests import BadRequest, fill_optional_lists, lists_present, read_request

TENSORS = {"user_id": np.array([[1, 2]]), "tags__values": np.array([[5, 6, 7]]),
           "tags__offsets": np.array([[0, 1, 3]], dtype=np.int32)}
NAMES = ["user_id", "tags__values", "tags__offsets", "exclude__values", "exclude__offsets"]
OPTIONAL = {"exclude__values", "exclude__offsets"}


def test_read_request_leaves_out_absent_optional_inputs_and_unbatches():
    plain = read_request(TENSORS.get, NAMES, OPTIONAL)
    assert sorted(plain) == ["tags__offsets", "tags__values", "user_id"] and plain["user_id"].shape == (1, 2)
    batched = read_request(TENSORS.get, NAMES, OPTIONAL, batched=True)
    assert batched["user_id"].tolist() == [1, 2] and batched["tags__offsets"].tolist() == [0, 1, 3]


def test_read_request_names_a_missing_or_misshaped_input():
    with pytest.raises(BadRequest, match="missing input 'user_id'"):
        read_request({k: v for k, v in TENSORS.items() if k != "user_id"}.get, NAMES, OPTIONAL)
    with pytest.raises(BadRequest, match=r"input 'user_id' has shape \[2\]; with dynamic batching"):
        read_request({**TENSORS, "user_id": np.array([1, 2])}.get, NAMES, OPTIONAL, batched=True)


def test_list_halves():
    arrays = read_request(TENSORS.get, NAMES, OPTIONAL, batched=True)
    assert lists_present(arrays, {"tags", "exclude"}) == {"tags"}
    with pytest.raises(BadRequest, match="input 'exclude__values' without its other half"):
        lists_present({**arrays, "exclude__values": np.array([1])}, {"tags", "exclude"})
    filled = fill_optional_lists(arrays, {"exclude__values": np.int64, "exclude__offsets": np.int32},
                                 {"tags", "exclude"})
    assert filled["exclude__values"].tolist() == [] and filled["exclude__offsets"].tolist() == [0, 0, 0]
