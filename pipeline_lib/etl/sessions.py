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

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from pipeline_lib.config import EtlConfig, SessionColumns, SplitConfig
from pipeline_lib.etl.lambda_ops import time_deltas  # also importable here: workflows pickled before it moved
from pipeline_lib.etl.workflow import dask_context, holdout_masks, resolve_device

log = logging.getLogger(__name__)

TIME_DELTA = "time_delta"  # feature-workflow output: log1p(seconds since the previous event), first event 0



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
    test: Optional[Path] = None  # raw held-out test sessions (scored through versions; never transformed)


def split_sessions(sessions_path: Path, split: SplitConfig, cols: SessionColumns, seed: int, out_dir: Path) -> SessionSplit:
    """Hold out whole sessions for validation and test: random shares by seed, or (``method: time``)
    the sessions that start last are test and the next ones validation (:func:`holdout_masks`)."""
    df = pd.read_parquet(sessions_path)
    if split.method == "time":
        is_valid, is_test = holdout_masks(len(df), split, seed, df[cols.timestamp].map(lambda v: v[0]))
    else:
        is_valid, is_test = holdout_masks(len(df), split, seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    out = SessionSplit(out_dir / "train.parquet", out_dir / "valid.parquet", out_dir / "test.parquet")
    df.loc[~(is_valid | is_test)].reset_index(drop=True).to_parquet(out.train, index=False)
    df.loc[is_valid].reset_index(drop=True).to_parquet(out.valid, index=False)
    df.loc[is_test].reset_index(drop=True).to_parquet(out.test, index=False)
    return out


# --- feature workflow (fitted; served) ---------------------------------------------------------


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
    split: SessionSplit          # raw session lists (train / validation / test)
    etl_path: str = "nvtabular (the session ETL has no fast path)"  # as EtlOutput.etl_path


def run_session_etl(events_path: Path, cfg, out_root: Path, split_dir: Path) -> SessionEtlOutput:
    """Group events into sessions, split by session, fit the feature workflow on train, transform both."""
    from merlin.io import Dataset


    s = cfg.session
    device = resolve_device(cfg.etl.device)
    # absolute: workers of an existing dask cluster (etl.dask) do not share our working directory
    events_path, out_root, split_dir = Path(events_path).absolute(), Path(out_root).absolute(), Path(split_dir).absolute()
    with dask_context(device, cfg.etl.dask):
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
    log.info("sessions: %d train, %d validation, %d test", train_ds.num_rows, valid_ds.num_rows,
             len(pd.read_parquet(split.test, columns=[s.columns.session_id])))
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
