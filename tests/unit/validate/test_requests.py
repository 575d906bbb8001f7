import numpy as np
import pytest

from pipeline_lib.validate.requests import BadRequest, check_request, lists_present, read_request

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


@pytest.mark.parametrize("bad", [np.inf, -np.inf])
def test_non_finite_continuous_value_is_a_bad_request_naming_the_field(bad):
    with pytest.raises(BadRequest, match=r"input 'price' has 1 non-finite value\(s\) \(e.g. row 1: -?inf\)"):
        check_request(req(price=np.array([1.0, bad, 3.0])), RAGGED, 10)
    with pytest.raises(BadRequest, match=r"input 'price' has 2 non-finite"):
        check_request(req(price=np.array([[bad], [2.0], [bad]], dtype=np.float32)), RAGGED, 10)
    # NaN is a missing value (the workflow fills it with the training median): accepted
    out = check_request(req(price=np.array([1.0, np.nan, 3.0])), RAGGED, 10)
    assert np.isnan(out["price"][1])


def test_empty_and_oversized_batches():
    empty = {"user_id": np.array([], dtype=np.int64), "price": np.array([]),
             "tags__values": np.array([], dtype=np.int64), "tags__offsets": np.array([0])}
    with pytest.raises(BadRequest, match="empty batch"):
        check_request(empty, RAGGED, 10)
    with pytest.raises(BadRequest, match="batch of 3 rows exceeds the limit of 2"):
        check_request(req(), RAGGED, 2)


class _PbUtils:
    """Stand-in for the python backend's ``triton_python_backend_utils`` (compiled into the stub, not
    importable here): records what ``error_response`` builds. The real server's answers (400 /
    INVALID_ARGUMENT) are checked in test_serving, test_retrieval and test_sessions."""

    class InferenceResponse:
        def __init__(self, output_tensors, error=None):
            self.output_tensors, self.error = output_tensors, error

    def __init__(self, with_codes: bool = True):
        class TritonError:
            def __init__(self, message, code=None):
                self.message, self.code = message, code

        if with_codes:
            TritonError.INTERNAL, TritonError.INVALID_ARG = "INTERNAL", "INVALID_ARG"
        self.TritonError = TritonError


def test_error_response_codes_a_bad_request_as_invalid_argument_and_anything_else_as_internal():
    from pipeline_lib.validate.requests import error_response

    pb = _PbUtils()
    bad = error_response(pb, BadRequest("empty batch: the request has 0 rows"))
    assert bad.output_tensors == [] and bad.error.code == "INVALID_ARG"
    assert bad.error.message == "bad request: empty batch: the request has 0 rows"
    internal = error_response(pb, KeyError("x" * 3000))
    assert internal.error.code == "INTERNAL" and internal.error.message.startswith("inference failed: KeyError: ")
    assert len(internal.error.message) == 2000
    assert error_response(pb, ValueError("not a BadRequest")).error.code == "INTERNAL"
    old = error_response(_PbUtils(with_codes=False), BadRequest("x"))  # a backend without error codes
    assert old.error.code is None and old.error.message == "bad request: x"


# --- the shared request reader / server options (added with the lower-stage cleanup)
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


def test_a_value_float32_cannot_hold_is_refused_per_row_naming_the_field():
    """1e40 is finite in float64 but inf in the model's float32 (then a NaN score): refused with its row."""
    with pytest.raises(BadRequest, match=r"input 'price' row 2: 1e\+40 is too large for the model's float32"):
        check_request(req(price=np.array([1.0, 2.0, 1e40])), RAGGED, 10)
    with pytest.raises(BadRequest, match=r"input 'price' row 0: -1e\+39 is too large"):
        check_request(req(price=np.array([-1e39, 2.0, 3.0])), RAGGED, 10)
    out = check_request(req(price=np.array([3.0e38, -3.0e38, np.nan])), RAGGED, 10)  # float32 holds these
    assert out["price"][0] == 3.0e38


def test_a_value_outside_the_configured_range_is_refused_naming_the_row():
    from pipeline_lib.validate.requests import RequestLimits

    limits = RequestLimits(ranges={"price": (0.0, 100.0)})
    with pytest.raises(BadRequest, match=r"input 'price' row 1: 500.0 is outside the range \[0.0, 100.0\]"):
        check_request(req(price=np.array([1.0, 500.0, 3.0])), RAGGED, 10, limits)
    with pytest.raises(BadRequest, match=r"input 'price' row 0: -1.0 is outside"):
        check_request(req(price=np.array([-1.0, 5.0, 3.0])), RAGGED, 10, limits)
    # the bounds themselves and NaN (a missing value) are accepted; an open side is not checked
    check_request(req(price=np.array([0.0, 100.0, np.nan])), RAGGED, 10, limits)
    check_request(req(price=np.array([-5.0, 1e6, 1.0])), RAGGED, 10, RequestLimits(ranges={"price": (None, 1e7)}))


def test_string_and_list_size_limits_name_the_field_and_row():
    from pipeline_lib.validate.requests import RequestLimits

    limits = RequestLimits(max_string_bytes=8, max_list_length=2)
    ok = req(user_id=np.array([b"a", b"bb", b"ccc"], dtype=object))
    check_request(ok, RAGGED, 10, limits)
    with pytest.raises(BadRequest, match=r"input 'user_id' row 1 is 9 bytes long; the limit is 8 bytes"):
        check_request(req(user_id=np.array([b"a", b"x" * 9, b"c"], dtype=object)), RAGGED, 10, limits)
    with pytest.raises(BadRequest, match=r"input 'user_id' row 2 is 20 bytes long"):
        check_request(req(user_id=np.array([b"a", b"b", b"y" * 20], dtype="S")), RAGGED, 10, limits)
    with pytest.raises(BadRequest, match=r"input 'tags' row 2 has 3 values; the limit is 2 per row"):
        check_request(req(tags__values=np.array([5, 6, 7, 8]), tags__offsets=np.array([0, 1, 1, 4], dtype=np.int32)),
                      RAGGED, 10, limits)
    with pytest.raises(BadRequest, match=r"input 'tags__values' row 0 is 9 bytes long"):  # list values too
        check_request(req(tags__values=np.array([b"x" * 9, b"a", b"b"], dtype=object)), RAGGED, 10, limits)


def test_request_limits_round_trip_through_config_parameters():
    import json

    import tritonclient.grpc.model_config_pb2 as mc
    from google.protobuf import json_format

    from pipeline_lib.validate.requests import RequestLimits, request_limits, write_limit_parameters

    cfg = mc.ModelConfig(name="m", backend="python")
    want = RequestLimits(7, 64, 30, {"price": (0.0, None)})
    write_limit_parameters(cfg, want)
    as_triton = json.loads(json_format.MessageToJson(cfg, preserving_proto_field_name=True))
    assert request_limits(as_triton) == want
    assert request_limits({}) == RequestLimits()  # a version exported before the limits: the defaults


def test_non_finite_scores_are_never_answered():
    from pipeline_lib.validate.requests import NonFiniteScores, check_scores

    check_scores({"click/binary_output": np.array([[0.1], [0.9]], dtype=np.float32)})
    with pytest.raises(NonFiniteScores, match=r"1 non-finite 'click/binary_output' value\(s\) \(rows \[1\]\)"):
        check_scores({"click/binary_output": np.array([[0.1], [np.nan], [0.3]], dtype=np.float32)})
    assert issubclass(NonFiniteScores, BadRequest)
