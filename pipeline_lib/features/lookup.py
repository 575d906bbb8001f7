"""The served side of the feature store: a request that carries only the user id (and perhaps some context
columns) is completed with the user's stored features and history before the version's recommender runs.

:class:`UserLookup` reads the online store through Feast's ``get_online_features`` (SQLite or Redis, the repo
named by ``<model_repository>/<model>/feature_store.json``). A user the store does not hold, or holds only from
an older version (not a user of this one), gets the snapshot's cold-start row and ``cold_start`` true. A store
that cannot be reached, was never filled, or holds another version's features raises
:class:`~pipeline_lib.features.store.FeatureStoreError` (answered as UNAVAILABLE, HTTP 503): never a wrong answer.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from pipeline_lib.features.snapshot import Snapshot, snapshot_dir
from pipeline_lib.features.store import (ITEM_VIEW, SNAPSHOT_FIELD, USER_VIEW, FeatureStoreError, StoreSettings,
                                         bound_redis, open_store, project_name, read_pointer, store_state)

COLD_START_OUTPUT = "cold_start"  # served output: BOOL [rows], true where the user was unknown to the store
KEY_CACHE = 200_000  # SqliteReader: serialized keys kept per view (ids of users and catalogue items)


def _python_ids(values: np.ndarray) -> list:
    """Request ids as Feast's entity rows take them (bytes -> str, numpy ints -> int)."""
    arr = np.asarray(values).reshape(-1)
    if arr.dtype.kind in "iu":
        return [int(v) for v in arr]
    return [v.decode("utf-8") if isinstance(v, bytes) else str(v) for v in arr]


class SqliteReader:
    """The SQLite online store read directly: the rows Feast's ``SqliteOnlineStore.online_read`` selects (one query
    for all entities, keys serialized by Feast's ``serialize_entity_key``, values Feast ``Value`` protos decoded by
    Feast's ``feast_value_type_to_python_type``), without the per-call registry and response building of
    ``get_online_features`` (measured: benchmarks/README.md#user-id-requests-feature-store-lookup). Read-only;
    a missing file or table raises."""

    def __init__(self, db: Path, project: str, view: str, join_key: str, features: list[str]):
        import sqlite3

        from feast.infra.key_encoding_utils import serialize_entity_key
        from feast.protos.feast.types.EntityKey_pb2 import EntityKey
        from feast.protos.feast.types.Value_pb2 import Value
        from feast.type_map import feast_value_type_to_python_type

        if not Path(db).is_file():
            raise FeatureStoreError(f"the SQLite online store {db} does not exist")
        self.conn = sqlite3.connect(f"file:{db}?mode=ro", uri=True, check_same_thread=False)
        self.table, self.join_key, self.features = f"{project}_{view}", join_key, features
        self._key, self._entity, self._value, self._python = serialize_entity_key, EntityKey, Value, feast_value_type_to_python_type
        self._keys: dict[Any, bytes] = {}

    def key(self, uid: Any) -> bytes:
        """The stored key of an id (serialized once per id: a ranking request asks the same items again and again;
        at most :data:`KEY_CACHE` ids kept)."""
        key = self._keys.get(uid)
        if key is None:
            v = self._value(int64_val=uid) if isinstance(uid, int) else self._value(string_val=uid)
            key = self._key(self._entity(join_keys=[self.join_key], entity_values=[v]), entity_key_serialization_version=2)
            if len(self._keys) < KEY_CACHE:
                self._keys[uid] = key
        return key

    def read(self, ids: list) -> dict[str, list]:
        """``{feature: [value per id]}`` (None for an id or feature the store does not hold)."""
        keys = [self.key(u) for u in ids]
        rows = self.conn.execute(f"SELECT entity_key, feature_name, value FROM {self.table} "
                                 f"WHERE entity_key IN ({','.join('?' * len(keys))})", keys).fetchall()
        at: dict[bytes, list[int]] = {}
        for i, k in enumerate(keys):  # an id asked twice (a ranking request's items, one user per row) gets both
            at.setdefault(k, []).append(i)
        out: dict[str, list] = {f: [None] * len(keys) for f in self.features}
        for key, name, blob in rows:
            if name in out:
                value = self._python(self._value.FromString(blob))
                for i in at[key]:
                    out[name][i] = value
        return out


