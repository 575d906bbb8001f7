"""Stage 2 -- raw -> validated: check the raw table against the run's column roles.

Every problem is collected first and reported together in one :class:`DataValidationError`
(file, column, count, an example value), so a user fixes their data in one pass. Checks:
required columns present, ids without nulls, label binary, continuous values castable to float,
finite (``inf``/``-inf`` are problems; a missing value is a null, filled with the training median by
the ETL) and within ``min``/``max``, lists holding lists, categoricals holding scalars, timestamp numeric
or a date, null rates within ``max_null_rate``, and ids matched by the user/item tables.

Each run's statistics are saved (``validated/stats.json``); :func:`compute_drift` compares them
with the previous run's (null rate, cardinality, mean/std shift) against configured thresholds.
"""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import pandas as pd

from pipeline_lib.config import ColumnsConfig, DriftConfig, FeatureKind, ValidationConfig
from pipeline_lib.errors import DataValidationError, Problem  # also re-exported: raised by validate_raw


@dataclass
class ValidationReport:
    path: Path
    n_rows: int
    stats: dict = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    sources: dict = field(default_factory=dict)

    def save(self, out: Path) -> Path:
        out.write_text(json.dumps({"path": str(self.path), "n_rows": self.n_rows, "files": self.sources,
                                   "warnings": self.warnings, "columns": self.stats}, indent=2, default=str))
        return out


def _ex(s: pd.Series):
    v = s.iloc[0] if len(s) else None
    if isinstance(v, np.generic):
        return v.item()
    if isinstance(v, np.ndarray):
        return v.tolist()
    return v


def _ignored_columns(load_report: dict) -> set[str]:
    """Columns of the user's files that the raw stage dropped as unused (``ignored_columns``)."""
    return {str(c) for cols in load_report.get("ignored_columns", {}).values() for c in cols}


def validate_raw(
    path: Path,
    columns: ColumnsConfig,
    validation: Optional[ValidationConfig] = None,
    load_report: Optional[dict] = None,
) -> ValidationReport:
    """Validate the raw parquet table at ``path``; raise DataValidationError listing all problems.

    ``load_report`` (default: ``load_report.json`` beside ``path``, written by the raw stage)
    says which user file each column came from -- problems name that file -- and which ids the
    user/item tables did not match (an error or a warning per ``validation.unmatched_ids``).
    """
    validation = validation or ValidationConfig()
    if load_report is None:
        side = Path(path).parent / "load_report.json"
        load_report = json.loads(side.read_text()) if side.is_file() else {}
    origin = _Origin(load_report, path)
    try:
        df = pd.read_parquet(path)
    except Exception as exc:
        raise DataValidationError([Problem(str(path), "*", f"file not readable: {exc}")]) from exc

    problems, warnings = _unmatched_ids(load_report, validation.unmatched_ids == "error")
    if len(df) == 0:
        problems.insert(0, Problem(origin.all_files, "*", "table has no rows"))
    required = list(columns.input_columns) + ([columns.timestamp] if columns.timestamp else [])
    # the raw stage keeps only the columns the config uses; what it ignored is the likely typo
    in_files = sorted({str(c) for c in df.columns} | _ignored_columns(load_report))
    problems += [Problem(origin.all_files, col, "required column is missing", example=in_files[:10])
                 for col in required if col not in df.columns]
    for check in (_id_and_label_problems, _timestamp_problems, _continuous_problems, _shape_problems):
        problems += check(df, columns, origin.where)
    problems += _null_rate_problems(df, columns, validation, origin.where)
    if problems:
        raise DataValidationError(problems)
    return ValidationReport(path=path, n_rows=len(df), stats=column_stats(df, columns, required), warnings=warnings,
                            sources=load_report.get("files", {}))


