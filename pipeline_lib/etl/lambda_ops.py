"""The functions the pipeline's NVTabular workflows run in ``LambdaOp`` s.

Module-level (picklable: a fitted workflow refers to them by module and name) and below every other
ETL module: the workflows (:mod:`~pipeline_lib.etl.workflow`, :mod:`~pipeline_lib.etl.sessions`)
use them, and the compiled transform (:mod:`~pipeline_lib.etl.fast_transform`) recognises them by
identity without importing the workflow modules. ``etl.workflow.to_float32`` and
``etl.sessions.time_deltas`` remain importable under those names, so workflows pickled before they
moved here still load.
"""
from __future__ import annotations

import numpy as np


def to_float32(col):
    """Models take float32; NVTabular's Normalize emits float64 (module-level: picklable)."""
    return col.astype("float32")


def time_deltas(col):
    """Per session: log1p(seconds since the previous event); 0 for the first (module-level: picklable)."""
    def one(v):
        a = np.asarray(v, dtype=np.float64)
        if not len(a):
            return np.zeros(0, dtype=np.float32)
        d = np.diff(a, prepend=a[0])
        return np.log1p(np.clip(d, 0.0, None)).astype(np.float32)

    if hasattr(col, "list"):  # cudf
        return col.to_pandas().map(one)
    return col.map(one)
