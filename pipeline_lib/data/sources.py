"""Stage 1 -- raw data: reading the user's files into one interactions table.

Files brought by the user (``source: parquet | files | movielens100k``) are read, joined and
normalised here into the same single denormalised table (``raw/interactions.parquet``) the
synthetic generator (:mod:`pipeline_lib.data.sources.synthetic`) writes:
optional user/item feature tables are left-joined on the id columns, separator-joined list
strings become lists, the label is derived by ``columns.label_rule`` and stored as int 0/1.
Only the columns the config uses are kept (:func:`needed_columns`: ids, label or the label
rule's column, timestamp, features; for ``task: session`` the session columns): every other
column of a file -- an unnamed index column written by ``DataFrame.to_csv``, notes, anything
unused -- is dropped right after the file is read (parquet: not read at all), logged at INFO and
listed per file under ``ignored_columns`` in the load report, so only used columns can clash
in the join.
Anything that prevents building that table (missing or unreadable file, missing key column,
duplicate ids in a feature table, a label rule on a missing or non-numeric column) is
collected and raised together as one :class:`~pipeline_lib.errors.DataValidationError`.
What the join found (unmatched ids) and which file each column came from go to
``raw/load_report.json``, read by the validation stage.
"""
from __future__ import annotations

import json
import logging
import operator
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Optional

import fsspec
import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from pipeline_lib.config import ColumnsConfig, DataConfig, FeatureKind, TableConfig
from pipeline_lib.data.synthetic import generate_interactions
from pipeline_lib.errors import DataValidationError, Problem

log = logging.getLogger(__name__)

LOAD_REPORT = "load_report.json"

_OPS = {">=": operator.ge, ">": operator.gt, "<=": operator.le, "<": operator.lt, "==": operator.eq, "!=": operator.ne}


@dataclass
class Table:
    """One table read from the user's files: ``role`` is interactions, users or items."""

    role: str
    file: str
    df: pd.DataFrame
    file_columns: Optional[list[str]] = None  # every column of the file (after rename:), kept or not
    ignored: tuple[str, ...] = ()  # columns of the file the config does not use (dropped)

    @property
    def all_columns(self) -> list[str]:
        return list(self.file_columns) if self.file_columns is not None else list(self.df.columns)


def needed_columns(columns: ColumnsConfig) -> list[str]:
    """The columns a ranking run reads from the user's files (names after ``rename:``).

    Ids, timestamp, every declared feature, and the label -- or, with ``label_rule``, the column
    the rule reads (the label is then derived, so a file's own label column is not needed).
    """
    rule = columns.label_rule_parsed
    names = [columns.user_id, columns.item_id]
    if columns.timestamp:
        names.append(columns.timestamp)
    names.append(rule[0] if rule else columns.label)
    names += [f.name for f in columns.features]
    return list(dict.fromkeys(names))


def keep_only(table: Table, keep: Iterable[str]) -> Table:
    """Drop the columns of ``table`` that are not in ``keep``; log (INFO) which were ignored."""
    keep = set(keep)
    all_cols = table.all_columns
    ignored = tuple(str(c) for c in all_cols if c not in keep)
    if ignored:
        log.info("%s: ignoring %d column(s) the config does not use: %s", table.file, len(ignored), list(ignored))
    df = table.df.loc[:, [c in keep for c in table.df.columns]]
    return Table(table.role, table.file, df, all_cols, ignored)


def write_raw(cfg: DataConfig, seed: int, out_dir: Path, columns: Optional[ColumnsConfig] = None) -> Path:
    """Materialise the run's raw interaction table as ``out_dir/interactions.parquet``.

    ``synthetic`` generates it; the file sources read the user's files and normalise them with
    the column roles (``columns``, default ``ColumnsConfig()``), so every run keeps the exact
    input it used. Also writes ``out_dir/load_report.json`` (column -> source file, join results).
    """
    columns = columns or ColumnsConfig()
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "interactions.parquet"
    report: dict = {"source": cfg.source, "files": {}, "column_sources": {}, "unmatched": []}
    if cfg.source == "synthetic":
        df = generate_interactions(cfg.synthetic, seed)
    else:
        df = build_raw(load_tables(cfg, needed_columns(columns)), columns, report)
    df.to_parquet(out, index=False)
    (out_dir / LOAD_REPORT).write_text(json.dumps(report, indent=2, default=str))
    return out


