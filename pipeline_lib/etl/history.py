"""The user's history as ranking features (``etl.history``), computed from strictly earlier events.

For every row, from the same user's events with a smaller timestamp only (never the row itself, never
an event at the same second, so nothing of the row's own label or of its simultaneous neighbours leaks):

- ``history_count``: how many earlier events the user has;
- ``history_positive_rate``: the share of them with a positive label (missing when there are none: the
  workflow fills the training median);
- ``history_gap_s``: seconds since the user's latest earlier event (missing for a first event);
- ``<item_id>_history`` (``max_items`` > 0): the user's most recent earlier positive items, oldest first.

They are added to the raw table *before* the split (each row's value depends only on its past, so a
validation or test row sees the training events before it, as a served request would) and are then
ordinary raw columns: the NVTabular workflow (and the fast path, which reproduces it) transforms them,
and a served request carries them (the caller knows its user's past). docs/ranking.md.
"""
from __future__ import annotations

import numpy as np
import pandas as pd

from pipeline_lib.config import ColumnsConfig

COUNT, POSITIVE_RATE, GAP = "history_count", "history_positive_rate", "history_gap_s"
NUMERIC = (COUNT, POSITIVE_RATE, GAP)
LOGGED = (COUNT, GAP)  # heavy-tailed: log(1 + x) before Normalize


def history_column(columns: ColumnsConfig) -> str:
    """Name of the user-history list feature (YouTube DNN's query input, a ranking feature with etl.history)."""
    return f"{columns.item_id}_history"


def _order(df: pd.DataFrame, columns: ColumnsConfig) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(row positions sorted by user then time, users, timestamps in that order; no timestamp: row order)."""
    ts_col = columns.timestamp if columns.timestamp and columns.timestamp in df.columns else None
    keys = [columns.user_id] + ([ts_col] if ts_col else [])
    order = np.asarray(df.reset_index(drop=True).sort_values(keys, kind="stable").index)
    users = df[columns.user_id].to_numpy()[order]
    ts = (pd.to_numeric(df[ts_col], errors="coerce").to_numpy(dtype=np.float64)[order] if ts_col
          else np.arange(len(df), dtype=np.float64))
    return order, users, ts


def _group_starts(users: np.ndarray, ts: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per sorted row: position of the first row of its user, and of its (user, timestamp) group."""
    n = len(users)
    idx = np.arange(n)
    new_user = np.ones(n, dtype=bool)
    new_user[1:] = users[1:] != users[:-1]
    new_tie = new_user.copy()
    new_tie[1:] |= ts[1:] != ts[:-1]
    user_start = np.maximum.accumulate(np.where(new_user, idx, 0)) if n else idx
    tie_start = np.maximum.accumulate(np.where(new_tie, idx, 0)) if n else idx
    return user_start, tie_start


def numeric_history(df: pd.DataFrame, columns: ColumnsConfig) -> pd.DataFrame:
    """The three numeric history columns of ``df``'s rows (same index), from strictly earlier events."""
    order, users, ts = _order(df, columns)
    positive = (pd.to_numeric(df[columns.label], errors="coerce").to_numpy()[order] == 1).astype(np.float64)
    user_start, tie_start = _group_starts(users, ts)
    count = (tie_start - user_start).astype(np.float64)  # events of the user before this timestamp
    cum = np.concatenate([[0.0], np.cumsum(positive)])
    positives = cum[tie_start] - cum[user_start]
    with np.errstate(invalid="ignore", divide="ignore"):
        rate = np.where(count > 0, positives / np.maximum(count, 1), np.nan)
    prev_ts = np.where(count > 0, ts[np.maximum(tie_start - 1, 0)], np.nan)
    gap = np.where(count > 0, np.maximum(ts - prev_ts, 0.0), np.nan)
    out = pd.DataFrame(index=df.index)
    for name, values in ((COUNT, count), (POSITIVE_RATE, rate), (GAP, gap)):
        col = np.empty(len(df), dtype=np.float64)
        col[order] = values
        out[name] = col
    return out


def recent_positive_items(df: pd.DataFrame, columns: ColumnsConfig, length: int) -> pd.Series:
    """Per row (same index): the user's most recent positive items with a strictly smaller timestamp
    (oldest first, at most ``length``); without a timestamp, the earlier rows in table order."""
    order, users, ts = _order(df, columns)
    items = df[columns.item_id].to_numpy()[order]
    positive = (pd.to_numeric(df[columns.label], errors="coerce").to_numpy()[order] == 1)
    hist: list = [None] * len(df)
    past: list = []
    pending: list = []  # positives of the current timestamp: visible from the next timestamp on
    last_ts = np.nan
    for pos, (u, it, p, t) in enumerate(zip(users, items, positive, ts)):
        if pos == 0 or u != users[pos - 1]:
            past, pending, last_ts = [], [], t
        elif t != last_ts:
            past.extend(pending)
            pending, last_ts = [], t
        hist[order[pos]] = past[-length:]
        if p:
            pending.append(it)
    return pd.Series(hist, index=df.index, dtype=object)


def add_history_features(df: pd.DataFrame, columns: ColumnsConfig, max_items: int, numeric: bool = True
                         ) -> pd.DataFrame:
    """``df`` with the numeric history columns (``numeric``) and, with ``max_items`` > 0, the recent
    positive items list (:func:`history_column`)."""
    if not columns.timestamp or columns.timestamp not in df.columns:
        raise ValueError(f"etl.history: the data has no timestamp column {columns.timestamp!r} (columns.timestamp); "
                         "the history features need each event's time")
    clash = [c for c in (NUMERIC if numeric else ()) if c in df.columns]
    if clash:
        raise ValueError(f"etl.history: the data already has a column named {clash[0]!r} (a history feature's name); "
                         "rename it or turn etl.history off")
    out = df.copy()
    if numeric:
        out = pd.concat([out, numeric_history(df, columns)], axis=1)
    if max_items:
        out[history_column(columns)] = recent_positive_items(df, columns, max_items)
    return out


def next_row_history(train: pd.DataFrame, columns: ColumnsConfig) -> pd.DataFrame:
    """Per user id (the index), the numeric history features of the user's *next* row after every event of
    ``train``: ``history_count`` = the user's events, ``history_positive_rate`` = their share of positives;
    ``history_gap_s`` is only known at request time: missing (NaN, filled by the workflow as for a first event; a
    request may send its own). What a user-id ranking request is completed with (the feature snapshot)."""
    positive = (pd.to_numeric(train[columns.label], errors="coerce") == 1).astype(np.float64)
    grouped = positive.groupby(train[columns.user_id].to_numpy(), sort=True)
    out = pd.DataFrame({COUNT: grouped.size().astype(np.float64), POSITIVE_RATE: grouped.mean()})
    out[GAP] = np.nan
    return out[list(NUMERIC)]
