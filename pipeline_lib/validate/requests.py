"""Validation of a served request's tensors, before anything reaches NVTabular or TensorFlow.

Triton itself rejects unknown or missing input names and wrong datatypes (against config.pbtxt);
what it cannot know is how the inputs relate: equal row counts, valid ragged offsets, a non-empty
batch within the size limit, finite float inputs (``inf`` in a continuous feature; NaN is a
missing value, filled by the workflow) that the model's float32 can hold (``1e40`` would become ``inf``
and a NaN score), inside the range the run's config declares for the feature (``columns.features[].min``
/ ``max``), and the size limits of :class:`RequestLimits` (bytes per string, values per list). Those are
checked here, with the offending field and row named. :func:`check_scores` refuses to answer non-finite
scores (an error instead of NaN).

Triton itself answers an HTTP body it cannot parse (malformed JSON, ``null``, a string where a number
belongs, ``data`` not matching ``shape``) before any model runs; Triton 2.51 answers those with HTTP 500
and a message naming the JSON field (upstream triton-inference-server/server#8762); see docs/serving.md.

:func:`error_response` turns an exception of a served model into Triton's error response: a
:class:`BadRequest` as invalid-argument (HTTP 400, gRPC ``INVALID_ARGUMENT``), anything else as
internal (HTTP 500, gRPC ``INTERNAL``), so clients and load balancers can tell the two apart.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Collection, Mapping, Optional

import numpy as np

DEFAULT_MAX_ROWS = 65536
DEFAULT_MAX_STRING_BYTES = 1024   # bytes per string value (an id, a category) of a request
DEFAULT_MAX_LIST_LENGTH = 10000   # values per row of a list input (history, tags, exclude_item_ids)
FLOAT32_MAX = float(np.finfo(np.float32).max)  # the models take float32: larger magnitudes become inf


@dataclass(frozen=True)
class RequestLimits:
    """What one served request may carry (config.pbtxt parameters written at export; a version exported
    before a limit existed gets its default): rows, bytes per string value, values per list row, and the
    closed range ``[min, max]`` (None: open) of a continuous input."""

    max_rows: int = DEFAULT_MAX_ROWS
    max_string_bytes: int = DEFAULT_MAX_STRING_BYTES
    max_list_length: int = DEFAULT_MAX_LIST_LENGTH
    ranges: Mapping[str, tuple[Optional[float], Optional[float]]] = field(default_factory=dict)


def request_limits(config: Mapping) -> RequestLimits:
    """The :class:`RequestLimits` of a model's config (``parameters`` written at export)."""
    params = config.get("parameters", {})

    def get(name: str, default: int) -> int:
        return int(params.get(name, {}).get("string_value", default))

    ranges = json.loads(params.get("input_ranges", {}).get("string_value", "{}") or "{}")
    return RequestLimits(get("max_request_rows", DEFAULT_MAX_ROWS), get("max_string_bytes", DEFAULT_MAX_STRING_BYTES),
                         get("max_list_length", DEFAULT_MAX_LIST_LENGTH),
                         {k: (v[0], v[1]) for k, v in ranges.items()})


def write_limit_parameters(cfg, limits: RequestLimits) -> None:
    """Record ``limits`` as parameters of a ``model_config_pb2.ModelConfig`` (read by :func:`request_limits`)."""
    cfg.parameters["max_request_rows"].string_value = str(limits.max_rows)
    cfg.parameters["max_string_bytes"].string_value = str(limits.max_string_bytes)
    cfg.parameters["max_list_length"].string_value = str(limits.max_list_length)
    cfg.parameters["input_ranges"].string_value = json.dumps({k: list(v) for k, v in limits.ranges.items()})


class BadRequest(ValueError):
    """The request itself is wrong (the client's fault): answered as invalid-argument / HTTP 400."""


# how every error answered by the project's served models begins (error_response): an answer that begins so came
# from the model's own code, whose process is therefore alive (the supervisor's probe reads it so)
ERROR_PREFIXES = ("bad request: ", "unavailable: ", "inference failed: ")


