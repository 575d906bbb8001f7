"""Session-based next-item recommendation: data and ETL (``task: session``).

Raw data is an event log, one row per interaction: ``session_id``, ``item_id``, ``timestamp`` and
per-event item features (``item_category`` by default). Two NVTabular workflows turn it into
what a sequence model trains on:

1. the **grouping workflow** (stat-free, raw -> raw): ``nvt.ops.Groupby`` of the events by
   session id, sorted by timestamp, into one row per session with list columns (``item_id``,
   ``item_category``, ``timestamp`` as lists of raw values), and ``nvt.ops.Filter`` dropping
   sessions shorter than ``session.etl.min_session_length``;
2. the **feature workflow** (fitted on the training sessions only, and *served*): ``Categorify``
   of the item-id and item-feature lists, time deltas between consecutive events from the
   timestamp list (``log1p`` of seconds, float32), and ``nvt.ops.ListSlice`` keeping the last
   ``session.etl.max_session_length`` events. Its Merlin schema tags the lists ``SEQUENCE`` /
   ``LIST`` and the item-id list ``ITEM_ID``.

A served request is one session so far in the grouped form (raw item ids and features as lists,
``__values``/``__offsets`` on the wire), so the feature workflow is the same object offline and
in Triton. The hold-out split is by session (random by seed, or the most recent sessions).
"""
from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline_lib.config import DataConfig, EtlConfig, SessionColumns, SessionConfig, SessionSyntheticConfig, SplitConfig
from pipeline_lib.validate import DataValidationError, Problem

log = logging.getLogger(__name__)

TIME_DELTA = "time_delta"  # feature-workflow output: log1p(seconds since the previous event), first event 0


# --- the synthetic default ---------------------------------------------------------------------


def _next_item(rng: np.random.Generator, r: float, cur: int, c: int, visited: set, succ: np.ndarray,
               succ_w: np.ndarray, by_cat: list, p_cat: list, p_global: np.ndarray, cfg: SessionSyntheticConfig) -> int:
    """One move of a session (successor, intent or popular item), never to an item the session
    already holds: people rarely click the same item twice in a row of browsing, and the default
    protocol (``session.exclude_seen``) never recommends it. Gives up after a few draws (tiny
    catalogues) and then allows a revisit."""
    for _ in range(8):
        if r < cfg.p_successor:
            w = np.where(np.isin(succ[cur], list(visited)), 0.0, succ_w[cur])
            if w.sum() > 0:
                return int(succ[cur, rng.choice(len(w), p=w / w.sum())])
            r = cfg.p_successor  # every successor seen: an intent move instead
        if r < cfg.p_successor + cfg.p_intent:
            nxt = int(rng.choice(by_cat[c], p=p_cat[c]))
        else:
            nxt = int(rng.choice(len(p_global), p=p_global))
        if nxt not in visited:
            return nxt
    return nxt