def read_load_report(raw_path: Path) -> dict:
    """The load report written beside a raw table (empty when there is none)."""
    p = Path(raw_path).parent / LOAD_REPORT
    return json.loads(p.read_text()) if p.is_file() else {}


# --- reading files ----------------------------------------------------------------------


def load_tables(cfg: DataConfig, keep: Optional[Iterable[str]] = None) -> list[Table]:
    """Read every input table of a file source; all unreadable/missing files in one error.

    With ``keep`` (column names after ``rename:``, e.g. :func:`needed_columns`), each table holds
    only the columns of ``keep`` that its file has; the rest are ignored (see :func:`keep_only`).
    """
    keep = list(keep) if keep is not None else None
    if cfg.source == "movielens100k":
        tables = load_movielens100k(cfg.path)
        return tables if keep is None else [keep_only(t, keep) for t in tables]
    if cfg.source == "parquet":
        specs = [("interactions", TableConfig(path=cfg.path, format="parquet"))]
    else:
        specs = [(role, t) for role, t in (("interactions", cfg.interactions), ("users", cfg.users), ("items", cfg.items)) if t]
    tables, problems = [], []
    for role, spec in specs:
        try:
            tables.append(read_table(role, spec, keep))
        except DataValidationError as exc:
            problems += exc.problems
    if problems:
        raise DataValidationError(problems)
    return tables


def read_table_file(spec: TableConfig, keep: Optional[Iterable[str]] = None) -> pd.DataFrame:
    """Read one CSV/parquet file (local path or fsspec URL); a clear error when it cannot be.

    ``keep``: only these columns (names after ``rename:``) are returned; None returns all.
    """
    return read_table("table", spec, keep).df


def read_table(role: str, spec: TableConfig, keep: Optional[Iterable[str]] = None) -> Table:
    """Read one file into a :class:`Table`, keeping only the columns in ``keep`` (None: all).

    CSV files are parsed whole (pandas' ``usecols`` would silently accept a row with too many
    fields) and the unused columns dropped at once; parquet files read only the kept columns
    when their schema can be read first.
    """
    path = spec.path
    fmt = spec.resolved_format
    keep = set(keep) if keep is not None else None
    if not _exists(path):
        raise DataValidationError([Problem(path, "*", "file not found")])
    file_columns = None  # parquet read with a column selection: every column of its schema
    try:
        if fmt == "csv":
            df = _read_csv(path, spec)
        elif fmt == "json":
            df = _read_json(path, spec.encoding)
            if spec.names:
                df.columns = spec.names
        else:
            schema = _parquet_columns(path) if keep is not None and not spec.names else None
            if schema is not None:
                file_columns = schema
                df = pd.read_parquet(path, columns=[c for c in schema if spec.rename.get(c, c) in keep])  # type: ignore[operator]
            else:
                df = pd.read_parquet(path)
            if spec.names:
                df.columns = spec.names
    except Exception as exc:  # parser, decoding and arrow errors come in many types
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        raise DataValidationError([Problem(path, "*", f"file not readable as {fmt}: {type(exc).__name__}: {first}")]) from exc
    file_columns = file_columns if file_columns is not None else list(df.columns)
    if spec.rename:
        missing = [k for k in spec.rename if k not in file_columns]
        if missing:
            raise DataValidationError(
                [Problem(path, k, "rename: column not in the file", example=list(file_columns)[:10]) for k in missing]
            )
        df = df.rename(columns=spec.rename)
        file_columns = [spec.rename.get(c, c) for c in file_columns]
    table = Table(role, path, df, file_columns)
    return table if keep is None else keep_only(table, keep)