class _Origin:
    """Which user file a column came from (the load report's ``column_sources``), for problems."""

    def __init__(self, load_report: dict, path: Path):
        self.sources: dict = load_report.get("column_sources", {})
        self.files = sorted(set(load_report.get("files", {}).values())) or [str(path)]
        self.all_files = ", ".join(self.files)

    def where(self, col: str) -> str:
        return self.sources.get(col, self.all_files if len(self.files) > 1 else self.files[0])


def _unmatched_ids(load_report: dict, as_errors: bool) -> tuple[list[Problem], list[str]]:
    """Ids of the interactions that the user/item tables did not match: problems or warnings."""
    problems, warnings = [], []
    for u in load_report.get("unmatched", []):
        p = Problem(u["file"], u["column"], f"{u['distinct_ids']} id(s) used in the interactions have no row in the "
                    f"{u['table']} table (their {u['table'][:-1]} features are null)", u["rows"], u["example"])
        if as_errors:
            problems.append(p)
        else:
            warnings.append(str(p))
    return problems, warnings


def _flag(where: str, col: str, message: str, bad: pd.Series, values: pd.Series) -> list[Problem]:
    """One problem when any row of ``bad`` is set: its count and the first offending value."""
    return [Problem(where, col, message, int(bad.sum()), _ex(values[bad]))] if bad.any() else []


def _id_and_label_problems(df: pd.DataFrame, columns: ColumnsConfig, where: Callable[[str], str]) -> list[Problem]:
    out = []
    for c in (columns.user_id, columns.item_id):
        if c in df.columns and df[c].isna().any():
            out.append(Problem(where(c), c, "id column has nulls", int(df[c].isna().sum())))
    lab = columns.label
    if lab in df.columns:
        out += _flag(where(lab), lab, "label must be binary 0/1", ~pd.to_numeric(df[lab], errors="coerce").isin([0, 1]),
                     df[lab])
    return out


def _timestamp_problems(df: pd.DataFrame, columns: ColumnsConfig, where: Callable[[str], str]) -> list[Problem]:
    ts = columns.timestamp
    if not ts or ts not in df.columns:
        return []
    s = df[ts]
    if pd.api.types.is_numeric_dtype(s) or pd.api.types.is_datetime64_any_dtype(s):
        return []
    as_date = pd.to_datetime(s, errors="coerce", utc=True) if s.dtype == object else s.isna()
    bad = pd.to_numeric(s, errors="coerce").isna() & pd.Series(as_date, index=s.index).isna() & s.notna()
    return [Problem(where(ts), ts, "timestamp not castable to a number or a date", int(bad.sum()),
                    _ex(s[bad]) if bad.any() else _ex(s))]


def _continuous_problems(df: pd.DataFrame, columns: ColumnsConfig, where: Callable[[str], str]) -> list[Problem]:
    out = []
    for f in columns.of_kind(FeatureKind.continuous):
        if f.name not in df.columns:
            continue
        w, raw = where(f.name), df[f.name]
        vals = pd.to_numeric(raw, errors="coerce")
        out += _flag(w, f.name, "continuous value not castable to float", vals.isna() & raw.notna(), raw)
        inf = pd.Series(np.isinf(vals.to_numpy(dtype=np.float64)), index=vals.index)
        out += _flag(w, f.name, "continuous value is not finite (inf or -inf; a missing value must be null)", inf, vals)
        if f.log:
            out += _flag(w, f.name, "log transform needs values >= 0", vals < 0, vals)
        if f.min is not None:
            out += _flag(w, f.name, f"value below min {f.min:g}", vals < f.min, vals)
        if f.max is not None:
            out += _flag(w, f.name, f"value above max {f.max:g}", vals > f.max, vals)
    return out


def _is_list(v) -> bool:
    return isinstance(v, (list, tuple, np.ndarray))