def generate_sessions(cfg: SessionSyntheticConfig, seed: int) -> pd.DataFrame:
    """An event log with learnable sequential structure.

    Items belong to categories (Zipf popularity within a category). Every item has a few
    *successors* (mostly in its own category) with Dirichlet weights. A session draws an intent
    category, starts on an item of it, and then moves: with ``p_successor`` to a successor of the
    current item (a Markov transition), with ``p_intent`` to an item of the session's intent
    category (a session-level dependency a last-item model cannot see), otherwise to a globally
    popular item (noise), never to an item the session already holds (:func:`_next_item`). Lengths are geometric (mean ``mean_length``) clipped to
    ``[min_length, max_length]``; gaps between events are log-normal seconds.
    """
    rng = np.random.default_rng(seed)
    n, C = cfg.n_items, cfg.n_categories
    category = rng.integers(0, C, n)
    pop = 1.0 / np.power(np.arange(1, n + 1), cfg.popularity_skew)
    pop = pop[rng.permutation(n)]
    p_global = pop / pop.sum()
    by_cat = [np.flatnonzero(category == c) for c in range(C)]
    by_cat = [idx if len(idx) else rng.integers(0, n, 1) for idx in by_cat]
    p_cat = [pop[idx] / pop[idx].sum() for idx in by_cat]
    cat_weight = np.array([pop[idx].sum() for idx in by_cat])
    cat_weight /= cat_weight.sum()

    S = cfg.successors
    succ = np.empty((n, S), dtype=np.int64)
    for i in range(n):
        own = by_cat[category[i]]
        k_own = S - 1 if S > 1 else S
        succ[i, :k_own] = rng.choice(own, size=k_own, p=p_cat[category[i]])
        succ[i, k_own:] = rng.integers(0, n, S - k_own)
    succ_w = rng.dirichlet(np.full(S, 0.6), size=n)

    lengths = np.clip(rng.geometric(1.0 / max(cfg.mean_length, 1.0), cfg.n_sessions), cfg.min_length, cfg.max_length)
    intents = rng.choice(C, size=cfg.n_sessions, p=cat_weight)
    starts = np.sort(rng.uniform(0, cfg.days * 86400.0, cfg.n_sessions))
    total = int(lengths.sum())
    items = np.empty(total, dtype=np.int64)
    sess = np.repeat(np.arange(cfg.n_sessions, dtype=np.int64), lengths)
    u = rng.random(total)
    pos = 0
    for s in range(cfg.n_sessions):
        c = intents[s]
        cur = rng.choice(by_cat[c], p=p_cat[c])
        items[pos] = cur
        visited = {int(cur)}
        for j in range(1, lengths[s]):
            cur = _next_item(rng, u[pos + j], cur, c, visited, succ, succ_w, by_cat, p_cat, p_global, cfg)
            visited.add(int(cur))
            items[pos + j] = cur
        pos += lengths[s]
    gaps = np.exp(rng.normal(3.5, 1.0, total))  # seconds
    first = np.r_[0, np.cumsum(lengths)[:-1]]
    gaps[first] = 0.0
    t = np.cumsum(gaps)
    t = t - np.repeat(t[first], lengths) + np.repeat(starts, lengths)
    df = pd.DataFrame({
        "session_id": sess + 1,
        "item_id": items + 1,  # raw ids start at 1
        "item_category": category[items] + 1,
        "timestamp": t.astype(np.int64) + 1_700_000_000,
    })
    # an event log arrives in time order, sessions interleaved
    return df.sort_values(["timestamp", "session_id"], kind="stable").reset_index(drop=True)


# --- raw stage ---------------------------------------------------------------------------------


def write_raw_events(data: DataConfig, session: SessionConfig, seed: int, out_dir: Path) -> Path:
    """Materialise the event log as ``out_dir/interactions.parquet`` (synthetic or the user's file).

    ``data.source: parquet`` reads ``data.path``; ``files`` reads ``data.interactions`` (CSV or
    parquet, with ``rename:``) and left-joins an optional ``data.items`` table on the item id.
    Only the session columns (``session.columns``) are kept from each file; the others (an unnamed
    index column, anything unused) are ignored and listed in the load report. A used column
    present in both files (other than the item id) is an error naming both.
    """
    from pipeline_lib.config import TableConfig
    from pipeline_lib.data import _dates_to_epoch_seconds, read_table

    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "interactions.parquet"
    cols = session.columns
    report: dict = {"source": data.source, "files": {}, "column_sources": {}, "unmatched": []}
    if data.source == "synthetic":
        df = generate_sessions(session.synthetic, seed)
        df = df.rename(columns={"session_id": cols.session_id, "item_id": cols.item_id, "timestamp": cols.timestamp})
        if cols.item_features != ["item_category"]:
            df = df.drop(columns=["item_category"])
    elif data.source in ("parquet", "files"):
        keep = cols.raw_columns
        spec = TableConfig(path=data.path, format="parquet") if data.source == "parquet" else data.interactions
        inter = read_table("interactions", spec, keep)
        tables = [inter]
        df = inter.df
        report["files"]["interactions"] = spec.path
        report["column_sources"] = {str(c): spec.path for c in df.columns}
        if data.source == "files" and data.items is not None:
            items = read_table("items", data.items, keep)
            tables.append(items)
            report["files"]["items"] = data.items.path
            key = cols.item_id
            problems = [Problem(t.file, key, f"join key missing from the {t.role} table", example=t.all_columns[:10])
                        for t in tables if key not in t.df.columns]
            problems += [Problem(data.items.path, c, f"column also present in {spec.path}; rename it (rename:)")
                         for c in items.df.columns if c != key and c in df.columns]
            if problems:
                raise DataValidationError(problems)
            df = df.merge(items.df.drop_duplicates(key), on=key, how="left")
            report["column_sources"].update({str(c): data.items.path for c in items.df.columns if c != key})
        ignored = {t.file: list(t.ignored) for t in tables if t.ignored}
        if ignored:
            report["ignored_columns"] = ignored
        if cols.timestamp in df.columns and df[cols.timestamp].dtype == object:
            df[cols.timestamp] = _dates_to_epoch_seconds(df[cols.timestamp])
    else:
        raise ValueError(f"task: session reads data.source synthetic, parquet or files, not '{data.source}'")
    df.to_parquet(out, index=False)
    (out_dir / "load_report.json").write_text(json.dumps(report, indent=2, default=str))
    return out


