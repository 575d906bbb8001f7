"""User-id requests of a ranking version: ``user_id`` + the items to score, every other column from the store.

A ranking request is one row per (user, item) pair. A request that leaves feature columns out carries the item ids
(``<item_id>``, one per row) and the user id, either one per row or once for all rows (``[1]``: broadcast, the
usual "score these candidates for this user"); any other single-value column it sends (context) is broadcast the
same way. The missing user columns (features, ``etl.history`` features and recent items) are read by user id, the
missing item columns by item id, through the one lookup of :class:`pipeline_lib.features.lookup.UserLookup`: an
unknown user gets the snapshot's cold-start row (``cold_start`` true for its rows), an unknown item the snapshot's
item defaults. A store that cannot be read, or holds another version's features, raises
:class:`~pipeline_lib.features.store.FeatureStoreError` (UNAVAILABLE, HTTP 503).
"""
from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

from pipeline_lib.features.lookup import UserLookup


def missing_columns(input_names: list[str], arrays: Mapping[str, np.ndarray]) -> list[str]:
    """The request columns (``name``, or ``name`` of ``name__values``/``name__offsets``) the request left out."""
    out: list[str] = []
    for name in input_names:
        base = name.removesuffix("__values").removesuffix("__offsets")
        if name not in arrays and base not in out:
            out.append(base)
    return out


def broadcast(arrays: dict[str, np.ndarray], rows: int, skip: set[str]) -> dict[str, np.ndarray]:
    """Single-value columns (not lists, not ``skip``) repeated to ``rows``; another row count is a bad request."""
    from pipeline_lib.validate.requests import BadRequest

    out = dict(arrays)
    for name, arr in arrays.items():
        if name in skip or name.endswith("__values") or name.endswith("__offsets"):
            continue
        flat = np.asarray(arr).reshape(-1)
        if len(flat) == 1 and rows != 1:
            out[name] = np.repeat(flat, rows)
        elif len(flat) != rows:
            raise BadRequest(f"input '{name}' has {len(flat)} values; a user-id ranking request has one per item "
                             f"({rows}) or one for all")
    return out


def complete_pairs(lookup: UserLookup, arrays: dict[str, np.ndarray], missing: list[str],
                   dtypes: Optional[Mapping[str, np.dtype]] = None) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """A ranking request with ``missing`` columns -> every column (user columns by user id, item columns by item
    id; lists as ``__values``/``__offsets``), cast to ``dtypes`` (the served inputs' types), and the per-row
    cold-start mask."""
    from pipeline_lib.validate.requests import BadRequest

    snap = lookup.snap
    if snap.item_id not in arrays:
        raise BadRequest(f"missing input '{snap.item_id}': a ranking request without the feature columns {missing} "
                         f"carries the items to score (one per row) and the user id")
    rows = len(np.asarray(arrays[snap.item_id]).reshape(-1))
    stored = set(snap.user_columns) | set(snap.item_columns)
    for c in missing:
        if c not in stored:
            raise BadRequest(f"missing input '{c}': the feature store does not hold it; send it with the request")
    out = broadcast(arrays, rows, {snap.item_id})
    user_missing = [c for c in missing if c in snap.user_columns]
    item_missing = [c for c in missing if c in snap.item_columns]
    if user_missing:
        if snap.user_id not in out:
            raise BadRequest(f"missing input '{snap.user_id}': a request without the feature columns {user_missing} "
                             f"must carry the user id")
        # each distinct user read once (a request is usually one user and many items)
        users, inverse = np.unique(np.asarray(out[snap.user_id]).reshape(-1), return_inverse=True)
        found, cold_users = lookup.fetch(users)
        for c in user_missing:
            out.update(lookup.tensors(c, [found[c][j] for j in inverse]))
        cold = cold_users[inverse]
        if cold.all():  # no row tied to this version's users: the store must still hold this version
            lookup.check_current()
    else:
        cold = np.zeros(rows, dtype=bool)
        lookup.check_current()
    if item_missing:
        found, _ = lookup.fetch_items(out[snap.item_id])
        for c in item_missing:
            out.update(lookup.tensors(c, found[c]))
    return _cast(out, dtypes or {}), np.asarray(cold, dtype=bool)


def _cast(arrays: dict[str, np.ndarray], dtypes: Mapping[str, np.dtype]) -> dict[str, np.ndarray]:
    """Looked-up numeric columns in the served inputs' types (the store keeps int64 / float64)."""
    out = dict(arrays)
    for name, arr in arrays.items():
        want = dtypes.get(name)
        if want is not None and np.dtype(want).kind not in "OSU" and np.asarray(arr).dtype != want:
            out[name] = np.asarray(arr).astype(want)
    return out
