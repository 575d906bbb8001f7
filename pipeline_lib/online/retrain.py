"""Retraining on what happened: the original log plus the labelled impressions since a time.

Each item shown in the first ``online.k`` of an impression becomes one interaction row: label 1 when feedback
was attributed to it (:func:`pipeline_lib.online.evaluation.attribute`), else 0; its time is the impression's.
The row's other columns come from the log: user-side and context features from the user's newest row, item-side
features from the item's newest row (a user or item the log never saw is left out, and counted). With
``split.method: time`` (required) the newest rows -- the latest feedback -- are the test set.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pandas as pd

from pipeline_lib.config import FeatureSide, RunConfig
from pipeline_lib.online import evaluation, feedback, impressions, settings


@dataclass
class FeedbackRows:
    rows: int
    clicks: int
    unknown: int  # shown items left out: user or item not in the log
    since: Optional[str]


def labelled_impressions(log: pd.DataFrame, imps: pd.DataFrame, fb: pd.DataFrame, cfg: RunConfig) -> tuple[pd.DataFrame, int]:
    """(interaction rows in the log's columns, shown items left out) of the impressions and their feedback."""
    c = cfg.columns
    shown, _ = evaluation.attribute(imps, fb, cfg.online.k, cfg.online.attribution_window_s)
    if shown.empty:
        return log.iloc[:0].copy(), 0
    user_side = [f.name for f in c.features if f.side != FeatureSide.item and f.name in log.columns]
    item_side = [f.name for f in c.features if f.side == FeatureSide.item and f.name in log.columns]
    order = log.sort_values(c.timestamp) if c.timestamp and c.timestamp in log.columns else log
    users = order.drop_duplicates(c.user_id, keep="last").set_index(order.drop_duplicates(c.user_id, keep="last")[c.user_id].astype(str))
    items = order.drop_duplicates(c.item_id, keep="last").set_index(order.drop_duplicates(c.item_id, keep="last")[c.item_id].astype(str))
    known = shown["user_id"].isin(users.index) & shown["item_id"].isin(items.index)
    shown = shown[known]
    out = pd.DataFrame({c.user_id: users.loc[shown["user_id"], c.user_id].to_numpy(),
                        c.item_id: items.loc[shown["item_id"], c.item_id].to_numpy()})
    for name in user_side:
        out[name] = users.loc[shown["user_id"], name].to_numpy()
    for name in item_side:
        out[name] = items.loc[shown["item_id"], name].to_numpy()
    out[c.label] = shown["clicked"].astype(log[c.label].dtype).to_numpy()
    if c.timestamp and c.timestamp in log.columns:
        out[c.timestamp] = _like(pd.to_datetime(shown["ts"], utc=True), log[c.timestamp]).to_numpy()
    for col in log.columns:  # any other column of the log (not a feature): the user's newest value
        if col not in out.columns:
            out[col] = users.loc[shown["user_id"], col].to_numpy()
    return out[list(log.columns)], int((~known).sum())


def _like(ts: pd.Series, column: pd.Series) -> pd.Series:
    """Impression times in the dtype of the log's timestamp column (epoch seconds or datetimes)."""
    if pd.api.types.is_datetime64_any_dtype(column):
        return ts if getattr(column.dtype, "tz", None) is not None else ts.dt.tz_localize(None)
    return (ts.astype("int64") // 10**9).astype(column.dtype)


def append_feedback(raw_path: Path, cfg: RunConfig) -> FeedbackRows:
    """Append the labelled impressions since ``online.retrain_since`` to the run's raw table (in place)."""
    since = pd.Timestamp(cfg.online.retrain_since) if cfg.online.retrain_since else None
    if since is not None and since.tzinfo is None:
        since = since.tz_localize("UTC")
    imps = impressions.read_impressions(settings.impressions_dir(cfg))
    if since is not None and len(imps):
        imps = imps[pd.to_datetime(imps["ts"], utc=True) >= since]
    fb = feedback.read_accepted(settings.feedback_dir(cfg), since)
    log = pd.read_parquet(raw_path)
    rows, unknown = labelled_impressions(log, imps, fb, cfg)
    if len(rows):
        pd.concat([log, rows], ignore_index=True).to_parquet(raw_path, index=False)
    return FeedbackRows(len(rows), int(rows[cfg.columns.label].sum()) if len(rows) else 0, unknown,
                        str(since) if since is not None else None)
