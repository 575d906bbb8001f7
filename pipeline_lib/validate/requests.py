"""Validation of a served request's tensors, before anything reaches NVTabular or TensorFlow.

Triton itself rejects unknown or missing input names and wrong datatypes (against config.pbtxt);
what it cannot know is how the inputs relate: equal row counts, valid ragged offsets, a non-empty
batch within the size limit, and finite float inputs (``inf`` in a continuous feature; NaN is a
missing value, filled by the workflow). Those are checked here, with the offending field named.

:func:`error_response` turns an exception of a served model into Triton's error response: a
:class:`BadRequest` as invalid-argument (HTTP 400, gRPC ``INVALID_ARGUMENT``), anything else as
internal (HTTP 500, gRPC ``INTERNAL``), so clients and load balancers can tell the two apart.
"""
from __future__ import annotations

from pathlib import Path
from typing import Callable, Collection, Mapping, Optional

import numpy as np

DEFAULT_MAX_ROWS = 65536


class BadRequest(ValueError):
    """The request itself is wrong (the client's fault): answered as invalid-argument / HTTP 400."""


def error_response(pb_utils, exc: BaseException):
    """Triton's error response for an exception raised while serving one request.

    ``pb_utils`` is the python backend's ``triton_python_backend_utils`` module (passed in: this
    module is imported outside Triton too). A :class:`BadRequest` is answered as
    ``"bad request: ..."`` with the ``INVALID_ARG`` code (HTTP 400, gRPC ``INVALID_ARGUMENT``); any
    other exception as ``"inference failed: <type>: ..."`` (one line, at most 2000 characters; the
    caller logs the traceback) with the ``INTERNAL`` code (HTTP 500, gRPC ``INTERNAL``). A python
    backend without error codes (before 23.03) gets a plain ``TritonError``, which is INTERNAL.
    """
    if isinstance(exc, BadRequest):
        message, code_name = f"bad request: {exc}", "INVALID_ARG"
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


def max_request_rows(config: Mapping) -> int:
    """The ``max_request_rows`` parameter of a model's config (export writes it)."""
    params = config.get("parameters", {})
    return int(params.get("max_request_rows", {}).get("string_value", DEFAULT_MAX_ROWS))


def check_request(arrays: Mapping[str, np.ndarray], ragged: set[str], max_rows: int) -> dict[str, np.ndarray]:
    """Check and normalise the input tensors of one request; return them as 1-D arrays.

    ``arrays`` maps tensor names (``col`` or ``col__values``/``col__offsets`` for the ragged
    columns listed in ``ragged``) to numpy arrays.
    """
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
    for name, arr in out.items():
        if not name.endswith(("__values", "__offsets")):
            rows[name] = len(arr)
            _check_finite(name, arr)
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