class UserLookup:
    """Completes user-id requests of one version from the model's feature store."""

    def __init__(self, artifact_dir: Path, model_dir: Path):
        self.snap = Snapshot.load(snapshot_dir(artifact_dir))
        self.model_dir = Path(model_dir)
        self.settings: Optional[StoreSettings] = None
        self.store: Any = None
        self.readers: dict[str, SqliteReader] = {}  # per view: the SQLite store read directly (Feast's API for Redis)

    @property
    def user_id(self) -> str:
        return self.snap.user_id

    def warm(self) -> None:
        """Import Feast and open the store now (at model load) when it is set up; a missing or unreachable store is
        reported by the first user-id request instead."""
        try:
            self._open()
        except FeatureStoreError:
            pass

    def _open(self) -> Any:
        if self.store is None:
            self.settings = read_pointer(self.model_dir)
            if self.settings is None:
                raise FeatureStoreError(f"no feature store is set up for model '{self.model_dir.name}' "
                                        f"({self.model_dir / 'feature_store.json'} is missing: the run's features stage "
                                        f"has not materialized this version yet); send the full feature row instead")
            try:
                self.store = open_store(self.settings.repo)
                bound_redis(self.store)  # Redis down: UNAVAILABLE within about a second, not ~3 s of retries
                if self.settings.online_store == "sqlite":
                    db, project = self.settings.repo / "online.db", project_name(self.settings.repo)
                    self.readers = {view: SqliteReader(db, project, view, key, cols + [SNAPSHOT_FIELD])
                                    for view, key, cols in ((USER_VIEW, self.user_id, self.snap.user_columns),
                                                            (ITEM_VIEW, self.snap.item_id, self.snap.item_columns))}
            except Exception as exc:  # noqa: BLE001 - a missing or broken repo
                raise FeatureStoreError(f"feature store at {self.settings.repo} cannot be opened: "
                                        f"{type(exc).__name__}: {exc}") from exc
        return self.store

    def _read(self, view: str, join_key: str, columns: list[str], ids: list) -> dict[str, list]:
        """``{column: [value per id]}`` of ``view`` for ``ids``, the snapshot id column included (None where the
        store holds nothing); :class:`FeatureStoreError` when the store cannot be read."""
        store = self._open()
        try:
            if view in self.readers:
                return self.readers[view].read(ids)
            return store.get_online_features(features=[f"{view}:{c}" for c in columns + [SNAPSHOT_FIELD]],
                                             entity_rows=[{join_key: i} for i in ids]).to_dict()
        except Exception as exc:  # noqa: BLE001 - connection refused, missing table, timeout
            raise FeatureStoreError(f"feature store unreachable ({self.settings.online_store} at "  # type: ignore[union-attr]
                                    f"{self._where()}): {type(exc).__name__}: {str(exc)[:300]}") from exc

    def _filled(self, res: dict[str, list], columns: list[str], mine: np.ndarray, defaults: dict) -> dict[str, list]:
        """The stored values where ``mine`` (this snapshot's rows), ``defaults`` elsewhere; lists as lists."""
        out = {}
        for c in columns:
            default = defaults.get(c)
            out[c] = [v if m else (list(default) if isinstance(default, list) else default) for v, m in zip(res[c], mine)]
            if c in self.snap.list_columns:
                out[c] = [list(v) if v is not None else [] for v in out[c]]
        return out

    def fetch(self, user_ids: np.ndarray) -> tuple[dict[str, list], np.ndarray]:
        """Stored user columns for ``user_ids`` (cold-start defaults where unknown) and the cold-start mask."""
        res = self._read(USER_VIEW, self.user_id, self.snap.user_columns, _python_ids(user_ids))
        snaps = res[SNAPSHOT_FIELD]
        mine = np.array([s == self.snap.id for s in snaps], dtype=bool)
        if any(s is not None and s != self.snap.id for s in snaps):
            self._check_current()  # another version's rows: stale users of an older version, or the wrong version
        return self._filled(res, self.snap.user_columns, mine, self.snap.defaults), ~mine

    def fetch_items(self, item_ids: np.ndarray) -> tuple[dict[str, list], np.ndarray]:
        """Stored item columns for ``item_ids`` (the snapshot's ``item_defaults`` where the store does not hold the
        item from this version's snapshot) and the unknown-item mask; the same store, readers and errors as
        :meth:`fetch`. Callers check the store's version through :meth:`fetch` (or :meth:`check_current`)."""
        res = self._read(ITEM_VIEW, self.snap.item_id, self.snap.item_columns, _python_ids(item_ids))
        known = np.array([s == self.snap.id for s in res[SNAPSHOT_FIELD]], dtype=bool)  # an older snapshot's: unknown
        return self._filled(res, self.snap.item_columns, known, self.snap.item_defaults), ~known

    def check_current(self) -> None:
        """The store must hold this version's snapshot (:class:`FeatureStoreError` otherwise): for a request whose
        rows :meth:`fetch` could not tie to this version (every user unknown)."""
        self._open()
        self._check_current()

    def _where(self) -> str:
        return self.settings.where() if self.settings is not None else "?"

    def _check_current(self) -> None:
        """The store's meta row must name this version's snapshot; else the store is out of step with the model."""
        try:
            state = store_state(self.settings.repo, self.store)  # type: ignore[union-attr]
        except Exception as exc:  # noqa: BLE001
            raise FeatureStoreError(f"feature store unreachable: {type(exc).__name__}: {str(exc)[:300]}") from exc
        if state is None or state["snapshot"] != self.snap.id:
            held = "nothing" if state is None else f"version {state['version']}'s features (snapshot {state['snapshot']})"
            raise FeatureStoreError(
                f"the feature store holds {held}, not this version's (snapshot {self.snap.id}): user-id requests "
                f"would get another version's features; run `recsys features` for the served version")

    def complete(self, arrays: dict[str, np.ndarray], missing: list[str]) -> tuple[dict[str, np.ndarray], np.ndarray]:
        """Request tensors + the ``missing`` request columns looked up by the request's user ids (lists as
        ``__values`` / ``__offsets``), and the cold-start mask."""
        if self.user_id not in arrays:
            from pipeline_lib.validate.requests import BadRequest

            raise BadRequest(f"missing input '{self.user_id}': a request without the feature columns {missing} "
                             f"must carry the user id")
        found, cold = self.fetch(arrays[self.user_id])
        out = dict(arrays)
        for c in missing:
            out.update(self.tensors(c, found[c]))
        return out, cold

    def tensors(self, name: str, values: list) -> dict[str, np.ndarray]:
        """One stored column as Triton would have delivered it (strings as bytes, lists as values + offsets)."""
        dtype = self.snap.dtypes[name]
        if name in self.snap.list_columns:
            lengths = [len(v) for v in values]
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            flat = [x for v in values for x in v]
            return {f"{name}__values": _typed(flat, dtype), f"{name}__offsets": offsets}
        return {name: _typed(values, dtype)}