def validate_events(path: Path, cols: SessionColumns, out_dir: Path) -> Path:
    """Required columns, ids without nulls, numeric timestamps; statistics to ``stats.json``
    (the same layout as the ranking validation, so the drift report reads it)."""
    df = pd.read_parquet(path)
    problems: list[Problem] = []
    where = str(path)
    if len(df) == 0:
        problems.append(Problem(where, "*", "table has no rows"))
    side = Path(path).parent / "load_report.json"  # columns of the user's files the raw stage ignored
    ignored = json.loads(side.read_text()).get("ignored_columns", {}) if side.is_file() else {}
    in_files = sorted({str(c) for c in df.columns} | {str(c) for v in ignored.values() for c in v})
    for c in cols.raw_columns:
        if c not in df.columns:
            problems.append(Problem(where, c, "required column is missing", example=in_files[:10]))
    for c in (cols.session_id, cols.item_id, cols.timestamp):
        if c in df.columns and df[c].isna().any():
            problems.append(Problem(where, c, "column has nulls", int(df[c].isna().sum())))
    if cols.timestamp in df.columns and not pd.api.types.is_numeric_dtype(df[cols.timestamp]):
        problems.append(Problem(where, cols.timestamp, "timestamp not numeric (epoch seconds) or a date"))
    if problems:
        raise DataValidationError(problems)
    stats = {}
    for c in cols.raw_columns:
        s = df[c]
        kind = "id" if c in (cols.session_id, cols.item_id) else "timestamp" if c == cols.timestamp else "categorical"
        entry = {"kind": kind, "dtype": str(s.dtype), "null_rate": float(s.isna().mean()), "cardinality": int(s.nunique())}
        if pd.api.types.is_numeric_dtype(s):
            entry.update(mean=float(s.mean()), std=float(s.std()), min=float(s.min()), max=float(s.max()))
        stats[c] = entry
    lengths = df.groupby(cols.session_id).size()
    stats["_session_length"] = {"kind": "list", "dtype": "int64", "null_rate": 0.0, "cardinality": int(lengths.nunique()),
                                "mean_length": float(lengths.mean()), "std_length": float(lengths.std())}
    out_dir.mkdir(parents=True, exist_ok=True)
    p = out_dir / "stats.json"
    p.write_text(json.dumps({"path": str(path), "n_rows": len(df), "n_sessions": int(len(lengths)),
                             "columns": stats, "warnings": [], "sources": {}}, indent=2))
    return p


# --- grouping workflow (events -> sessions) -----------------------------------------------------


def strip_list_suffix(name: str) -> str:
    """Groupby names its outputs ``<col>_list``; the session table keeps the raw names."""
    return name[: -len("_list")] if name.endswith("_list") else name


class MinLength:
    """Filter predicate: keep sessions with at least ``n`` events (module-level: picklable)."""

    def __init__(self, column: str, n: int):
        self.column, self.n = column, n

    def __call__(self, df):
        col = df[self.column]
        lengths = col.list.len() if hasattr(col, "list") else col.map(len)
        return lengths >= self.n