def _read_csv(path: str, spec: TableConfig) -> pd.DataFrame:
    """A CSV file in the dialect ``spec`` gives; a separator of several characters is literal (pandas would
    read it as a regular expression, on its python engine: slower, but the C engine takes one character)."""
    sep = spec.sep or ("\t" if ".tsv" in path.lower().rsplit("/", 1)[-1] else ",")
    literal = {"sep": re.escape(sep), "engine": "python"} if len(sep) > 1 else {"sep": sep}
    return pd.read_csv(path, encoding=spec.encoding, header=0 if spec.header else None, names=spec.names,
                       skipinitialspace=True, **literal)


def _read_json(path: str, encoding: str) -> pd.DataFrame:
    """JSON Lines (one object per line, as large public logs ship), or one JSON array of objects; compressed
    files by their extension. Nested objects stay Python objects (a column a config does not use is dropped)."""
    with fsspec.open(path, "rt", encoding=encoding, compression="infer") as f:
        head = f.read(4096).lstrip()
    return pd.read_json(path, lines=not head.startswith("["), encoding=encoding, compression="infer",
                        convert_dates=False, dtype=False)


def _parquet_columns(path: str) -> Optional[list[str]]:
    """Column names of a parquet file or directory (partition columns included) without reading
    its data; None when the schema cannot be read this way (the caller then reads everything)."""
    try:
        fs, root = fsspec.core.url_to_fs(path)
        names = pq.ParquetDataset(root, filesystem=fs).schema.names
        return [c for c in names if not re.fullmatch(r"__index_level_\d+__", c)]  # pandas' stored index
    except Exception:  # noqa: BLE001 -- any failure: fall back to a full read, which reports real errors
        log.debug("%s: parquet schema not readable ahead; reading every column", path, exc_info=True)
        return None


def _exists(path: str) -> bool:
    if "://" not in path:
        return Path(path).exists()
    try:
        fs, _, paths = fsspec.get_fs_token_paths(path)
        return bool(paths) and fs.exists(paths[0])
    except Exception:  # unknown protocol, no credentials...: let the reader produce the error
        return True


# --- joining and normalising ----------------------------------------------------------------


def build_raw(tables: list[Table], columns: ColumnsConfig, report: Optional[dict] = None) -> pd.DataFrame:
    """Join the feature tables onto the interactions and normalise lists, timestamp and label.

    Raises DataValidationError (every problem at once) when the table cannot be built;
    records column sources and unmatched join ids in ``report``.
    """
    report = report if report is not None else {}
    report.setdefault("files", {})
    report.setdefault("unmatched", [])
    sources: dict[str, str] = report.setdefault("column_sources", {})
    ignored = {t.file: list(t.ignored) for t in tables if t.ignored}
    if ignored:
        report["ignored_columns"] = ignored
    problems: list[Problem] = []
    inter = next(t for t in tables if t.role == "interactions")
    df = inter.df.copy()
    report["files"]["interactions"] = inter.file
    for c in df.columns:
        sources[str(c)] = inter.file
    for t in tables:
        if t.role != "interactions":
            report["files"][t.role] = t.file
            df = _join(df, inter, t, columns.user_id if t.role == "users" else columns.item_id, report, problems)
    if problems:
        raise DataValidationError(problems)

    for f in columns.of_kind(FeatureKind.list):
        if f.name in df.columns:
            df[f.name] = _to_lists(df[f.name], f.separator)
    ts = columns.timestamp
    if ts and ts in df.columns and df[ts].dtype == object:
        df[ts] = dates_to_epoch_seconds(df[ts])
    return _with_label(df, columns, tables, sources, inter.file)


