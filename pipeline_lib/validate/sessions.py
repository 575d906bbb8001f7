"""Stage 2 -- validation of a raw session event log (required columns, ids, timestamps; statistics for drift).
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from pipeline_lib.config import SessionColumns
from pipeline_lib.errors import DataValidationError, Problem

def validate_events(path: Path, cols: SessionColumns, out_dir: Path) -> Path:
    """Required columns, ids without nulls, numeric timestamps; statistics to ``stats.json``
    (the same layout as the ranking validation, so the drift report reads it)."""
    df = pd.read_parquet(path)
    problems: list[Problem] = []
    where = str(path)
    if len(df) == 0:
        problems.append(Problem(where, "*", "table has no rows"))
    side = Path(path).parent / "load_report.json"  # columns of the user's files the raw stage ignored
    ignored = json.loads(side.read_text()).get("ignored_columns", {}) if side.is_file() else {}
    in_files = sorted({str(c) for c in df.columns} | {str(c) for v in ignored.values() for c in v})
    for c in cols.raw_columns:
        if c not in df.columns:
            problems.append(Problem(where, c, "required column is missing", example=in_files[:10]))
    for c in (cols.session_id, cols.item_id, cols.timestamp):
        if c in df.columns and df[c].isna().any():
            problems.append(Problem(where, c, "column has nulls", int(df[c].isna().sum())))
    if cols.timestamp in df.columns and not pd.api.types.is_numeric_dtype(df[cols.timestamp]):
        problems.append(Problem(where, cols.timestamp, "timestamp not numeric (epoch seconds) or a date"))
    if problems:
        raise DataValidationError(problems)
    stats = {}
    for c in cols.raw_columns:
        s = df[c]
        kind = "id" if c in (cols.session_id, cols.item_id) else "timestamp" if c == cols.timestamp else "categorical"
        entry = {"kind": kind, "dtype": str(s.dtype), "null_rate": float(s.isna().mean()), "cardinality": int(s.nunique())}
        if pd.api.types.is_numeric_dtype(s):
            entry.update(mean=float(s.mean()), std=float(s.std()), min=float(s.min()), max=float(s.max()))
        stats[c] = entry
    lengths = df.groupby(cols.session_id).size()
    stats["_session_length"] = {"kind": "list", "dtype": "int64", "null_rate": 0.0, "cardinality": int(lengths.nunique()),
                                "mean_length": float(lengths.mean()), "std_length": float(lengths.std())}
    out_dir.mkdir(parents=True, exist_ok=True)
    p = out_dir / "stats.json"
    p.write_text(json.dumps({"path": str(path), "n_rows": len(df), "n_sessions": int(len(lengths)),
                             "columns": stats, "warnings": [], "sources": {}}, indent=2))
    return p


# --- grouping workflow (events -> sessions) -----------------------------------------------------


