"""Validation of a served request's tensors, before anything reaches NVTabular or TensorFlow.

Triton itself rejects unknown or missing input names and wrong datatypes (against config.pbtxt);
what it cannot know is how the inputs relate: equal row counts, valid ragged offsets, a non-empty
batch within the size limit. Those are checked here, with the offending field named.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np


class BadRequest(ValueError):
    pass


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