def _join(df: pd.DataFrame, inter: Table, t: Table, key: str, report: dict, problems: list[Problem]) -> pd.DataFrame:
    """``df`` left-joined with the feature table ``t`` on ``key``; what prevents the join is added to
    ``problems`` (and ``df`` returned as it was), unmatched ids and column sources go to ``report``."""
    sources = report["column_sources"]
    missing_key = [Problem(f, key, f"join key missing from the {name} table", example=cols[:10])
                   for name, frame, f, cols in (("interactions", df, inter.file, inter.all_columns),
                                                (t.role, t.df, t.file, t.all_columns)) if key not in frame.columns]
    if missing_key:
        problems += missing_key
        return df
    right = t.df
    clash = [c for c in right.columns if c != key and c in df.columns]
    if clash:
        problems += [Problem(t.file, c, f"column also present in {sources.get(c, inter.file)}; rename it (rename:)") for c in clash]
        return df
    dup = right[key].duplicated(keep=False)
    if dup.any():
        problems.append(Problem(t.file, key, f"id appears more than once in the {t.role} table", int(dup.sum()),
                                _example(right.loc[dup, key])))
        return df
    right, err = _align_key(df[key], right, key)
    if err:
        problems.append(Problem(t.file, key, err, example=_example(right[key])))
        return df
    merged = df.merge(right, on=key, how="left", indicator="_match", sort=False)
    missing = merged["_match"] == "left_only"
    if missing.any():
        ids = merged.loc[missing, key]
        report["unmatched"].append({
            "table": t.role, "file": t.file, "column": key, "rows": int(missing.sum()),
            "distinct_ids": int(ids.nunique()), "example": _example(ids),
        })
    for c in right.columns:
        if c != key:
            sources[str(c)] = t.file
    return merged.drop(columns="_match")


def _with_label(df: pd.DataFrame, columns: ColumnsConfig, tables: list[Table], sources: dict[str, str],
                default_file: str) -> pd.DataFrame:
    """The label as int 0/1: derived by ``columns.label_rule``, or a binary label column cast to int."""
    rule = columns.label_rule_parsed
    if not rule:
        if columns.label in df.columns:
            lab = df[columns.label]
            as_num = pd.to_numeric(lab, errors="coerce")
            if lab.notna().all() and as_num.isin([0, 1]).all():
                df[columns.label] = as_num.astype(np.int64)
        return df
    col, op, num = rule
    f = sources.get(col, default_file)
    if col not in df.columns:
        seen = {str(c) for t in tables for c in t.all_columns} | {str(c) for c in df.columns}
        raise DataValidationError([Problem(f, col, f"label_rule {columns.label_rule!r}: column not found",
                                           example=sorted(seen)[:10])])
    vals = pd.to_numeric(df[col], errors="coerce")
    bad = vals.isna()
    if bad.any():
        raise DataValidationError([Problem(f, col, f"label_rule {columns.label_rule!r}: value missing or not a number",
                                           int(bad.sum()), _example(df.loc[bad, col]))])
    df[columns.label] = _OPS[op](vals, num).astype(np.int64)
    sources[columns.label] = f
    return df


