"""What every exported version shares, whatever its family, without TensorFlow, NVTabular or
merlin-systems: the staged version (:class:`StagedVersion`), the export settings (:class:`ExportOptions`)
and raw request rows as Triton hands them over (:func:`raw_to_columns`).

Kept apart from :mod:`pipeline_lib.export.ranking` (which imports merlin-systems and so TensorFlow) so
that a classical version's served model (EASE, item-kNN, session-kNN, sequential rules) starts, and
restarts after a crash, without importing TensorFlow. ``pipeline_lib.export.ranking`` re-exports these
names: code and pickles that refer to them there keep working.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from pipeline_lib.etl.fast_transform import Ragged
from pipeline_lib.validate.requests import DEFAULT_MAX_LIST_LENGTH, DEFAULT_MAX_STRING_BYTES, RequestLimits


@dataclass
class StagedVersion:
    """A complete Triton model repository holding only one exported version (before publishing)."""

    staged_repository: Path
    model_name: str
    version: int

    @property
    def version_dir(self) -> Path:
        return self.staged_repository / self.model_name / str(self.version)

    @property
    def config_path(self) -> Path:
        return self.staged_repository / self.model_name / "config.pbtxt"


@dataclass
class ExportOptions:
    """How a version is exported and checked (``export:`` and ``serving:`` settings of a run)."""

    atol: float = 1e-5                 # parity tolerance, exported/in-process vs offline
    run_info: Optional[dict] = None    # written into the version's run_info.json
    max_request_rows: int = 65536
    fast_transform: bool = True        # compile the workflow for serving (verified, else NVTabular)
    dynamic_batching: Any = None       # a DynamicBatchingConfig (ranking only)
    exclude_seen: bool = True          # top-k: never return the request's own items (session)
    compiled_model: str = "auto"       # serve the model compiled to ONNX where verified equal and faster
    max_string_bytes: int = DEFAULT_MAX_STRING_BYTES
    max_list_length: int = DEFAULT_MAX_LIST_LENGTH
    input_ranges: dict = field(default_factory=dict)  # continuous input -> (min, max) (columns.features)

    @classmethod
    def from_config(cls, cfg, run_info: Optional[dict] = None, exclude_seen: bool = True) -> "ExportOptions":
        """From a ``RunConfig``: its ``export:`` settings, ``serving.dynamic_batching`` and the continuous
        features' declared ``min``/``max`` (served requests outside them are refused)."""
        ranges = {f.name: (f.min, f.max) for f in cfg.columns.features if f.min is not None or f.max is not None}
        return cls(cfg.export.parity_atol, run_info, cfg.export.max_request_rows, cfg.export.fast_transform,
                   cfg.serving.dynamic_batching, exclude_seen, cfg.export.compiled_model,
                   cfg.export.max_string_bytes, cfg.export.max_list_length, ranges)

    def limits(self) -> RequestLimits:
        """What a served request of the version may carry (config.pbtxt parameters)."""
        return RequestLimits(self.max_request_rows, self.max_string_bytes, self.max_list_length,
                             dict(self.input_ranges))


def raw_to_columns(raw: pd.DataFrame) -> dict:
    """Raw rows -> the fast transform's input columns, as Triton hands them over (bytes strings,
    lists as values + offsets)."""

    return {k: (Ragged(*v) if isinstance(v, tuple) else v) for k, v in raw_columns(raw).items()}


def raw_columns(raw: pd.DataFrame) -> dict:
    cols: dict[str, Any] = {}
    for name in raw.columns:
        s = raw[name]
        if s.dtype == object and len(s) and isinstance(s.iloc[0], (list, tuple, np.ndarray)):
            lengths = s.map(len).to_numpy()
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            values = np.concatenate([np.asarray(v) for v in s if len(v)]) if lengths.sum() else np.array([], dtype=np.int64)
            if values.dtype.kind in "OU":  # string lists travel as BYTES too
                values = np.array([v.encode("utf-8") if isinstance(v, str) else v for v in values], dtype=object)
            cols[name] = (values, offsets)
        elif s.dtype == object:
            # Triton delivers BYTES inputs as bytes objects: reproduce that here.
            cols[name] = np.array([v.encode("utf-8") if isinstance(v, str) else v for v in s], dtype=object)
        else:
            cols[name] = s.to_numpy()
    return cols
