"""Feedback: what users did with what was served (clicks, purchases), checked row by row.

A feedback file (CSV, JSON lines or parquet) holds one event per row: ``item_id`` and ``ts`` (ISO time or epoch
seconds), ``event`` (``click`` or ``purchase``; default click) and either the ``request_id`` the served answer
returned or the ``user_id`` (then the online evaluation attributes it to the latest impression of that user and
item within ``online.attribution_window_s``). :func:`ingest` keeps the good rows under ``accepted/`` (parquet,
by day) and every bad row, with its line and the reason, under ``rejected/`` -- never silently dropped.
:func:`drain_inbox` does that for each file dropped into ``inbox/`` (the documented file drop) and moves the
file to ``processed/``. ``recsys feedback`` is the command line of both.
"""
from __future__ import annotations

import os
import shutil
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

COLUMNS = ["request_id", "user_id", "item_id", "event", "ts"]
EVENTS = ("click", "purchase")
READERS = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".ndjson": "json", ".parquet": "parquet"}


class FeedbackError(ValueError):
    """A feedback file that cannot be read at all (names the file and why)."""


@dataclass
class IngestResult:
    source: str
    accepted: int = 0
    rejected: int = 0
    accepted_file: Optional[Path] = None
    rejected_file: Optional[Path] = None
    reasons: dict[str, int] = field(default_factory=dict)

    def line(self) -> str:
        text = f"{self.source}: {self.accepted} accepted, {self.rejected} rejected"
        if self.rejected:
            why = "; ".join(f"{n} x {r}" for r, n in sorted(self.reasons.items(), key=lambda x: -x[1])[:5])
            text += f" ({why}) -> {self.rejected_file}"
        return text


def read_file(path: Path) -> pd.DataFrame:
    """A feedback file as strings (every column), by its suffix; :class:`FeedbackError` when it cannot be read."""
    path = Path(path)
    kind = READERS.get(path.suffix.lower())
    if kind is None:
        raise FeedbackError(f"feedback file '{path}': unknown format '{path.suffix}' (use one of {sorted(READERS)})")
    try:
        if kind == "csv":
            return pd.read_csv(path, dtype=str, keep_default_na=False, sep="\t" if path.suffix == ".tsv" else ",")
        if kind == "json":
            return pd.read_json(path, lines=True, dtype=False).astype(object)
        return pd.read_parquet(path)
    except Exception as exc:  # noqa: BLE001 - any parse failure names the file
        raise FeedbackError(f"feedback file '{path}' could not be read: {type(exc).__name__}: {exc}") from exc


def _text(s: pd.Series) -> pd.Series:
    return s.map(lambda v: "" if v is None or (isinstance(v, float) and np.isnan(v)) else str(v).strip())


def parse_times(values: pd.Series) -> pd.Series:
    """ISO times or epoch seconds -> UTC timestamps (NaT where neither)."""
    text = _text(values)
    numeric = pd.to_numeric(text, errors="coerce")
    as_epoch = pd.to_datetime(numeric, unit="s", utc=True, errors="coerce")
    as_iso = pd.to_datetime(text.where(numeric.isna()), utc=True, errors="coerce")
    return as_epoch.fillna(as_iso)