def _shape_problems(df: pd.DataFrame, columns: ColumnsConfig, where: Callable[[str], str]) -> list[Problem]:
    """List features holding lists (or nulls), categoricals holding single values."""
    out = []
    for f in columns.of_kind(FeatureKind.list):
        if f.name in df.columns:
            hint = "" if f.separator else " (a separator-joined string needs 'separator:' on the feature)"
            bad = ~df[f.name].map(lambda v: v is None or _is_list(v))
            out += _flag(where(f.name), f.name, f"list feature must hold lists{hint}", bad, df[f.name])
    for f in columns.of_kind(FeatureKind.categorical):
        if f.name in df.columns and df[f.name].dtype == object:
            bad = df[f.name].map(lambda v: isinstance(v, (list, tuple, dict, np.ndarray)))
            out += _flag(where(f.name), f.name, "categorical value must be a single value, not a list", bad, df[f.name])
    return out


def _null_rate_problems(df: pd.DataFrame, columns: ColumnsConfig, validation: ValidationConfig,
                        where: Callable[[str], str]) -> list[Problem]:
    out = []
    for f in columns.features:
        bound = f.max_null_rate if f.max_null_rate is not None else validation.max_null_rate
        if bound is None or f.name not in df.columns or not len(df):
            continue
        nulls = df[f.name].isna()
        if f.kind == FeatureKind.list:
            nulls = nulls | df[f.name].map(lambda v: _is_list(v) and len(v) == 0)
        rate = float(nulls.mean())
        if rate > bound:
            first = int(np.flatnonzero(nulls.to_numpy())[0])
            out.append(Problem(where(f.name), f.name, f"null rate {rate:.3f} above max_null_rate {bound:g}",
                               int(nulls.sum()), f"row {first}"))
    return out


def column_stats(df: pd.DataFrame, columns: ColumnsConfig, names: list[str]) -> dict:
    """Per column of ``names``: kind, dtype, null rate, mean/std/min/max (numeric), cardinality and,
    for list columns, the mean/std list length (``validated/stats.json``, compared by drift)."""
    kinds = {columns.user_id: "id", columns.item_id: "id", columns.label: "label"}
    kinds.update({f.name: f.kind.value for f in columns.features})
    if columns.timestamp:
        kinds[columns.timestamp] = "timestamp"
    stats = {}
    for col in names:
        s = df[col]
        entry = {"kind": kinds.get(col, "other"), "dtype": str(s.dtype), "null_rate": float(s.isna().mean())}
        if pd.api.types.is_numeric_dtype(s):
            entry.update(mean=float(s.mean()), std=float(s.std()), min=float(s.min()), max=float(s.max()))
        if s.dtype == object and len(s) and _is_list(s.dropna().iloc[0] if s.notna().any() else None):
            lengths = s.map(lambda v: len(v) if _is_list(v) else 0)
            entry.update(mean_length=float(lengths.mean()), std_length=float(lengths.std()),
                         cardinality=int(pd.Series([t for v in s.dropna() for t in v]).nunique()))
        else:
            entry["cardinality"] = int(s.nunique())
        stats[col] = entry
    return stats


# --- drift against the previous run -----------------------------------------------------------


@dataclass
class DriftFinding:
    column: str
    metric: str
    previous: object
    current: object
    change: float
    threshold: float

    def __str__(self) -> str:
        return (f"column '{self.column}': {self.metric} {self.previous!r} -> {self.current!r} "
                f"(change {self.change:.3g} > {self.threshold:g})")


def find_previous_stats(runs_dir: Path, current_run: Optional[Path] = None) -> Optional[Path]:
    """The newest ``<runs_dir>/<run>/validated/stats.json`` of a run other than ``current_run``."""
    runs_dir = Path(runs_dir)
    if not runs_dir.is_dir():
        return None
    current = Path(current_run).resolve() if current_run else None
    found = [p for p in runs_dir.glob("*/validated/stats.json") if p.parent.parent.resolve() != current]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


