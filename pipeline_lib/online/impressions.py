"""The impression log: what each served request showed, written off the request thread.

A served model (``serving/triton_models/*.py``) calls :meth:`ImpressionLog.log` once per answered request with
its request id, the request's user (or session) ids and the items it answered with their scores; the call only
puts a tuple on a queue. A background thread wakes every ``flush_seconds``, turns what is queued into one
record per (request, user) and appends it as a parquet file under ``<root>/date=YYYY-MM-DD/hour=HH/`` (UTC, the
hour of the request). A file is written under a temporary name and renamed, so a reader (the online
evaluation, a collector tailing the folder) never sees half a file. :meth:`ImpressionLog.close` (the served
model's ``finalize``, on unload or a clean server stop) flushes the rest: a clean stop loses nothing; a crash
loses at most the last ``flush_seconds``.

Record columns (:data:`COLUMNS`): ``request_id``, ``ts`` (UTC), ``model``, ``version``, ``user_id`` (string;
empty when the request carries no user or session id), ``item_ids`` (strings, best first), ``ranks`` (1..n)
and ``scores``. The folder is the place a real deployment points its log collector at (docs/online.md).

The served model finds the log's settings in its environment (:func:`settings_from_env`): the server
that starts Triton sets them from the run's ``online.impressions`` config (:func:`server_env`).
"""
from __future__ import annotations

import atexit
import functools
import os
import queue
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Mapping, Optional, Sequence

import numpy as np

if TYPE_CHECKING:
    import pandas as pd

ENV_DIR = "RECSYS_IMPRESSIONS_DIR"
ENV_FLUSH = "RECSYS_IMPRESSIONS_FLUSH_S"
ENV_USER_COLUMNS = "RECSYS_IMPRESSIONS_USER_COLUMNS"
ENV_ITEM_COLUMN = "RECSYS_IMPRESSIONS_ITEM_COLUMN"
REQUEST_ID_OUTPUT = "request_id"
OFF_PARAMETER = "impression_log"  # config.pbtxt parameter: "off" turns one model's log off
COLUMNS = ["request_id", "ts", "model", "version", "user_id", "item_ids", "ranks", "scores"]
DEFAULT_USER_COLUMNS = ("user_id", "session_id")
MAX_RETRIES = 100  # failed flushes (a full disk) whose requests are queued again for the next one


@dataclass(frozen=True)
class ImpressionSettings:
    """Where the log goes and how often it is flushed; ``user_columns``: the request columns whose value names
    the user (first present wins: the user-id seam, :func:`subject_ids`); ``item_column``: a ranking request's
    item column (the items it shows)."""

    root: Path
    flush_seconds: float = 1.0
    user_columns: tuple[str, ...] = DEFAULT_USER_COLUMNS
    item_column: str = "item_id"


def server_env(root: Path, flush_seconds: float, user_columns: Sequence[str], item_column: str) -> dict[str, str]:
    """The environment variables that turn the log on in the served models of a Triton started with them."""
    return {ENV_DIR: str(Path(root).resolve()), ENV_FLUSH: str(float(flush_seconds)),
            ENV_USER_COLUMNS: ",".join(user_columns), ENV_ITEM_COLUMN: item_column}


def settings_from_env(env: Optional[Mapping[str, str]] = None) -> Optional[ImpressionSettings]:
    """The log's settings from the environment (None: logging is off)."""
    env = os.environ if env is None else env
    root = env.get(ENV_DIR)
    if not root:
        return None
    users = tuple(c for c in env.get(ENV_USER_COLUMNS, ",".join(DEFAULT_USER_COLUMNS)).split(",") if c)
    return ImpressionSettings(Path(root), float(env.get(ENV_FLUSH, "1.0")), users, env.get(ENV_ITEM_COLUMN, "item_id"))


def subject_ids(arrays: Mapping[str, np.ndarray], columns: Sequence[str], rows: int) -> np.ndarray:
    """The user (or session) id of each request row, as strings: the first of ``columns`` the request carries.

    This is the one seam where a user-id request (served through a feature store) names its user: add the
    column name to ``columns`` (``online.impressions.user_columns``). Rows without one get ''."""
    for name in columns:
        if name in arrays and not name.endswith("__values"):
            values = np.asarray(arrays[name]).reshape(-1)
            if len(values) == rows:
                return np.array([_text(v) for v in values], dtype=object)
    return np.full(rows, "", dtype=object)