def _typed(values: list, dtype: str) -> np.ndarray:
    kind = np.dtype(dtype).kind if dtype not in ("object", "str", "string") else "O"
    if kind in "OUS":
        return np.array([str(v).encode("utf-8") for v in values], dtype=object)
    return np.asarray(values, dtype=np.dtype(dtype))


def frame_of(found: dict[str, list], user_ids: list, user_id: str) -> pd.DataFrame:
    """Looked-up columns as a raw frame (the CLI and tests)."""
    return pd.DataFrame({user_id: user_ids, **found})


class ItemLookup(UserLookup):
    """Completes session requests of one version from the model's feature store: the item feature lists a request
    leaves out are looked up by the events' item ids (``item_features`` view, :meth:`UserLookup.fetch_items`; an
    item the store does not hold gets the snapshot's ``item_defaults``, a value outside the training vocabulary).
    The store is opened as for user-id requests and must hold this version's snapshot (its meta row), else
    :class:`~pipeline_lib.features.store.FeatureStoreError` (UNAVAILABLE)."""

    @property
    def item_id(self) -> str:
        return self.snap.item_id

    def complete_items(self, arrays: dict[str, np.ndarray], missing: list[str]) -> dict[str, np.ndarray]:
        """Session request tensors + the ``missing`` item feature lists: one value per event of the item id list
        (its ``__offsets``)."""
        values, offsets = arrays.get(f"{self.item_id}__values"), arrays.get(f"{self.item_id}__offsets")
        if values is None or offsets is None:
            from pipeline_lib.validate.requests import BadRequest

            raise BadRequest(f"missing input '{self.item_id}__values' / '{self.item_id}__offsets': a session request "
                             f"without the item features {missing} must carry its item ids")
        ids = _python_ids(values)
        unique = list(dict.fromkeys(ids))
        found: dict[str, list] = {c: [] for c in self.snap.item_columns}
        if unique:
            found, unknown = self.fetch_items(np.asarray(unique))
            if unknown.any():  # not this snapshot's rows: new items, or the store holds another version (raises)
                self.check_current()
        at = {u: i for i, u in enumerate(unique)}
        out = dict(arrays)
        for c in missing:
            out[f"{c}__values"] = _typed([found[c][at[u]] for u in ids], self.snap.dtypes[c])
            out[f"{c}__offsets"] = np.asarray(offsets, dtype=np.int32)
        return out