def compute_drift(current: dict, previous: dict, cfg: DriftConfig) -> list[DriftFinding]:
    """Compare two stats.json contents (``{"columns": {...}}``); return what moved past the thresholds.

    Per column: absolute null-rate change; relative cardinality change (ids, categoricals,
    lists); mean shift in previous standard deviations and relative std change (continuous,
    label; mean list length for lists). Columns appearing or disappearing are findings too.
    """
    cur, prev = current.get("columns", {}), previous.get("columns", {})
    out: list[DriftFinding] = []
    for col in sorted(set(prev) - set(cur)):
        out.append(DriftFinding(col, "column removed", "present", "absent", 1.0, 0.0))
    for col in sorted(set(cur) - set(prev)):
        out.append(DriftFinding(col, "column added", "absent", "present", 1.0, 0.0))
    for col in [c for c in cur if c in prev]:
        a, b = prev[col], cur[col]
        kind = b.get("kind", "other")
        d = abs(b["null_rate"] - a["null_rate"])
        if d > cfg.max_null_rate_change:
            out.append(DriftFinding(col, "null_rate", round(a["null_rate"], 4), round(b["null_rate"], 4), d, cfg.max_null_rate_change))
        if kind in ("id", "categorical", "list") and "cardinality" in a and "cardinality" in b:
            rel = abs(b["cardinality"] - a["cardinality"]) / max(a["cardinality"], 1)
            if rel > cfg.max_cardinality_change:
                out.append(DriftFinding(col, "cardinality", a["cardinality"], b["cardinality"], rel, cfg.max_cardinality_change))
        keys = {"continuous": ("mean", "std"), "label": ("mean", "std"), "list": ("mean_length", "std_length")}.get(kind)
        if keys and all(k in a and k in b for k in keys):
            m, sd = keys
            scale = a[sd] if a[sd] and np.isfinite(a[sd]) and a[sd] > 0 else max(abs(a[m]), 1.0)
            shift = abs(b[m] - a[m]) / scale
            if shift > cfg.max_mean_shift:
                out.append(DriftFinding(col, m, round(a[m], 4), round(b[m], 4), shift, cfg.max_mean_shift))
            if a[sd] and np.isfinite(a[sd]) and np.isfinite(b[sd]):
                rel = abs(b[sd] - a[sd]) / a[sd]
                if rel > cfg.max_std_change:
                    out.append(DriftFinding(col, sd, round(a[sd], 4), round(b[sd], 4), rel, cfg.max_std_change))
    return out


def drift_report(stats_path: Path, runs_dir: Path, run_root: Path, cfg: DriftConfig, out: Path) -> dict:
    """Compare ``stats_path`` with the previous run's stats and write the findings to ``out`` (drift.json)."""
    prev_path = find_previous_stats(runs_dir, run_root) if cfg.enabled else None
    findings: list[DriftFinding] = []
    if prev_path is not None:
        findings = compute_drift(json.loads(Path(stats_path).read_text()), json.loads(prev_path.read_text()), cfg)
    report = {
        "enabled": cfg.enabled,
        "previous": str(prev_path) if prev_path else None,
        "drifted": bool(findings),
        "thresholds": cfg.model_dump(),
        "findings": [asdict(f) | {"message": str(f)} for f in findings],
    }
    out.write_text(json.dumps(report, indent=2, default=str))
    return report


def drift_markdown(report: dict) -> str:
    """The drift report as markdown (published as the ``data-drift`` artifact)."""
    lines = ["# Data drift against the previous run", ""]
    if not report["enabled"]:
        return "\n".join(lines + ["Drift check disabled (validation.drift.enabled: false)."])
    if report["previous"] is None:
        return "\n".join(lines + ["No previous run with `validated/stats.json` under runs_dir: nothing to compare."])
    lines.append(f"Compared with `{report['previous']}`.")
    lines.append("")
    if not report["drifted"]:
        return "\n".join(lines + ["No column moved past the thresholds."])
    lines += [f"**{len(report['findings'])} finding(s)**", "", "| column | metric | previous | current | change | threshold |",
              "|---|---|---|---|---|---|"]
    lines += [f"| {f['column']} | {f['metric']} | {f['previous']} | {f['current']} | {f['change']:.3g} | {f['threshold']:g} |"
              for f in report["findings"]]
    return "\n".join(lines)