def _text(v) -> str:
    return v.decode("utf-8", "replace") if isinstance(v, bytes) else str(v)


def new_request_id(given: str = "") -> str:
    """The client's request id when it sent one (Triton's request id), else a fresh one."""
    return given or uuid.uuid4().hex


class ImpressionLog:
    """One served model instance's log (see the module docstring); thread-safe, never raises into a request."""

    def __init__(self, settings: ImpressionSettings, model: str, version: int):
        self.settings, self.model, self.version = settings, model, int(version)
        self._queue: queue.SimpleQueue = queue.SimpleQueue()
        self._stop = threading.Event()
        self._seq = 0
        self._lock = threading.Lock()  # one flush at a time (the thread's, close()'s)
        self.errors: list[str] = []
        self.written = 0
        # imported at model load, not during the first flush (pyarrow's UTC timestamps import pandas)
        import pandas  # noqa: F401
        import pyarrow.compute
        import pyarrow.parquet  # noqa: F401

        _schema()
        self._thread = threading.Thread(target=self._run, name="impression-log", daemon=True)
        self._thread.start()
        atexit.register(self.close)

    def log(self, request_id: str, users: np.ndarray, item_ids: np.ndarray, scores: np.ndarray,
            ts: Optional[float] = None) -> None:
        """Queue one answered request: ``users`` [rows], ``item_ids`` / ``scores`` [rows, n] best first (a
        ranking request: [rows] each, grouped per user at flush time). Cheap: no conversion here."""
        self._queue.put((request_id, time.time() if ts is None else ts, users, item_ids, scores))

    def _run(self) -> None:
        while not self._stop.wait(self.settings.flush_seconds):
            self.flush()

    def flush(self) -> int:
        """Write what is queued; returns the records written."""
        with self._lock:
            entries = []
            while True:
                try:
                    entries.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if not entries:
                return 0
            try:
                n = self._write(records_of(entries, self.model, self.version))
                self.written += n
                return n
            except Exception as exc:  # noqa: BLE001 - never kill the server over its log; kept for the next flush
                self.errors.append(f"{type(exc).__name__}: {exc}")
                if len(self.errors) <= MAX_RETRIES:
                    for entry in entries:
                        self._queue.put(entry)
                return 0

    def _write(self, table) -> int:
        """One parquet file per UTC hour of the records (pyarrow only: the flush holds the GIL briefly)."""
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        hours = pc.divide(pc.cast(pc.cast(table["ts"], "int64"), "int64"), 3_600_000_000).to_numpy()
        distinct = np.unique(hours)
        for hour in distinct:
            part = table.filter(pa_mask(hours == hour)) if len(distinct) > 1 else table
            stamp = time.gmtime(int(hour) * 3600)
            folder = self.settings.root / time.strftime("date=%Y-%m-%d", stamp) / time.strftime("hour=%H", stamp)
            folder.mkdir(parents=True, exist_ok=True)
            self._seq += 1
            name = f"{self.model}-v{self.version}-{os.getpid()}-{int(time.time() * 1e3)}-{self._seq}.parquet"
            tmp = folder / f".{name}.tmp"
            pq.write_table(part, tmp)
            os.replace(tmp, folder / name)
        return table.num_rows

    def close(self) -> None:
        """Stop the thread and write everything still queued (idempotent)."""
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join(timeout=30)
        self.flush()


@functools.lru_cache(maxsize=1)
def _schema():
    import pyarrow as pa

    return pa.schema([("request_id", pa.string()), ("ts", pa.timestamp("us", tz="UTC")), ("model", pa.string()),
                      ("version", pa.int64()), ("user_id", pa.string()), ("item_ids", pa.list_(pa.string())),
                      ("ranks", pa.list_(pa.int32())), ("scores", pa.list_(pa.float32()))])


def pa_mask(mask: np.ndarray):
    import pyarrow as pa

    return pa.array(mask)


