"""The features a version serves user-id requests with, kept in the version itself (``<N>/topk/features/``).

Written at export from the run's raw training split, so every version carries its own snapshot and a rollback
can put the matching features back into the store (:mod:`pipeline_lib.features.store`):

- ``users.parquet``: one row per training user, keyed by the raw user id: the user's request columns (user and
  context features) as on the user's latest training row (by timestamp, else row order) and, when the version
  reads a history, the user's most recent positive items (oldest first, at most ``history_length``: the same
  list :func:`pipeline_lib.etl.workflow.add_user_history` builds for a next row);
- ``items.parquet``: one row per catalogue item, keyed by the raw item id, with its item features;
- ``features.json``: the snapshot's id (a hash of both files), the columns, their dtypes and the defaults a
  user unknown to the store gets (the cold-start row).
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

SNAPSHOT_DIR = "features"
USERS_FILE, ITEMS_FILE, META_FILE = "users.parquet", "items.parquet", "features.json"


@dataclass
class Snapshot:
    """What ``features.json`` holds (``id``: the hash of users.parquet + items.parquet)."""

    id: str
    user_id: str
    item_id: str
    user_columns: list[str]          # stored per user (request columns except the user id)
    list_columns: list[str]          # the list-valued columns (the history, list features of users or items)
    item_columns: list[str]          # stored per item (except the item id)
    dtypes: dict[str, str]           # numpy dtype of each stored column (lists: of their values)
    defaults: dict[str, Any] = field(default_factory=dict)  # the cold-start row (lists: empty)
    n_users: int = 0
    n_items: int = 0
    item_defaults: dict[str, Any] = field(default_factory=dict)  # an item the store does not hold (ranking)

    @classmethod
    def load(cls, snapshot_dir: Path) -> "Snapshot":
        return cls(**json.loads((Path(snapshot_dir) / META_FILE).read_text()))


def snapshot_dir(artifact_dir: Path) -> Path:
    """``<N>/topk/features``: where a version keeps its snapshot."""
    return Path(artifact_dir) / SNAPSHOT_DIR


def has_snapshot(artifact_dir: Path) -> bool:
    return (snapshot_dir(artifact_dir) / META_FILE).is_file()


def latest_rows(train: pd.DataFrame, user_id: str, timestamp: Optional[str]) -> pd.DataFrame:
    """Each user's latest training row (by ``timestamp`` when the data has it, else the last in row order)."""
    ordered = train.sort_values(timestamp, kind="stable") if timestamp and timestamp in train.columns else train
    return ordered.drop_duplicates(user_id, keep="last").sort_values(user_id, kind="stable").reset_index(drop=True)


def recent_items(train: pd.DataFrame, user_id: str, item_id: str, label: str, timestamp: Optional[str],
                 length: int) -> pd.Series:
    """Per user id, the most recent positive items (oldest first, at most ``length``)."""
    ordered = train.sort_values(timestamp, kind="stable") if timestamp and timestamp in train.columns else train
    pos = ordered.loc[pd.to_numeric(ordered[label], errors="coerce") == 1, [user_id, item_id]]
    return pos.groupby(user_id, sort=True)[item_id].agg(lambda s: s.tolist()[-length:] if length else [])


def build_users(train: pd.DataFrame, request_columns: list[str], user_id: str, item_id: str, label: str,
                timestamp: Optional[str], history: Optional[str], history_length: int) -> pd.DataFrame:
    """One row per training user: ``user_id`` + the request columns (the history rebuilt as the next row's)."""
    plain = [c for c in request_columns if c != user_id and c != history]
    users = latest_rows(train, user_id, timestamp)[[user_id] + plain]
    if history:
        recent = recent_items(train, user_id, item_id, label, timestamp, history_length)
        hist = users[user_id].map(recent)
        users[history] = [v if isinstance(v, list) else [] for v in hist]
    return users


def _is_list(s: pd.Series) -> bool:
    return s.dtype == object and len(s) > 0 and isinstance(s.iloc[0], (list, tuple, np.ndarray))


def _dtype_name(s: pd.Series, item_dtype: np.dtype) -> str:
    """A column's numpy dtype; of a list column, its values' (the item id's when every list is empty)."""
    if _is_list(s):
        values = [v for row in s for v in row]
        return str(np.asarray(values).dtype) if values else str(item_dtype)
    return str(s.dtype)


def _default(s: pd.Series) -> Any:
    value = s.iloc[0] if len(s) else None
    if isinstance(value, (list, tuple, np.ndarray)):
        return []
    return value.item() if value is not None and hasattr(value, "item") else value


def write_tables(out: Path, users: pd.DataFrame, items: pd.DataFrame) -> str:
    """``users.parquet`` and ``items.parquet`` into the snapshot folder ``out``; the snapshot id (their hash)."""
    users.to_parquet(out / USERS_FILE, index=False)
    items.to_parquet(out / ITEMS_FILE, index=False)
    return hashlib.sha256((out / USERS_FILE).read_bytes() + (out / ITEMS_FILE).read_bytes()).hexdigest()[:16]


