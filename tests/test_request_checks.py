import numpy as np
import pytest

from pipeline_lib.request_checks import BadRequest, check_request

RAGGED = {"tags"}


def req(**over):
    base = {"user_id": np.array([1, 2, 3]), "price": np.array([[1.0], [2.0], [3.0]]),
            "tags__values": np.array([5, 6, 7]), "tags__offsets": np.array([0, 1, 1, 3], dtype=np.int32)}
    return {**base, **over}


def test_valid_request_is_normalised_to_1d():
    out = check_request(req(), RAGGED, 10)
    assert out["price"].shape == (3,) and out["user_id"].tolist() == [1, 2, 3]


@pytest.mark.parametrize("over, message", [
    ({"price": np.ones((3, 2))}, r"input 'price' has shape \[3, 2\]"),
    ({"user_id": np.array([1, 2])}, r"different row counts: price=3, tags=3, user_id=2"),
    ({"tags__offsets": np.array([1, 1, 2, 3])}, r"'tags__offsets' must start at 0"),
    ({"tags__offsets": np.array([0, 2, 1, 3])}, r"'tags__offsets' must be non-decreasing"),
    ({"tags__offsets": np.array([0, 1, 1, 2])}, r"ends at 2 but 'tags__values' has 3 values"),
])
def test_inconsistent_requests_name_the_field(over, message):
    with pytest.raises(BadRequest, match=message):
        check_request(req(**over), RAGGED, 10)


def test_empty_and_oversized_batches():
    empty = {"user_id": np.array([], dtype=np.int64), "price": np.array([]),
             "tags__values": np.array([], dtype=np.int64), "tags__offsets": np.array([0])}
    with pytest.raises(BadRequest, match="empty batch"):
        check_request(empty, RAGGED, 10)
    with pytest.raises(BadRequest, match="batch of 3 rows exceeds the limit of 2"):
        check_request(req(), RAGGED, 2)