def records_of(entries: list, model: str, version: int):
    """Queued requests -> a pyarrow table of one record per (request, user), items best first."""
    import pyarrow as pa

    request_ids, stamps, users, items, scores = [], [], [], [], []
    for request_id, ts, row_users, ids, row_scores in entries:
        ids, row_scores = np.asarray(ids), np.asarray(row_scores, dtype=np.float32)
        for user, item_list, score_list in _per_user(np.asarray(row_users).reshape(-1), ids, row_scores):
            request_ids.append(request_id)
            stamps.append(ts)
            users.append(_text(user))
            items.append(item_list)
            scores.append(score_list)
    lengths = np.array([len(i) for i in items], dtype=np.int32)
    offsets = pa.array(np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32))
    flat = np.concatenate(items) if len(items) else np.array([], dtype=object)
    flat_text = flat.astype(str) if flat.dtype.kind in "iuf" else [_text(v) for v in flat]
    ranks = np.arange(len(flat), dtype=np.int32) - np.repeat(np.asarray(offsets)[:-1], lengths) + 1
    n = len(request_ids)
    micros = (np.asarray(stamps, dtype=np.float64) * 1e6).astype(np.int64)
    return pa.Table.from_arrays([  # in COLUMNS order; from_arrays (unlike pa.table) never imports pandas
        pa.array(request_ids, pa.string()), pa.array(micros, pa.timestamp("us", tz="UTC")),
        pa.array([model] * n, pa.string()), pa.array(np.full(n, int(version), dtype=np.int64)),
        pa.array(users, pa.string()),
        pa.ListArray.from_arrays(offsets, pa.array(flat_text, pa.string())),
        pa.ListArray.from_arrays(offsets, pa.array(ranks, pa.int32())),
        pa.ListArray.from_arrays(offsets, pa.array(
            np.concatenate(scores).astype(np.float32) if len(scores) else np.array([], np.float32), pa.float32())),
    ], schema=_schema())


def _per_user(users: np.ndarray, ids: np.ndarray, scores: np.ndarray):
    """(user, items best first, scores) of a request: a top-k answer per row, or a ranking request's rows
    grouped by user and ordered by score."""
    if ids.ndim == 2:  # top-k: [rows, k]; sentinel items (fewer valid than k) are dropped
        for r in range(ids.shape[0]):
            row = ids[r]
            keep = (row != b"") & (row != "") if row.dtype == object else row != -1
            yield users[r] if r < len(users) else "", ids[r][keep], scores[r][keep]
        return
    ids, scores = ids.reshape(-1), scores.reshape(-1)
    users = users if len(users) == len(ids) else np.full(len(ids), "", dtype=object)
    for user in dict.fromkeys(users.tolist()):
        rows = np.flatnonzero(users == user)
        order = rows[np.argsort(-scores[rows], kind="stable")]
        yield user, ids[order], scores[order]


def read_impressions(root: Path) -> "pd.DataFrame":
    """Every record under ``root`` (empty frame with :data:`COLUMNS` when there is none)."""
    import pandas as pd
    import pyarrow.parquet as pq

    files = sorted(p for p in Path(root).glob("date=*/hour=*/*.parquet"))
    if not files:
        return pd.DataFrame({c: [] for c in COLUMNS})
    frame = pd.concat([pq.read_table(f).to_pandas() for f in files], ignore_index=True)
    return frame[COLUMNS]


def open_for_model(args: Mapping, env: Optional[Mapping[str, str]] = None) -> Optional[ImpressionLog]:
    """The log of a served model instance (Triton's ``initialize`` args), or None when logging is off: no
    settings in the environment, or the model's config.pbtxt parameter ``impression_log`` is ``off``."""
    import json

    settings = settings_from_env(env)
    if settings is None:
        return None
    params = json.loads(args.get("model_config") or "{}").get("parameters", {})
    if str((params.get(OFF_PARAMETER) or {}).get("string_value", "")).lower() == "off":
        return None
    return ImpressionLog(settings, str(args["model_name"]), int(args["model_version"]))


def request_id_tensor(request_id: str, batched: bool = False) -> np.ndarray:
    """The ``request_id`` output: [1] (or [1, 1] for a dynamically batched model), BYTES."""
    value = np.array([request_id.encode("utf-8")], dtype=object)
    return value.reshape(1, 1) if batched else value