def dates_to_epoch_seconds(s: pd.Series) -> pd.Series:
    """Date strings -> int64 epoch seconds when every value parses; otherwise unchanged (validation reports it)."""
    numeric = pd.to_numeric(s, errors="coerce")
    if numeric.notna().sum() == s.notna().sum():  # numbers stored as text
        return numeric
    try:
        parsed = pd.to_datetime(s, errors="coerce", utc=True)
    except (ValueError, TypeError):
        return s
    if parsed.notna().sum() != s.notna().sum():
        return s
    if parsed.isna().any():  # missing timestamps stay missing (float seconds)
        return pd.Series(np.where(parsed.isna(), np.nan, parsed.view("int64") // 10**9), index=s.index, dtype=np.float64)
    return (parsed.astype("int64") // 10**9).astype(np.int64)


def _align_key(left: pd.Series, right: pd.DataFrame, key: str) -> tuple[pd.DataFrame, Optional[str]]:
    """Cast the feature table's id column to the interactions' id dtype when they differ."""
    lt, rt = left.dtype, right[key].dtype
    if lt == rt or (pd.api.types.is_numeric_dtype(lt) and pd.api.types.is_numeric_dtype(rt)):
        return right, None
    right = right.copy()
    try:
        if pd.api.types.is_numeric_dtype(lt):
            right[key] = pd.to_numeric(right[key], errors="raise").astype(lt)
        else:
            right[key] = right[key].astype(str)
            if left.dtype != object:
                return right, f"id dtype {rt} cannot be matched with the interactions' {lt}"
    except (ValueError, TypeError):
        return right, f"id dtype {rt} cannot be matched with the interactions' {lt}: not castable"
    return right, None


def _to_lists(s: pd.Series, separator: Optional[str]) -> pd.Series:
    """Separator-joined strings -> lists (ints when every token is an integer); nulls -> []."""

    def split(v):
        if isinstance(v, (list, tuple, np.ndarray)):
            return list(v)
        if v is None or (isinstance(v, float) and np.isnan(v)):
            return []
        if separator is not None and isinstance(v, str):
            return [tok.strip() for tok in v.split(separator) if tok.strip()]
        return v  # left for validation to report

    out = s.map(split)
    tokens = [t for v in out if isinstance(v, list) for t in v]
    if tokens and all(isinstance(t, str) for t in tokens) and all(_is_int(t) for t in tokens):
        out = out.map(lambda v: [int(t) for t in v] if isinstance(v, list) else v)
    return out


def _is_int(tok: str) -> bool:
    try:
        int(tok)
        return True
    except ValueError:
        return False


def _example(s: pd.Series):
    v = s.iloc[0] if len(s) else None
    return v.item() if isinstance(v, np.generic) else v


# --- MovieLens 100K ---------------------------------------------------------------------

ML100K_USER_COLUMNS = ["user_id", "age", "gender", "occupation", "zip_code"]
ML100K_ITEM_COLUMNS = ["item_id", "title", "release_date", "video_release_date", "url"]


def load_movielens100k(folder) -> list[Table]:
    """Read the GroupLens ``ml-100k`` layout from a local folder into interactions/users/items.

    ``u.data`` (tab: user_id item_id rating timestamp), ``u.user`` (pipe: user_id|age|gender|
    occupation|zip_code), ``u.item`` (pipe, latin-1: movie_id|title|release_date|video_release_date|
    url|19 genre flags), ``u.genre`` (genre|index). The genre flags become ``genres``, a list of
    genre indices (``u.genre``), and ``release_date`` a ``release_year``.
    """
    root = str(folder).rstrip("/")
    problems: list[Problem] = []

    def read(name: str, **kw) -> Optional[pd.DataFrame]:
        path = f"{root}/{name}"
        if not _exists(path):
            problems.append(Problem(path, "*", "file not found (expected the GroupLens ml-100k layout)"))
            return None
        try:
            return pd.read_csv(path, header=None, **kw)
        except Exception as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
            problems.append(Problem(path, "*", f"file not readable: {type(exc).__name__}: {first}"))
            return None

    ratings = read("u.data", sep="\t", names=["user_id", "item_id", "rating", "timestamp"])
    users = read("u.user", sep="|", names=ML100K_USER_COLUMNS, dtype={"zip_code": str})
    genre = read("u.genre", sep="|", names=["genre", "index"], encoding="latin-1")
    items = read("u.item", sep="|", encoding="latin-1", dtype={1: str, 2: str, 3: str, 4: str})
    if genre is not None:
        genre = genre.dropna(subset=["genre"])
    if items is not None and genre is not None:
        n_flags = items.shape[1] - len(ML100K_ITEM_COLUMNS)
        if n_flags != len(genre):
            problems.append(Problem(f"{root}/u.item", "*", f"expected {len(ML100K_ITEM_COLUMNS)} + {len(genre)} genre "
                                    f"columns (u.genre) but found {items.shape[1]}", example=items.iloc[0].tolist()[:6]))
    if problems:
        raise DataValidationError(problems)
    assert items is not None and genre is not None  # else a problem was raised above

    flags = items.iloc[:, len(ML100K_ITEM_COLUMNS):].to_numpy()
    index = genre["index"].astype(int).to_numpy()
    items = items.iloc[:, : len(ML100K_ITEM_COLUMNS)]
    items.columns = ML100K_ITEM_COLUMNS
    genres = [[int(index[j]) for j in np.flatnonzero(row == 1)] for row in flags]
    release = pd.to_datetime(items["release_date"], format="%d-%b-%Y", errors="coerce")
    items = pd.DataFrame({
        "item_id": items["item_id"].astype(np.int64),
        "title": items["title"],
        "release_year": release.dt.year.astype(np.float64),
        "genres": genres,
    })
    return [Table("interactions", f"{root}/u.data", ratings), Table("users", f"{root}/u.user", users),
            Table("items", f"{root}/u.item", items)]
