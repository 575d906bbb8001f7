"""A Feast feature store per served model, filled from the served version's snapshot.

Layout (``features.repo``, default ``feature_store/`` beside the model repository)::

    <repo>/<model>/feature_store.yaml   Feast repo config: SQLite online store (online.db) or Redis, file offline store
    <repo>/<model>/registry.db          Feast registry (entities, feature views)
    <repo>/<model>/data/                the offline source of the last materialization (parquet, one per view)
    <model_repository>/<model>/feature_store.json   where the served model finds the store

Three feature views, keyed by raw ids: ``user_features`` (the snapshot's user columns, the history list, the
snapshot id and the model version that wrote them), ``item_features`` (the item columns and the snapshot id: an
item only an older snapshot held is not this version's) and ``store_meta``
(one row: the snapshot id and version now in the store). :func:`materialize` writes a version's snapshot with
the current time as event time, so it always replaces what the store held (Redis keeps the newest event).
"""
from __future__ import annotations

import datetime as dt
import json
import logging
import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from pipeline_lib.features.snapshot import ITEMS_FILE, USERS_FILE, Snapshot, has_snapshot, snapshot_dir

os.environ.setdefault("FEAST_USAGE", "False")  # Feast sends usage statistics otherwise

log = logging.getLogger(__name__)

STORE_POINTER = "feature_store.json"  # <model_repository>/<model>/feature_store.json
USER_VIEW, ITEM_VIEW, META_VIEW = "user_features", "item_features", "store_meta"
SNAPSHOT_FIELD, VERSION_FIELD = "snapshot_id", "model_version"
META_KEY, META_ID = "store_key", "current"
EVENT_TS = "event_timestamp"
# the served lookups' Redis client (bound_redis): a Redis that is down or hung costs a request about
# (1 + REDIS_RETRIES) x REDIS_TIMEOUT_S at most, not redis-py's default 10 retries with backoff (~3 s a request)
REDIS_TIMEOUT_S = 0.5  # socket connect and read timeouts, unless the connection string names its own
REDIS_RETRIES = 1  # one immediate retry: a pooled connection that a Redis restart closed reconnects at once


class FeatureStoreError(RuntimeError):
    """The store cannot be used (unreachable, not filled, or filled by another version): served as UNAVAILABLE."""

    triton_code = "UNAVAILABLE"


@dataclass
class StoreSettings:
    """Where a model's Feast repo is and which online store it uses (``features`` of a RunConfig)."""

    repo: Path
    online_store: str = "sqlite"
    redis_connection: str = "localhost:6379"

    @classmethod
    def from_config(cls, cfg) -> "StoreSettings":
        f = cfg.features
        root = Path(f.repo) if f.repo else Path(cfg.export.model_repository).parent / "feature_store"
        return cls((root / cfg.export.model_name).resolve(), f.online_store, f.redis_connection)

    def where(self) -> str:
        """The store for messages: Redis's host:port (never the connection string's password) or the repo folder."""
        return f"{self.redis_connection.split(',')[0]} (Feast repo {self.repo})" if self.online_store == "redis" \
            else str(self.repo)

    def to_json(self) -> dict:
        return {"repo": str(self.repo), "online_store": self.online_store, "redis_connection": self.redis_connection}


def project_name(repo: Path) -> str:
    """Feast project name of a repo folder (letters, digits, underscores)."""
    return re.sub(r"[^A-Za-z0-9_]", "_", Path(repo).name) or "recsys"


def write_repo_config(s: StoreSettings) -> Path:
    """``feature_store.yaml`` of the model's repo (created with its folder)."""
    s.repo.mkdir(parents=True, exist_ok=True)
    if s.online_store == "redis":
        online = f"  type: redis\n  connection_string: \"{s.redis_connection}\"\n"
    else:
        online = f"  type: sqlite\n  path: {s.repo / 'online.db'}\n"
    text = (f"project: {project_name(s.repo)}\nregistry: {s.repo / 'registry.db'}\nprovider: local\n"
            f"online_store:\n{online}offline_store:\n  type: file\nentity_key_serialization_version: 2\n")
    path = s.repo / "feature_store.yaml"
    path.write_text(text)
    return path


def _feast_type(dtype: str, is_list: bool):
    from feast import types

    kind = np.dtype(dtype).kind if dtype not in ("object", "str", "string") else "O"
    base = {"i": types.Int64, "u": types.Int64, "f": types.Float64, "b": types.Bool}.get(kind, types.String)
    return types.Array(base) if is_list else base