def write_snapshot(artifact_dir: Path, train: pd.DataFrame, request_columns: list[str], item_columns: list[str],
                   columns, history: Optional[str], history_length: int,
                   user_values: Optional[pd.DataFrame] = None) -> Snapshot:
    """Write ``<artifact_dir>/features/`` (users, items, features.json) from the raw training split ``train``;
    ``columns``: the run's ``ColumnsConfig`` (ids, label, timestamp). ``user_values`` (indexed by user id): columns
    stored instead of the latest row's (a ranking version's ``etl.history`` features, as the next row's)."""
    out = snapshot_dir(artifact_dir)
    out.mkdir(parents=True, exist_ok=True)
    uid, iid = columns.user_id, columns.item_id
    users = build_users(train, request_columns, uid, iid, columns.label, columns.timestamp, history, history_length)
    for c in (user_values.columns if user_values is not None else []):
        users[c] = users[uid].map(user_values[c]).astype(user_values[c].dtype)  # type: ignore[index]
    items = train.drop_duplicates(iid, keep="last")[[iid] + [c for c in item_columns if c != iid]]
    items = items.sort_values(iid, kind="stable").reset_index(drop=True)
    digest = write_tables(out, users, items)
    item_dtype = train[iid].dtype
    stored = [c for c in users.columns if c != uid]
    snap = Snapshot(
        id=digest, user_id=uid, item_id=iid, user_columns=stored,
        list_columns=[c for f in (users, items) for c in f.columns if _is_list(f[c]) or c == history],
        item_columns=[c for c in items.columns if c != iid],
        dtypes={c: _dtype_name(f[c], item_dtype) for f in (users, items) for c in f.columns},
        defaults={c: _default(users[c]) for c in stored}, n_users=len(users), n_items=len(items),
        item_defaults={c: _default(items[c]) for c in items.columns if c != iid})
    (out / META_FILE).write_text(json.dumps(asdict(snap), indent=2, default=str))
    return snap


def offline_rows(artifact_dir: Path, user_ids: list) -> pd.DataFrame:
    """The full request rows the snapshot gives ``user_ids`` (the defaults for an unknown id): what a user-id
    request must be answered like, computed offline from the training data."""
    snap = Snapshot.load(snapshot_dir(artifact_dir))
    users = pd.read_parquet(snapshot_dir(artifact_dir) / USERS_FILE).set_index(snap.user_id)
    rows = []
    for u in user_ids:
        if u in users.index:
            row = users.loc[u].to_dict()
            row = {c: (list(v) if c in snap.list_columns else v) for c, v in row.items()}
        else:
            row = {c: (list(v) if isinstance(v, list) else v) for c, v in snap.defaults.items()}
        rows.append({snap.user_id: u, **row})
    frame = pd.DataFrame(rows)
    for c in snap.user_columns:
        if c not in snap.list_columns:
            frame[c] = frame[c].astype(snap.dtypes[c])
    frame[snap.user_id] = frame[snap.user_id].astype(snap.dtypes[snap.user_id])
    return frame


def unknown_id(known: list) -> Any:
    """A user id that is none of ``known`` (same type): the smoke test's and the tests' cold-start user."""
    if known and all(isinstance(u, (int, np.integer)) for u in known):
        return int(max(known)) + 10**6
    return "__unknown_user__"


def stored_users(artifact_dir: Path, n: int) -> list:
    """The first ``n`` user ids of a snapshot (Python values)."""
    snap = Snapshot.load(snapshot_dir(artifact_dir))
    ids = pd.read_parquet(snapshot_dir(artifact_dir) / USERS_FILE, columns=[snap.user_id])[snap.user_id].head(n)
    return [v.item() if hasattr(v, "item") else v for v in ids]


def offline_pairs(artifact_dir: Path, user_ids: list, item_ids: list) -> pd.DataFrame:
    """A ranking version's full request rows for (user, item) pairs (``user_ids[i]``, ``item_ids[i]``): the
    user's columns as :func:`offline_rows` gives them, the item's stored features (``item_defaults`` for an item
    the snapshot does not hold): what a user-id ranking request must be scored like."""
    snap = Snapshot.load(snapshot_dir(artifact_dir))
    rows = offline_rows(artifact_dir, list(user_ids)).reset_index(drop=True)
    items = pd.read_parquet(snapshot_dir(artifact_dir) / ITEMS_FILE).set_index(snap.item_id)
    found = items.reindex(list(item_ids))
    for c in snap.item_columns:
        default = snap.item_defaults.get(c)
        known = pd.Index(item_ids).isin(items.index)
        values = [(list(v) if c in snap.list_columns else v) if k else
                  (list(default) if isinstance(default, list) else default) for v, k in zip(found[c].tolist(), known)]
        rows[c] = pd.Series(values, dtype=object if c in snap.list_columns else snap.dtypes[c])
    rows[snap.item_id] = pd.Series(list(item_ids), dtype=snap.dtypes[snap.item_id])
    return rows


def stored_items(artifact_dir: Path, n: int) -> list:
    """The first ``n`` item ids of a snapshot (Python values)."""
    snap = Snapshot.load(snapshot_dir(artifact_dir))
    ids = pd.read_parquet(snapshot_dir(artifact_dir) / ITEMS_FILE, columns=[snap.item_id])[snap.item_id].head(n)
    return [v.item() if hasattr(v, "item") else v for v in ids]