def error_response(pb_utils, exc: BaseException):
    """Triton's error response for an exception raised while serving one request.

    ``pb_utils`` is the python backend's ``triton_python_backend_utils`` module (passed in: this
    module is imported outside Triton too). A :class:`BadRequest` is answered as
    ``"bad request: ..."`` with the ``INVALID_ARG`` code (HTTP 400, gRPC ``INVALID_ARGUMENT``); any
    other exception as ``"inference failed: <type>: ..."`` (one line, at most 2000 characters; the
    caller logs the traceback) with the ``INTERNAL`` code (HTTP 500, gRPC ``INTERNAL``); an exception whose
    ``triton_code`` is ``"UNAVAILABLE"`` (the feature store cannot be reached) as ``"unavailable: ..."`` with
    ``UNAVAILABLE`` (HTTP 503, gRPC ``UNAVAILABLE``). A python
    backend without error codes (before 23.03) gets a plain ``TritonError``, which is INTERNAL.
    """
    if isinstance(exc, BadRequest):
        message, code_name = f"bad request: {exc}", "INVALID_ARG"
    elif getattr(exc, "triton_code", None) == "UNAVAILABLE":  # e.g. the feature store is down: HTTP 503
        message, code_name = f"unavailable: {exc}"[:2000], "UNAVAILABLE"
    else:
        message, code_name = f"inference failed: {type(exc).__name__}: {exc}"[:2000], "INTERNAL"
    code = getattr(pb_utils.TritonError, code_name, None)
    error = pb_utils.TritonError(message) if code is None else pb_utils.TritonError(message, code)
    return pb_utils.InferenceResponse(output_tensors=[], error=error)


def version_dir(args: Mapping) -> Path:
    """The version folder a python-backend model instance serves, from Triton's ``initialize`` args
    (Triton 22.06+ may pass the path of model.py instead of the model folder)."""
    repo = args["model_repository"]
    model_dir = Path(repo).parent.parent if repo.endswith(".py") else Path(repo)
    if model_dir.name != args["model_name"]:
        model_dir = model_dir / args["model_name"]
    return model_dir / str(args["model_version"])


def tensor_reader(pb_utils, request) -> Callable[[str], Optional[np.ndarray]]:
    """``name -> numpy array`` of one Triton request's input tensor, None where the request lacks it."""
    def read(name: str) -> Optional[np.ndarray]:
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        return None if tensor is None else tensor.as_numpy()

    return read


def read_request(read: Callable[[str], Optional[np.ndarray]], names: Collection[str], optional: Collection[str],
                 batched: bool = False) -> dict[str, np.ndarray]:
    """The input arrays of one request, by name (``read``: see :func:`tensor_reader`). An optional input
    the request left out is left out; a missing required one is a :class:`BadRequest`. ``batched``
    (dynamic batching): a request is one batch entry, ``[1, rows]``, returned as ``[rows]``."""
    arrays = {}
    for name in names:
        arr = read(name)
        if arr is None:
            if name in optional:
                continue
            raise BadRequest(f"missing input '{name}'")
        if batched:
            if arr.ndim < 1 or arr.shape[0] != 1:
                raise BadRequest(f"input '{name}' has shape {list(arr.shape)}; with dynamic batching a request is one "
                                 f"batch entry: send [1, rows] (values/offsets: [1, n])")
            arr = arr[0]
        arrays[name] = arr
    return arrays


def lists_present(arrays: Mapping[str, np.ndarray], ragged: Collection[str]) -> set[str]:
    """The list columns of ``ragged`` whose two halves (``__values``, ``__offsets``) the request
    carries; one half without the other is a :class:`BadRequest`."""
    present = set()
    for col in sorted(ragged):
        halves = [h for h in (f"{col}__values", f"{col}__offsets") if h in arrays]
        if len(halves) == 1:
            raise BadRequest(f"input '{halves[0]}' without its other half (a list input needs __values and __offsets)")
        if halves:
            present.add(col)
    return present


def fill_optional_lists(arrays: dict[str, np.ndarray], optional: Mapping[str, np.dtype],
                        ragged: set[str]) -> dict[str, np.ndarray]:
    """Optional list inputs (``optional``: tensor name -> dtype) a request left out, as empty lists
    (values ``[]``, offsets all 0) for each of its rows; one half of a list without the other is a
    :class:`BadRequest`. Kept for the served ``model.py`` of versions exported before 2026-12-02 (they
    import it); today's model.py leaves an absent optional list out (:func:`lists_present`)."""
    out = dict(arrays)
    present = lists_present(out, ragged)
    for col in sorted(ragged):
        halves = [f"{col}__values", f"{col}__offsets"]
        if not set(halves) <= set(optional) or col in present:
            continue
        ref = next((np.asarray(out[f"{c}__offsets"]).reshape(-1) for c in sorted(ragged) if f"{c}__offsets" in out), None)
        rows = len(ref) - 1 if ref is not None and len(ref) else 0
        out[halves[0]] = np.zeros(0, dtype=optional[halves[0]])
        out[halves[1]] = np.zeros(rows + 1, dtype=optional[halves[1]])
    return out