def build_grouping_workflow(cols: SessionColumns, min_length: int):
    import nvtabular as nvt

    list_cols = [cols.item_id, cols.timestamp, *cols.item_features]
    grouped = [cols.session_id, *list_cols] >> nvt.ops.Groupby(
        groupby_cols=[cols.session_id], sort_cols=[cols.timestamp], aggs={c: ["list"] for c in list_cols}, name_sep="_",
    )
    renamed = grouped >> nvt.ops.Rename(f=strip_list_suffix)
    return nvt.Workflow(renamed >> nvt.ops.Filter(f=MinLength(cols.item_id, min_length)))


def group_sessions(events_path: Path, cols: SessionColumns, etl: EtlConfig, min_length: int, out_dir: Path):
    """Events -> one row per session (raw list columns), sessions shorter than ``min_length`` dropped.
    Returns (sessions parquet path, grouping workflow dir)."""
    from merlin.io import Dataset

    from pipeline_lib.etl import resolve_device

    cpu = resolve_device(etl.device) == "cpu"
    wf = build_grouping_workflow(cols, min_length)
    ds = Dataset(str(events_path), engine="parquet", part_size=etl.part_size, cpu=cpu)
    if ds.npartitions > 1:  # Groupby works per partition: bring each session into one
        ds = ds.shuffle_by_keys(keys=[cols.session_id])
    wf.fit(ds)
    df = wf.transform(ds).to_ddf().compute()
    if not cpu:
        df = df.to_pandas()
    df = df.sort_values(cols.session_id).reset_index(drop=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "sessions.parquet"
    df.to_parquet(path, index=False)
    wf.save(str(out_dir / "grouping_workflow"))
    return path, out_dir / "grouping_workflow"


@dataclass
class SessionSplit:
    train: Path
    valid: Path


def split_sessions(sessions_path: Path, split: SplitConfig, cols: SessionColumns, seed: int, out_dir: Path) -> SessionSplit:
    """Hold out whole sessions: a random share by seed, or (``method: time``) the sessions that start last."""
    df = pd.read_parquet(sessions_path)
    if split.method == "time":
        start = df[cols.timestamp].map(lambda v: v[0])
        is_valid = (start > start.quantile(1.0 - split.valid_fraction)).to_numpy()
    else:
        is_valid = np.random.default_rng(seed).random(len(df)) < split.valid_fraction
    out_dir.mkdir(parents=True, exist_ok=True)
    out = SessionSplit(out_dir / "train.parquet", out_dir / "valid.parquet")
    df.loc[~is_valid].reset_index(drop=True).to_parquet(out.train, index=False)
    df.loc[is_valid].reset_index(drop=True).to_parquet(out.valid, index=False)
    return out


# --- feature workflow (fitted; served) ---------------------------------------------------------


def time_deltas(col):
    """Per session: log1p(seconds since the previous event); 0 for the first (module-level: picklable)."""
    def one(v):
        a = np.asarray(v, dtype=np.float64)
        if not len(a):
            return np.zeros(0, dtype=np.float32)
        d = np.diff(a, prepend=a[0])
        return np.log1p(np.clip(d, 0.0, None)).astype(np.float32)

    if hasattr(col, "list"):  # cudf
        return col.to_pandas().map(one)
    return col.map(one)


def build_feature_workflow(cols: SessionColumns, max_length: int, categories_dir: Path):
    import nvtabular as nvt
    from merlin.schema import Tags

    out_path = str(categories_dir)
    trunc = nvt.ops.ListSlice(-max_length)
    seq = [Tags.SEQUENCE, Tags.LIST]
    item = ([cols.item_id] >> nvt.ops.Categorify(out_path=out_path) >> trunc
            >> nvt.ops.AddTags([Tags.ITEM_ID, Tags.ITEM, Tags.ID, Tags.CATEGORICAL, *seq]))
    outputs = item
    for f in cols.item_features:
        outputs = outputs + ([f] >> nvt.ops.Categorify(out_path=out_path) >> nvt.ops.ListSlice(-max_length)
                             >> nvt.ops.AddTags([Tags.ITEM, Tags.CATEGORICAL, *seq]))
    deltas = ([cols.timestamp] >> nvt.ops.LambdaOp(time_deltas, dtype="float32") >> nvt.ops.Rename(name=TIME_DELTA)
              >> nvt.ops.ListSlice(-max_length) >> nvt.ops.AddTags([Tags.CONTINUOUS, *seq]))
    return nvt.Workflow(outputs + deltas)


@dataclass
class SessionEtlOutput:
    workflow_dir: Path           # the fitted feature workflow (served)
    grouping_workflow_dir: Path  # events -> sessions
    train_dir: Path
    valid_dir: Path
    schema_path: Path
    device: str
    sessions_path: Path
    split: SessionSplit          # raw session lists (train / held-out)


def run_session_etl(events_path: Path, cfg, out_root: Path, split_dir: Path) -> SessionEtlOutput:
    """Group events into sessions, split by session, fit the feature workflow on train, transform both."""
    import nvtabular as nvt
    from merlin.io import Dataset

    from pipeline_lib.etl import _dask_context, resolve_device

    s = cfg.session
    device = resolve_device(cfg.etl.device)
    # absolute: workers of an existing dask cluster (etl.dask) do not share our working directory
    events_path, out_root, split_dir = Path(events_path).absolute(), Path(out_root).absolute(), Path(split_dir).absolute()
    with _dask_context(device, cfg.etl.dask):
        sessions_path, grouping_dir = group_sessions(events_path, s.columns, cfg.etl, s.etl.min_session_length,
                                                     out_root / "sessions")
        split = split_sessions(sessions_path, cfg.split, s.columns, cfg.seed, split_dir)
        wf = build_feature_workflow(s.columns, s.etl.max_session_length, out_root / "fit")
        cpu = device == "cpu"
        train_ds = Dataset(str(split.train), engine="parquet", cpu=cpu)
        valid_ds = Dataset(str(split.valid), engine="parquet", cpu=cpu)
        wf.fit(train_ds)
        train_dir, valid_dir = out_root / "train", out_root / "valid"
        wf.transform(train_ds).to_parquet(str(train_dir), output_files=1)
        wf.transform(valid_ds).to_parquet(str(valid_dir), output_files=1)
    wf.save(str(out_root / "workflow"))
    log.info("sessions: %d train, %d held out", train_ds.num_rows, valid_ds.num_rows)
    return SessionEtlOutput(out_root / "workflow", grouping_dir, train_dir, valid_dir, train_dir / "schema.pbtxt",
                            device, sessions_path, split)


def serving_columns(cols: SessionColumns) -> list[str]:
    """Raw list columns of one session, as a request carries them."""
    return [cols.item_id, *cols.item_features, cols.timestamp]


def item_vocabulary(workflow, item_col: str) -> np.ndarray:
    """Encoded index -> raw item id (object array; special slots hold None) from the fitted Categorify."""
    from nvtabular.ops import Categorify
    from merlin.dag import postorder_iter_nodes

    for node in postorder_iter_nodes(workflow.output_node):
        if isinstance(node.op, Categorify) and item_col in node.op.categories:
            vocab = pd.read_parquet(node.op.categories[item_col])  # index = encoded id (0-2 are special)
            out = np.full(int(vocab.index.max()) + 1, None, dtype=object)
            out[vocab.index.to_numpy()] = vocab[item_col].to_numpy(dtype=object)
            return out
    raise KeyError(f"no Categorify vocabulary for '{item_col}' in the workflow")


def prefixes(sessions: pd.DataFrame, cols: SessionColumns) -> tuple[pd.DataFrame, np.ndarray]:
    """Held-out evaluation: every session's events but the last (the request) and the last item id (the target)."""
    req = sessions[serving_columns(cols)].copy()
    for c in req.columns:
        req[c] = req[c].map(lambda v: list(v)[:-1])
    target = sessions[cols.item_id].map(lambda v: v[-1]).to_numpy()
    return req.reset_index(drop=True), target
