"""Stage 2 -- raw -> validated: check the raw table against the run's column roles.

Every problem is collected first and reported together in one :class:`DataValidationError`
(file, column, count, an example value), so a user fixes their data in one pass.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline_lib.config import ColumnsConfig, FeatureKind


@dataclass
class Problem:
    file: str
    column: str
    issue: str
    count: int = 0
    example: object = None

    def __str__(self) -> str:
        ex = "" if self.example is None else f" (e.g. {self.example!r})"
        cnt = f" [{self.count} rows]" if self.count else ""
        return f"{self.file}: column '{self.column}': {self.issue}{cnt}{ex}"


class DataValidationError(ValueError):
    def __init__(self, problems: list[Problem]):
        self.problems = problems
        lines = "\n  - ".join(str(p) for p in problems)
        super().__init__(f"raw data failed validation ({len(problems)} problem(s)):\n  - {lines}")


@dataclass
class ValidationReport:
    path: Path
    n_rows: int
    stats: dict = field(default_factory=dict)

    def save(self, out: Path) -> Path:
        out.write_text(json.dumps({"path": str(self.path), "n_rows": self.n_rows, "columns": self.stats}, indent=2))
        return out


def validate_raw(path: Path, columns: ColumnsConfig) -> ValidationReport:
    """Validate the raw parquet table at ``path``; raise DataValidationError listing all problems."""
    fname = str(path)
    try:
        df = pd.read_parquet(path)
    except Exception as exc:
        raise DataValidationError([Problem(fname, "*", f"file not readable: {exc}")]) from exc

    problems: list[Problem] = []
    if len(df) == 0:
        problems.append(Problem(fname, "*", "table has no rows"))

    required = list(columns.input_columns)
    if columns.timestamp:
        required.append(columns.timestamp)
    for col in required:
        if col not in df.columns:
            problems.append(Problem(fname, col, "required column is missing", example=sorted(df.columns)[:10]))

    def present(c: str) -> bool:
        return c in df.columns

    for c in (columns.user_id, columns.item_id):
        if present(c) and df[c].isna().any():
            bad = df[c].isna()
            problems.append(Problem(fname, c, "id column has nulls", int(bad.sum())))

    lab = columns.label
    if present(lab):
        vals = pd.to_numeric(df[lab], errors="coerce")
        bad = ~vals.isin([0, 1])
        if bad.any():
            problems.append(
                Problem(fname, lab, "label must be binary 0/1", int(bad.sum()), df.loc[bad, lab].iloc[0])
            )

    for f in columns.of_kind(FeatureKind.continuous):
        if present(f.name):
            vals = pd.to_numeric(df[f.name], errors="coerce")
            bad = vals.isna() & df[f.name].notna()
            if bad.any():
                problems.append(
                    Problem(fname, f.name, "continuous value not castable to float", int(bad.sum()), df.loc[bad, f.name].iloc[0])
                )
            if f.log and (vals < 0).any():
                neg = vals < 0
                problems.append(Problem(fname, f.name, "log transform needs values >= 0", int(neg.sum()), vals[neg].iloc[0]))

    for f in columns.of_kind(FeatureKind.list):
        if present(f.name):
            bad = ~df[f.name].map(lambda v: v is None or isinstance(v, (list, tuple, np.ndarray)))
            if bad.any():
                problems.append(
                    Problem(fname, f.name, "list feature must hold lists", int(bad.sum()), df.loc[bad, f.name].iloc[0])
                )

    if problems:
        raise DataValidationError(problems)

    stats = {}
    for col in required:
        s = df[col]
        entry = {"dtype": str(s.dtype), "null_rate": float(s.isna().mean())}
        if pd.api.types.is_numeric_dtype(s):
            entry.update(mean=float(s.mean()), std=float(s.std()), min=float(s.min()), max=float(s.max()))
        if s.dtype == object and len(s) and isinstance(s.iloc[0], (list, np.ndarray)):
            entry["mean_length"] = float(s.map(len).mean())
        else:
            entry["cardinality"] = int(s.nunique())
        stats[col] = entry
    return ValidationReport(path=path, n_rows=len(df), stats=stats)