def max_request_rows(config: Mapping) -> int:
    """The ``max_request_rows`` parameter of a model's config (export writes it)."""
    params = config.get("parameters", {})
    return int(params.get("max_request_rows", {}).get("string_value", DEFAULT_MAX_ROWS))


def check_request(arrays: Mapping[str, np.ndarray], ragged: set[str], max_rows: int,
                  limits: Optional[RequestLimits] = None) -> dict[str, np.ndarray]:
    """Check and normalise the input tensors of one request; return them as 1-D arrays.

    ``arrays`` maps tensor names (``col`` or ``col__values``/``col__offsets`` for the ragged
    columns listed in ``ragged``) to numpy arrays. ``limits``: string and list sizes and value ranges
    (default: :class:`RequestLimits`' defaults, no range); ``max_rows`` is the row limit.
    """
    limits = limits or RequestLimits()
    out: dict[str, np.ndarray] = {}
    rows: dict[str, int] = {}
    for name, arr in arrays.items():
        arr = np.asarray(arr)
        if arr.ndim == 2 and arr.shape[1] == 1:
            arr = arr.reshape(-1)
        if arr.ndim != 1:
            raise BadRequest(f"input '{name}' has shape {list(arr.shape)}; expected a 1-D tensor [rows]")
        out[name] = arr
    for col in sorted(ragged):
        values, offsets = out[f"{col}__values"], out[f"{col}__offsets"]
        if len(offsets) == 0 or offsets[0] != 0:
            raise BadRequest(f"input '{col}__offsets' must start at 0 (got {offsets[:1].tolist()})")
        if np.any(np.diff(offsets.astype(np.int64)) < 0):
            raise BadRequest(f"input '{col}__offsets' must be non-decreasing")
        if offsets[-1] != len(values):
            raise BadRequest(
                f"input '{col}__offsets' ends at {int(offsets[-1])} but '{col}__values' has {len(values)} values"
            )
        rows[col] = len(offsets) - 1
        lengths = np.diff(offsets.astype(np.int64))
        if len(lengths) and lengths.max() > limits.max_list_length:
            row = int(np.argmax(lengths))
            raise BadRequest(f"input '{col}' row {row} has {int(lengths[row])} values; the limit is "
                             f"{limits.max_list_length} per row (export.max_list_length)")
    for name, arr in out.items():
        if name.endswith("__offsets"):
            continue
        if not name.endswith("__values"):
            rows[name] = len(arr)
        if arr.dtype.kind == "f" and not (np.abs(arr) <= FLOAT32_MAX).all():  # one pass in the usual case
            if not name.endswith("__values"):
                _check_finite(name, arr)
            _check_magnitude(name, arr)
        bounds = limits.ranges.get(name)
        if bounds is not None:
            _check_range(name, arr, bounds)
        if arr.dtype.kind in "OS":
            _check_string_sizes(name, arr, limits.max_string_bytes)
    counts = set(rows.values())
    if len(counts) > 1:
        detail = ", ".join(f"{k}={v}" for k, v in sorted(rows.items()))
        raise BadRequest(f"inputs have different row counts: {detail}")
    n = counts.pop() if counts else 0
    if n == 0:
        raise BadRequest("empty batch: the request has 0 rows")
    if n > max_rows:
        raise BadRequest(f"batch of {n} rows exceeds the limit of {max_rows} rows per request (export.max_request_rows)")
    return out


def _check_finite(name: str, arr: np.ndarray) -> None:
    """A continuous input may be NaN (missing: the workflow fills it) but never +-inf, which would
    come out of the model as a NaN score."""
    if arr.dtype.kind == "f":
        inf = np.isinf(arr)
        if inf.any():
            first = int(np.flatnonzero(inf)[0])
            raise BadRequest(f"input '{name}' has {int(inf.sum())} non-finite value(s) (e.g. row {first}: "
                             f"{arr[first]}); send a finite number, or NaN for a missing value")


def _check_magnitude(name: str, arr: np.ndarray) -> None:
    """A finite float input the model's float32 cannot hold (``|x| > 3.4e38``: it would become inf and the
    score NaN) is refused naming the row."""
    with np.errstate(invalid="ignore"):
        big = np.isfinite(arr) & (np.abs(arr) > FLOAT32_MAX)
    if big.any():
        row = int(np.flatnonzero(big)[0])
        raise BadRequest(f"input '{name}' row {row}: {arr[row]!r} is too large for the model's float32 "
                         f"(largest magnitude {FLOAT32_MAX:.4g}); {int(big.sum())} value(s) out of range")