def _value_type(dtype: str):
    from feast import ValueType

    kind = np.dtype(dtype).kind if dtype not in ("object", "str", "string") else "O"
    return ValueType.INT64 if kind in "iu" else ValueType.STRING


def _definitions(snap: Snapshot, data: Path) -> list:
    """Feast objects of a snapshot: entities user / item / store, the three feature views over ``data``'s parquet."""
    from feast import Entity, FeatureView, Field, FileSource
    from feast import types

    user = Entity(name="user", join_keys=[snap.user_id], value_type=_value_type(snap.dtypes[snap.user_id]))
    item = Entity(name="item", join_keys=[snap.item_id], value_type=_value_type(snap.dtypes[snap.item_id]))
    meta = Entity(name="store", join_keys=[META_KEY], value_type=_value_type("object"))

    def view(name: str, entity, cols: list[str], lists: list[str], extra: list) -> Any:
        source = FileSource(name=f"{name}_source", path=str(data / f"{name}.parquet"), timestamp_field=EVENT_TS)
        fields = [Field(name=c, dtype=_feast_type(snap.dtypes[c], c in lists)) for c in cols] + extra
        return FeatureView(name=name, entities=[entity], schema=fields, source=source, ttl=dt.timedelta(0), online=True)

    stamp = [Field(name=SNAPSHOT_FIELD, dtype=types.String), Field(name=VERSION_FIELD, dtype=types.Int64)]
    return [user, item, meta,
            view(USER_VIEW, user, snap.user_columns, snap.list_columns, stamp),
            view(ITEM_VIEW, item, snap.item_columns, snap.list_columns, stamp[:1]),
            view(META_VIEW, meta, [], [], stamp)]


def open_store(repo: Path):
    """Feast's ``FeatureStore`` over a repo folder."""
    from feast import FeatureStore

    return FeatureStore(repo_path=str(repo))


def bound_redis(fs: Any, read_timeout_s: Optional[float] = REDIS_TIMEOUT_S) -> None:
    """Bound what a lookup waits for a Redis online store that is down or hung: socket connect and read timeouts of
    :data:`REDIS_TIMEOUT_S` (where ``redis_connection`` names none, e.g. ``"host:6379,socket_timeout=2"``) and
    :data:`REDIS_RETRIES` immediate retries instead of redis-py's default (10 retries, exponential backoff up to 1 s:
    about 3 s a request with Redis down, during which the model instance answers nothing and a stopping Triton
    waits). ``read_timeout_s`` None: redis-py's read timeout (5 s: :func:`materialize`'s large writes). No-op for
    another online store."""
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    cfg = fs.config.online_store
    if getattr(cfg, "type", None) != "redis":
        return
    client = fs._get_provider().online_store._get_client(cfg)  # Feast's own client (created, not yet connected)
    named = {c.split("=", 1)[0].strip() for c in cfg.connection_string.split(",") if "=" in c}
    kwargs = client.connection_pool.connection_kwargs
    for key, value in (("socket_timeout", read_timeout_s), ("socket_connect_timeout", REDIS_TIMEOUT_S)):
        if key not in named and value is not None:
            kwargs[key] = value
    client.set_retry(Retry(NoBackoff(), REDIS_RETRIES))


def materialize(s: StoreSettings, artifact_dir: Path, model_version: int) -> dict:
    """Write the snapshot of the version at ``artifact_dir`` (``<N>/topk``) into the model's store: apply the
    feature views, materialize users, items and the store's meta row with the current time. Returns what was
    written (users, items, snapshot id, version, seconds)."""
    if not has_snapshot(artifact_dir):
        raise FeatureStoreError(f"{artifact_dir} has no feature snapshot ({snapshot_dir(artifact_dir)}): the version "
                                f"was exported without features.enabled, so its users cannot be served by id")
    t0 = time.perf_counter()
    snap = Snapshot.load(snapshot_dir(artifact_dir))
    write_repo_config(s)
    data = s.repo / "data"
    data.mkdir(exist_ok=True)
    now = pd.Timestamp.now(tz="UTC").floor("s")
    users = pd.read_parquet(snapshot_dir(artifact_dir) / USERS_FILE)
    items = pd.read_parquet(snapshot_dir(artifact_dir) / ITEMS_FILE)
    stamp = {SNAPSHOT_FIELD: snap.id, VERSION_FIELD: int(model_version), EVENT_TS: now}
    frames = {USER_VIEW: users.assign(**stamp), ITEM_VIEW: items.assign(**{SNAPSHOT_FIELD: snap.id, EVENT_TS: now}),
              META_VIEW: pd.DataFrame([{META_KEY: META_ID, **stamp}])}
    for name, frame in frames.items():  # the views' offline sources
        frame.to_parquet(data / f"{name}.parquet", index=False)
    store = open_store(s.repo)
    try:
        bound_redis(store, read_timeout_s=None)  # Redis down: the run's error at once, not after ~3 s of retries
        t1 = time.perf_counter()
        store.apply(_definitions(snap, data))
        t2 = time.perf_counter()
        # straight into the online store (Feast's write_to_online_store; its file-offline materialize runs dask)
        for name, frame in frames.items():
            if len(frame):  # a session version's snapshot has items only (Feast cannot write an empty frame)
                store.write_to_online_store(name, frame)
        log.debug("apply %.2f s, write %.2f s", t2 - t1, time.perf_counter() - t2)
    except Exception as exc:  # noqa: BLE001 - Redis down, disk full: name the store
        raise FeatureStoreError(f"could not write the features of version {model_version} into the "
                                f"{s.online_store} store at {s.where()}: {type(exc).__name__}: {exc}") from exc
    info = {"snapshot": snap.id, "version": int(model_version), "users": snap.n_users, "items": snap.n_items,
            "online_store": s.online_store, "repo": str(s.repo), "seconds": round(time.perf_counter() - t0, 3)}
    log.info("feature store: version %d's features (%d users, %d items, snapshot %s) materialized into the %s store "
             "in %.2f s", model_version, snap.n_users, snap.n_items, snap.id, s.online_store, info["seconds"])
    return info


