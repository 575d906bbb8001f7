"""The vectorised BYTES codec against tritonclient's own encoder and the python backend's decoder
(the same algorithm as ``tritonclient.utils.deserialize_bytes_tensor``)."""
import random
import types

import numpy as np
import pytest
from tritonclient.utils import deserialize_bytes_tensor, serialize_byte_tensor

from pipeline_lib.serving import bytes_tensor

CASES = [
    [], [b""], [b"", b""], [b"a"], [b"\x00"], [b"a\x00"], [b"C02", b"C0\x00"],  # trailing NULs: numpy's S drops them
    [b"C02", b"C17", b"C03"], [b"mobile", b"desktop", b"tablet"], [b"ab", b"", b"abc"],
    [b"x" * 5000, b"y"],  # one long element: no padded copy
    ["caf\u00e9", "x", 3, 4.5, None],  # not bytes: str(x) in UTF-8, as tritonclient does
]


def _random_cases(n: int) -> list:
    rng = random.Random(0)
    return [[bytes(rng.randint(0, 3) for _ in range(rng.choice([0, 1, 3, rng.randint(0, 9)])))
             for _ in range(rng.randint(0, 30))] for _ in range(n)]


def _objects(values: list) -> np.ndarray:
    out = np.empty(len(values), dtype=object)
    out[:] = values
    return out


def _check(values: list) -> None:
    arr = _objects(values)
    want = serialize_byte_tensor(arr)
    want = want.item() if want.size else b""
    encoded = bytes_tensor.serialize(arr)
    assert encoded.dtype == np.uint8 and encoded.tobytes() == want
    got, ref = bytes_tensor.deserialize(encoded), deserialize_bytes_tensor(want)
    assert got.dtype == object and got.shape == ref.shape == (len(values),)
    assert list(got) == list(ref) and all(type(x) is bytes for x in got)


@pytest.mark.parametrize("values", CASES)
def test_encoding_and_decoding_equal_tritons(values):
    _check(values)


def test_random_short_strings_equal_tritons():
    for values in _random_cases(300):
        _check(values)


def test_a_2d_array_and_an_s_array_are_encoded_in_c_order():
    arr = np.array([[b"a", b"bc"], [b"", b"def"]], dtype=object)
    assert bytes_tensor.serialize(arr).tobytes() == serialize_byte_tensor(arr).item()
    fixed = np.array([b"ab", b"c"], dtype="S2")
    assert bytes_tensor.serialize(fixed).tobytes() == serialize_byte_tensor(fixed).item()
    with pytest.raises(TypeError, match="int64"):
        bytes_tensor.serialize(np.arange(3))


@pytest.mark.parametrize("cut", [1, 3, 8])
def test_a_truncated_buffer_is_an_error(cut):
    encoded = bytes_tensor.serialize(_objects([b"abc", b"de"])).tobytes()
    with pytest.raises(ValueError, match="truncated"):
        bytes_tensor.deserialize(encoded[:-cut])


def test_install_replaces_the_backends_decoder_only_where_it_has_one():
    backend = types.SimpleNamespace(deserialize_bytes_tensor=deserialize_bytes_tensor)
    assert bytes_tensor.install(backend) is True
    assert backend.deserialize_bytes_tensor is bytes_tensor.deserialize
    assert bytes_tensor.install(types.SimpleNamespace()) is False