def _check_range(name: str, arr: np.ndarray, bounds: tuple[Optional[float], Optional[float]]) -> None:
    """A value outside the config's declared ``[min, max]`` for the feature is refused naming the row
    (NaN, a missing value, is not: the workflow fills it)."""
    lo, hi = bounds
    if arr.dtype.kind not in "fiu" or not len(arr) or (lo is None and hi is None):
        return
    with np.errstate(invalid="ignore"):
        out = np.zeros(len(arr), dtype=bool)
        if lo is not None:
            out |= arr < lo
        if hi is not None:
            out |= arr > hi
    if out.any():
        row = int(np.flatnonzero(out)[0])
        raise BadRequest(f"input '{name}' row {row}: {arr[row]!r} is outside the range [{lo}, {hi}] the run's "
                         f"config declares for it (columns.features min/max); {int(out.sum())} value(s) out of range")


def _check_string_sizes(name: str, arr: np.ndarray, limit: int) -> None:
    """A string (BYTES) value longer than ``limit`` bytes is refused naming the row."""
    if arr.dtype.kind == "S":
        if arr.dtype.itemsize <= limit:
            return
        lengths = np.char.str_len(arr)
    elif arr.dtype == object and len(arr):
        try:
            if max(map(len, arr)) <= limit:  # the usual case: one C-level pass
                return
        except TypeError:  # a value without a length (not a string): not this check's business
            pass
        lengths = np.fromiter((len(v) if isinstance(v, (bytes, str)) else 0 for v in arr), dtype=np.int64,
                              count=len(arr))
    else:
        return
    if len(lengths) and lengths.max() > limit:
        row = int(np.argmax(lengths))
        raise BadRequest(f"input '{name}' row {row} is {int(lengths[row])} bytes long; the limit is {limit} bytes "
                         f"per value (export.max_string_bytes)")


def check_scores(outputs: Mapping[str, np.ndarray], counts: Optional[list[int]] = None) -> None:
    """Never answer a non-finite score: raise :class:`NonFiniteScores` naming the output and rows.
    ``counts``: rows per request of a batched call (the rows are then named per request)."""
    for name, arr in outputs.items():
        arr = np.asarray(arr)
        if arr.dtype.kind != "f":
            continue
        bad = ~np.isfinite(arr.reshape(len(arr), -1)).all(axis=1) if arr.ndim else ~np.isfinite(arr.reshape(1))
        if bad.any():
            rows = np.flatnonzero(bad)
            raise NonFiniteScores(f"the model computed {int(bad.sum())} non-finite '{name}' value(s) (rows "
                                  f"{rows[:10].tolist()}); no score is answered for this request -- check the "
                                  f"inputs of those rows for extreme values")


class NonFiniteScores(BadRequest):
    """The model's output holds NaN or inf for some rows: refused rather than answered (invalid-argument:
    the finite float32 inputs of those rows are extreme enough to overflow the model)."""


def concat_requests(requests: list[dict[str, np.ndarray]], ragged: set[str]) -> tuple[dict[str, np.ndarray], list[int]]:
    """Several checked requests (from :func:`check_request`) -> one request holding all their rows in
    order, and each request's row count (to split the scores again). A list column's values are
    concatenated and its offsets shifted by the values before them."""
    counts = []
    for arrays in requests:
        col = next(iter(sorted(ragged)), None)
        counts.append(len(arrays[f"{col}__offsets"]) - 1 if col else len(next(iter(arrays.values()))))
    if len(requests) == 1:
        return requests[0], counts
    out: dict[str, np.ndarray] = {}
    for name in requests[0]:
        if name.endswith("__offsets") and name[: -len("__offsets")] in ragged:
            parts, base = [np.zeros(1, dtype=np.int64)], 0
            for arrays in requests:
                offsets = arrays[name].astype(np.int64)
                parts.append(offsets[1:] + base)
                base += int(offsets[-1])
            out[name] = np.concatenate(parts).astype(requests[0][name].dtype)
        else:
            out[name] = np.concatenate([arrays[name] for arrays in requests])
    return out, counts


def split_rows(array: np.ndarray, counts: list[int]) -> list[np.ndarray]:
    """Split a per-row output (first axis = rows of the concatenated requests) back per request."""
    return np.split(array, np.cumsum(counts)[:-1])