def check_reachable(s: StoreSettings) -> None:
    """A Redis online store answers PING within the served lookups' bounds (:func:`bound_redis`), else
    :class:`FeatureStoreError` naming its host:port. Nothing to check for SQLite (a file the run creates)."""
    if s.online_store != "redis":
        return
    import redis
    from feast.infra.online_stores.redis import RedisOnlineStore
    from redis.backoff import NoBackoff
    from redis.retry import Retry

    nodes, kwargs = RedisOnlineStore._parse_connection_string(s.redis_connection)  # Feast's own reading of it
    for key in ("socket_timeout", "socket_connect_timeout"):
        kwargs.setdefault(key, REDIS_TIMEOUT_S)
    client = redis.Redis(host=nodes[0]["host"], port=int(nodes[0]["port"]), retry=Retry(NoBackoff(), REDIS_RETRIES),
                         **kwargs)
    try:
        client.ping()
    except redis.RedisError as exc:
        raise FeatureStoreError(f"the redis online store at {s.where()} does not answer ({type(exc).__name__}: "
                                f"{exc}); nothing was run. Start it, or fix features.redis_connection "
                                f"(or --set features.online_store=sqlite)") from exc
    finally:
        client.close()


def write_pointer(model_dir: Path, s: StoreSettings) -> Path:
    """``<model_repository>/<model>/feature_store.json``: where the served model reads features from."""
    path = Path(model_dir) / STORE_POINTER
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(s.to_json(), indent=2))
    tmp.replace(path)
    return path


def read_pointer(model_dir: Path) -> Optional[StoreSettings]:
    path = Path(model_dir) / STORE_POINTER
    if not path.is_file():
        return None
    d = json.loads(path.read_text())
    return StoreSettings(Path(d["repo"]), d.get("online_store", "sqlite"), d.get("redis_connection", "localhost:6379"))


def store_state(repo: Path, fs: Any = None) -> Optional[dict]:
    """The snapshot id and model version the store holds now (None when it was never filled); ``fs``: the store
    already open (a served lookup's, :func:`bound_redis`), else opened here."""
    res = (fs if fs is not None else open_store(repo)).get_online_features(
        features=[f"{META_VIEW}:{SNAPSHOT_FIELD}", f"{META_VIEW}:{VERSION_FIELD}"],
        entity_rows=[{META_KEY: META_ID}]).to_dict()
    if res[SNAPSHOT_FIELD][0] is None:
        return None
    return {"snapshot": res[SNAPSHOT_FIELD][0], "version": res[VERSION_FIELD][0]}


def item_rows(repo: Path, item_column: str, item_ids: list) -> pd.DataFrame:
    """The stored item features of ``item_ids`` (one row each, in order; missing items: empty values)."""
    store = open_store(repo)
    names = [f.name for f in store.get_feature_view(ITEM_VIEW).features if f.name != SNAPSHOT_FIELD]
    res = store.get_online_features(features=[f"{ITEM_VIEW}:{n}" for n in names],
                                    entity_rows=[{item_column: v} for v in item_ids]).to_dict()
    return pd.DataFrame({item_column: item_ids, **{n: res[n] for n in names}})
