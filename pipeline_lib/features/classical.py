"""The feature snapshot of a classical top-k version (``ease``, ``item_knn``, plain or two-stage; docs/serving.md
"User-id requests"): what a user-id request is completed with by the one lookup of every top-k version
(:class:`pipeline_lib.features.lookup.UserLookup`).

A classical model scores the user's history row and excludes it, so the snapshot's user rows hold
:data:`~pipeline_lib.export.classical.HISTORY_INPUT`: each user's positive items of train + validation -- the row
the version's ``seen.npz`` holds and the test-time evaluation scores from (docs/evaluation.md, "History at test
time") -- plus a two-stage version's ranker user / context columns (the user's latest row).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import pandas as pd

from pipeline_lib.etl.history import history_column
from pipeline_lib.export.classical import HISTORY_INPUT
from pipeline_lib.export.staging import StagedVersion
from pipeline_lib.export.topk import TOPK_DIR, seen_frame
from pipeline_lib.features.serving import allow_user_id_requests
from pipeline_lib.features.snapshot import Snapshot, write_snapshot


def user_positives(frame: pd.DataFrame, columns) -> pd.Series:
    """Per raw user id, the user's positive items (``label > 0``: the ``seen.npz`` rule), oldest first, each once."""
    ordered = frame.sort_values(columns.timestamp, kind="stable") \
        if columns.timestamp and columns.timestamp in frame.columns else frame
    pos = ordered.loc[pd.to_numeric(ordered[columns.label], errors="coerce") > 0, [columns.user_id, columns.item_id]]
    pos = pos.drop_duplicates(keep="last")
    return pos.groupby(columns.user_id, sort=True)[columns.item_id].agg(list)


def write_classical_snapshot(staged: StagedVersion, raw_train: Path, raw_history: Optional[Path], columns,
                             history_length: int = 0) -> Snapshot:
    """Write the snapshot of a classical version exported with ``features`` (its spec.json names the history input)
    over the users of train + validation (``raw_history``: what ``seen.npz`` holds) and let the version answer
    user-id requests (config.pbtxt: every input but the user id optional, ``cold_start`` out). ``columns``: the
    run's ``ColumnsConfig``; ``history_length``: of a ranker's history feature, when the version's requests carry
    one."""
    art = staged.version_dir / TOPK_DIR
    meta = json.loads((art / "spec.json").read_text())
    if meta.get("history_input") != HISTORY_INPUT:
        raise ValueError(f"{art} was exported without features (export_classical(features=True)): it takes no "
                         f"'{HISTORY_INPUT}' input to look up")
    request_cols = meta["request_columns"]
    hist = history_column(columns) if history_column(columns) in request_cols else None  # a ranker's history
    known = seen_frame(pd.read_parquet(raw_train), raw_history)
    positives = known[columns.user_id].map(user_positives(known, columns))
    known = known.assign(**{HISTORY_INPUT: [v if isinstance(v, list) else [] for v in positives]})
    item_side = [columns.item_id] + [f.name for f in columns.features if f.side.value == "item"]
    snap = write_snapshot(art, known, request_cols + [HISTORY_INPUT], [c for c in item_side if c in known.columns],
                          columns, hist, history_length)
    allow_user_id_requests(staged.config_path, columns.user_id)
    return snap