def check(frame: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(accepted rows in :data:`COLUMNS`, rejected rows: the original columns + ``line`` + ``reason``)."""
    n = len(frame)
    col = {c: (_text(frame[c]) if c in frame.columns else pd.Series([""] * n, index=frame.index)) for c in COLUMNS}
    if "event" not in frame.columns:
        col["event"] = pd.Series(["click"] * n, index=frame.index)
    col["event"] = col["event"].str.lower()
    ts = parse_times(frame["ts"]) if "ts" in frame.columns else pd.Series(pd.NaT, index=frame.index)
    reason = pd.Series([""] * n, index=frame.index, dtype=object)

    def reject(mask: pd.Series, why) -> None:
        hit = mask & (reason == "")
        reason[hit] = why if isinstance(why, str) else why[hit]

    reject(col["item_id"] == "", "no item_id" if "item_id" in frame.columns else "no item_id column")
    reject((col["request_id"] == "") & (col["user_id"] == ""), "neither request_id nor user_id given")
    reject(~col["event"].isin(EVENTS), "event '" + col["event"] + f"' is not one of {', '.join(EVENTS)}")
    reject(ts.isna(), ("ts '" + _text(frame["ts"]) + "' is not a time (ISO 8601 or epoch seconds)")
           if "ts" in frame.columns else "no ts column")
    ok = reason == ""
    accepted = pd.DataFrame({c: col[c][ok] for c in COLUMNS if c != "ts"})
    accepted["ts"] = ts[ok]
    rejected = frame[~ok].copy()
    rejected.insert(0, "line", np.flatnonzero(~ok.to_numpy()) + 2)  # the file's line (header = line 1)
    rejected["reason"] = reason[~ok]
    return accepted[COLUMNS].reset_index(drop=True), rejected.reset_index(drop=True)


def ingest(path: Path, feedback_dir: Path) -> IngestResult:
    """Check one feedback file; accepted rows -> ``accepted/date=<day>/``, rejected rows (or the whole file,
    when it cannot be read) -> ``rejected/<name>-<stamp>.rejected.csv`` with the reason."""
    path, feedback_dir = Path(path), Path(feedback_dir)
    result = IngestResult(str(path))
    stamp = f"{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}-{uuid.uuid4().hex[:6]}"
    try:
        accepted, rejected = check(read_file(path))
    except FeedbackError as exc:
        accepted, rejected = pd.DataFrame(columns=COLUMNS), pd.DataFrame({"line": [0], "reason": [str(exc)]})
    if len(accepted):
        for day, part in accepted.groupby(accepted["ts"].dt.strftime("%Y-%m-%d")):
            folder = feedback_dir / "accepted" / f"date={day}"
            folder.mkdir(parents=True, exist_ok=True)
            target = folder / f"{path.stem}-{stamp}.parquet"
            part.to_parquet(folder / f".{target.name}.tmp", index=False)
            os.replace(folder / f".{target.name}.tmp", target)
            result.accepted_file = target
        result.accepted = len(accepted)
    if len(rejected):
        folder = feedback_dir / "rejected"
        folder.mkdir(parents=True, exist_ok=True)
        result.rejected_file = folder / f"{path.stem}-{stamp}.rejected.csv"
        rejected.to_csv(result.rejected_file, index=False)
        result.rejected = int((rejected["line"] > 0).sum()) or len(rejected)
        result.reasons = {str(k): int(v) for k, v in rejected["reason"].value_counts().items()}
    return result


def drain_inbox(feedback_dir: Path) -> list[IngestResult]:
    """Ingest every file in ``<feedback_dir>/inbox/`` (oldest first) and move it to ``processed/``."""
    inbox = Path(feedback_dir) / "inbox"
    inbox.mkdir(parents=True, exist_ok=True)
    results = []
    for path in sorted((p for p in inbox.iterdir() if p.is_file() and not p.name.startswith(".")),
                       key=lambda p: p.stat().st_mtime):
        results.append(ingest(path, feedback_dir))
        done = Path(feedback_dir) / "processed"
        done.mkdir(parents=True, exist_ok=True)
        shutil.move(str(path), done / path.name)
    return results


def read_accepted(feedback_dir: Path, since: Optional[pd.Timestamp] = None) -> pd.DataFrame:
    """Every accepted event (optionally from ``since`` on), in :data:`COLUMNS`."""
    files = sorted((Path(feedback_dir) / "accepted").glob("date=*/*.parquet"))
    if not files:
        return pd.DataFrame({c: pd.Series(dtype="datetime64[ns, UTC]" if c == "ts" else object) for c in COLUMNS})
    frame = pd.concat([pd.read_parquet(f) for f in files], ignore_index=True)
    if since is not None:
        frame = frame[frame["ts"] >= since]
    return frame[COLUMNS].reset_index(drop=True)
