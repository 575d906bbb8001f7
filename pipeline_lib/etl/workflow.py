"""Stage 3 -- validated -> transformed + schema: the NVTabular workflow.

The workflow is built from the run's column roles, fitted on the training split only, and
applied to train and validation. Output: parquet with its Merlin ``schema.pbtxt`` + the fitted workflow (``workflow/``). GPU (cudf + dask-cuda
LocalCUDACluster) is used when a GPU is visible, pandas/dask otherwise.
"""
from __future__ import annotations

import contextlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator, Optional

import numpy as np
import pandas as pd

from pipeline_lib.config import ColumnsConfig, DaskConfig, EtlConfig, FeatureKind, FeatureSide, SplitConfig
from pipeline_lib.etl import history as user_history
from pipeline_lib.etl.history import history_column  # re-exported (families, export)
from pipeline_lib.etl.lambda_ops import to_float32  # also importable here: workflows pickled before it moved

if TYPE_CHECKING:
    import distributed

log = logging.getLogger(__name__)


@dataclass
class SplitPaths:
    train: Path
    valid: Path
    test: Optional[Path] = None  # raw test rows (scored through exported versions; never transformed)


@dataclass
class EtlOutput:
    workflow_dir: Path
    train_dir: Path
    valid_dir: Path
    schema_path: Path
    device: str
    split: SplitPaths  # the raw train/valid/test split (the workflow is fitted on train, applied to train/valid)
    etl_path: str = "nvtabular"  # which ETL ran: "fast (...)" or "nvtabular" plus why (etl.fast_path)


def add_user_history(df: pd.DataFrame, columns: ColumnsConfig, length: int) -> pd.DataFrame:
    """Add ``<item_id>_history``: for every row, the user's most recent *positive* items with a strictly
    earlier timestamp (oldest first, at most ``length``; earlier rows when there is no timestamp).

    A row's own item is never in its history, so the column is a legitimate request-time feature
    (the user's recent clicks) for ranking and retrieval alike (:mod:`pipeline_lib.etl.history`).
    """
    out = df.copy()
    out[history_column(columns)] = user_history.recent_positive_items(df, columns, length)
    return out


def holdout_masks(n: int, split: SplitConfig, seed: int, order_key: Optional[pd.Series] = None
                  ) -> tuple[np.ndarray, np.ndarray]:
    """``(is_valid, is_test)`` boolean masks over ``n`` units (rows, or whole sessions).

    ``order_key`` given (``method: time``): the units with the largest keys are test (a
    ``test_fraction`` share), the next largest validation (``valid_fraction``), by quantile cuts,
    so test is never older than validation and validation never older than train. Otherwise random
    by ``seed``: one uniform draw per unit, below ``test_fraction`` test, below the two fractions
    together validation."""
    if order_key is not None:
        key = pd.Series(order_key).reset_index(drop=True)
        test_cut = key.quantile(1.0 - split.test_fraction)
        valid_cut = key.quantile(1.0 - split.test_fraction - split.valid_fraction)
        is_test = (key > test_cut).to_numpy()
        is_valid = ((key > valid_cut) & ~(key > test_cut)).to_numpy()
        return is_valid, is_test
    u = np.random.default_rng(seed).random(n)
    is_test = u < split.test_fraction
    return (~is_test) & (u < split.test_fraction + split.valid_fraction), is_test


def split_raw(raw_path: Path, split: SplitConfig, columns: ColumnsConfig, seed: int, out_dir: Path,
              history_length: int = 0, history_stats: bool = False) -> SplitPaths:
    """Split the raw table into train/valid/test parquet (random by seed, or by time: the newest
    rows are test, then validation; :func:`holdout_masks`); with ``history_length`` > 0, add the
    user-history feature first (see :func:`add_user_history`), with ``history_stats`` the numeric
    history features (``etl.history``: :mod:`pipeline_lib.etl.history`), both before the split."""
    out_dir.mkdir(parents=True, exist_ok=True)
    df = pd.read_parquet(raw_path)
    if history_stats:
        df = user_history.add_history_features(df, columns, history_length)
    elif history_length:
        df = add_user_history(df, columns, history_length)
    if split.method == "time":
        if not columns.timestamp or columns.timestamp not in df.columns:
            raise ValueError("split.method=time needs columns.timestamp present in the data")
        is_valid, is_test = holdout_masks(len(df), split, seed, df[columns.timestamp])
    else:
        is_valid, is_test = holdout_masks(len(df), split, seed)
    if history_length:
        # rows in random order: a time-ordered file starts with users who have no history yet, and
        # merlin-dataloader 23.08 fails on a batch in which every list is empty
        # (the split masks are permuted with the rows: they are positional)
        perm = np.random.default_rng(seed + 1).permutation(len(df))
        df, is_valid, is_test = df.iloc[perm], is_valid[perm], is_test[perm]
    paths = SplitPaths(out_dir / "train.parquet", out_dir / "valid.parquet", out_dir / "test.parquet")
    df.loc[~(is_valid | is_test)].reset_index(drop=True).to_parquet(paths.train, index=False)
    df.loc[is_valid].reset_index(drop=True).to_parquet(paths.valid, index=False)
    df.loc[is_test].reset_index(drop=True).to_parquet(paths.test, index=False)
    log.info("split (%s): %d train, %d validation, %d test rows", split.method, int((~(is_valid | is_test)).sum()),
             int(is_valid.sum()), int(is_test.sum()))
    return paths


def _continuous(name: str, log_first: bool):
    """FillMedian -> [LogOp] -> Normalize -> float32 of one raw column, tagged continuous."""
    import nvtabular as nvt
    from merlin.schema import Tags

    # a missing value takes the training median (a 0 would shift a year-like column's mean/std
    # and put the filled rows tens of standard deviations away; docs/ranking.md)
    node = [name] >> nvt.ops.FillMedian()
    if log_first:
        node = node >> nvt.ops.LogOp()
    node = node >> nvt.ops.Normalize() >> nvt.ops.LambdaOp(to_float32, dtype="float32")
    return node >> nvt.ops.AddTags([Tags.CONTINUOUS])


def build_workflow(columns: ColumnsConfig, categories_dir: Path, history: bool = False,
                   history_stats: bool = False):
    """Build (unfitted) NVTabular workflow from column roles, with Merlin tags.

    With ``history``, the user-history list column is encoded jointly with the item id (one
    shared vocabulary, so a history entry and an item id map to the same index). With
    ``history_stats``, the numeric history features (``etl.history``) are continuous user features.

    Categorify writes its vocabularies under ``categories_dir`` while fitting (NVTabular's
    default is ``./categories`` in the working directory, which concurrent runs would share).
    """
    import nvtabular as nvt
    from merlin.schema import Tags

    side_tags = {FeatureSide.user: [Tags.USER], FeatureSide.item: [Tags.ITEM], FeatureSide.context: [Tags.CONTEXT]}

    out_path = str(categories_dir)
    user_id = [columns.user_id] >> nvt.ops.Categorify(out_path=out_path) >> nvt.ops.TagAsUserID()
    if history:
        hist = history_column(columns)
        items = [[columns.item_id, hist]] >> nvt.ops.Categorify(encode_type="joint", out_path=out_path)
        item_id = (items[columns.item_id] >> nvt.ops.TagAsItemID()) + (
            items[hist] >> nvt.ops.AddTags([Tags.CATEGORICAL, Tags.USER, Tags.LIST, Tags.SEQUENCE]))
    else:
        item_id = [columns.item_id] >> nvt.ops.Categorify(out_path=out_path) >> nvt.ops.TagAsItemID()
    outputs = user_id + item_id

    for f in columns.features:
        if f.kind in (FeatureKind.categorical, FeatureKind.list):
            node = [f.name] >> nvt.ops.Categorify(freq_threshold=f.freq_threshold, out_path=out_path)
        else:
            node = _continuous(f.name, f.log)
        outputs = outputs + (node >> nvt.ops.AddTags(side_tags[f.side]))
    if history_stats:
        for name in user_history.NUMERIC:
            outputs = outputs + (_continuous(name, name in user_history.LOGGED) >> nvt.ops.AddTags([Tags.USER]))

    label = [columns.label] >> nvt.ops.AddTags([Tags.BINARY_CLASSIFICATION, Tags.TARGET])
    outputs = outputs + label
    return nvt.Workflow(outputs)


def resolve_device(requested: str) -> str:
    """'auto' -> 'gpu' when a GPU is visible (merlin's HAS_GPU), else 'cpu'."""
    from merlin.core.compat import HAS_GPU

    if requested == "gpu" and not HAS_GPU:
        raise RuntimeError("etl.device=gpu but no GPU is visible (merlin.core.compat.HAS_GPU is False)")
    if requested == "auto":
        return "gpu" if HAS_GPU else "cpu"
    return requested


_FLAT_DTYPES = (np.dtype("int64"), np.dtype("float64"))


@contextlib.contextmanager
def fast_list_flatten() -> Iterator[None]:
    """NVTabular's CPU path flattens a pandas list column with ``pd.Series(itertools.chain(*s))``
    (``merlin.core.dispatch.flatten_list_column_values``): one Python object per list value, the
    largest single cost of the ETL on the list feature (~67 % of the transform at 10M rows, see
    benchmarks/README.md). Within this context, a column whose rows are all numpy arrays of one
    dtype, int64 or float64, with at least one value, is flattened with ``np.concatenate`` instead:
    the same values, dtype and index. Anything else (lists, nulls, other dtypes, no values) goes to
    the original function. ``RECSYS_NVT_FAST_FLATTEN=0`` turns it off (to compare)."""
    from merlin.core import dispatch

    if os.environ.get("RECSYS_NVT_FAST_FLATTEN", "1") == "0":
        yield
        return

    original = dispatch.flatten_list_column_values

    def flatten_list_column_values(s):
        if isinstance(s, pd.Series) and len(s):
            rows = s.to_numpy()
            if all(type(v) is np.ndarray for v in rows):
                dtypes = {v.dtype for v in rows}
                if len(dtypes) == 1 and dtypes.pop() in _FLAT_DTYPES:
                    flat = np.concatenate(rows)
                    if len(flat):
                        return pd.Series(flat)
        return original(s)

    dispatch.flatten_list_column_values = flatten_list_column_values
    try:
        yield
    finally:
        dispatch.flatten_list_column_values = original


class _FastFlattenOnWorkers:
    """Dask worker plugin: :func:`fast_list_flatten` inside every worker process of the ETL's
    cluster (the patch in this process does not reach them). Module-level, so it pickles by
    reference: workers import it from their own ``pipeline_lib`` (they need it anyway for the
    workflow's ``to_float32``)."""

    name = "recsys-fast-list-flatten"

    def setup(self, worker=None):
        self._ctx = fast_list_flatten()
        self._ctx.__enter__()

    def teardown(self, worker=None):
        ctx = getattr(self, "_ctx", None)
        if ctx is not None:
            ctx.__exit__(None, None, None)


def _connect(dask_cfg) -> "distributed.Client":
    """A client of the existing scheduler at ``dask_cfg.scheduler_address``, or a clear error
    naming the address (unreachable, or no workers) within ``connect_timeout_s``."""
    from dask.distributed import Client

    address, timeout = dask_cfg.scheduler_address, dask_cfg.connect_timeout_s
    hint = ("Start one (`dask scheduler` + `dask worker <address>`, or `dask-cuda-worker` on GPU nodes; "
            "see docs/scale.md), fix etl.dask.scheduler_address, or remove it to run the ETL in this process.")
    try:
        client = Client(address, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError) as exc:
        raise RuntimeError(f"etl.dask.scheduler_address={address!r}: no dask scheduler reachable within "
                           f"{timeout:g} s ({exc}). {hint}") from exc
    try:
        client.wait_for_workers(1, timeout=timeout)
    except (TimeoutError, OSError) as exc:
        client.close()
        raise RuntimeError(f"etl.dask.scheduler_address={address!r}: the scheduler answers but has no workers "
                           f"after {timeout:g} s. {hint}") from exc
    return client


@contextlib.contextmanager
def dask_context(device: str, dask_cfg=None) -> Iterator[None]:
    """Where NVTabular's fit and transform run (``etl.dask``, see docs/scale.md):

    - ``scheduler_address``: a client of that existing cluster (nothing started; only the client
      is closed afterwards);
    - on GPU: a dask-cuda ``LocalCUDACluster``, one worker per visible GPU (``local_workers``: that
      many), each with an RMM pool of ``rmm_pool_size``;
    - on CPU with ``local_workers``: a ``LocalCluster`` of that many worker processes;
    - otherwise (CPU, default): no cluster, NVTabular's in-process synchronous scheduler.

    The client is made current only in this context (``Client.as_current`` and merlin's
    ``set_dask_client``), never the process-wide default, so concurrent in-process ETLs in other
    threads do not pick it up.
    """
    dask_cfg = dask_cfg or DaskConfig()
    if device != "gpu" and not dask_cfg.scheduler_address and not dask_cfg.local_workers:
        yield
        return
    from merlin.core import utils as merlin_utils

    client, cluster = _client(device, dask_cfg)
    plugin = None
    try:
        log.info("NVTabular on %s: %s", device.upper(), cluster or client)
        if device == "cpu":
            plugin = _FastFlattenOnWorkers()
            client.register_worker_plugin(plugin, name=plugin.name)
        token = merlin_utils._merlin_dask_client.set(client)
        try:
            with client.as_current():
                yield
        finally:
            merlin_utils._merlin_dask_client.reset(token)
    finally:
        try:
            if plugin is not None and cluster is None:  # a shared cluster: leave its workers as they were
                client.unregister_worker_plugin(plugin.name)
        except Exception:  # noqa: BLE001 - best effort on the way out
            log.warning("could not remove the list-flatten plugin from %s", dask_cfg.scheduler_address)
        client.close()
        if cluster is not None:
            cluster.close()


def _client(device: str, dask_cfg: DaskConfig) -> tuple["distributed.Client", Any]:
    """(client, the local cluster it drives or None): of the existing scheduler, else of a new
    ``LocalCUDACluster`` (GPU) or ``LocalCluster`` of worker processes (CPU)."""
    from dask.distributed import Client, LocalCluster

    if dask_cfg.scheduler_address:
        return _connect(dask_cfg), None
    if device == "gpu":
        from dask_cuda import LocalCUDACluster

        cluster = LocalCUDACluster(n_workers=dask_cfg.local_workers, threads_per_worker=dask_cfg.threads_per_worker,
                                   memory_limit=dask_cfg.memory_limit, rmm_pool_size=dask_cfg.rmm_pool_size,
                                   dashboard_address=None)
    else:
        cluster = LocalCluster(n_workers=dask_cfg.local_workers, threads_per_worker=dask_cfg.threads_per_worker,
                               memory_limit=dask_cfg.memory_limit, processes=True, host="127.0.0.1",
                               dashboard_address=None)
    return Client(cluster, set_as_default=False), cluster


def fast_path_refusal(etl: EtlConfig, device: str) -> str | None:
    """Why the fast CPU path (``etl.fast_path``, pipeline_lib/etl/fast_etl.py) does not apply, or None."""
    if not etl.fast_path:
        return "etl.fast_path is off"
    if device != "cpu":
        return "GPU: NVTabular on cudf"
    if etl.dask.scheduler_address or etl.dask.local_workers:
        return "etl.dask is set: NVTabular on the dask cluster"
    return None


def fit_transform(
    columns: ColumnsConfig, etl: EtlConfig, split: SplitPaths, out_dir: Path, history: bool = False,
    history_stats: bool = False,
) -> EtlOutput:
    """Fit the workflow on train, transform train and valid, save workflow + schema.

    On CPU without ``etl.dask`` the fast path runs (:func:`fast_path_refusal`, verified against
    NVTabular at fit time); otherwise, or when its verification fails, NVTabular as below.
    ``EtlOutput.etl_path`` says which ran and why. With ``etl.dask`` the fit and transform run on
    that dask cluster (see :func:`dask_context`); the outputs are the same as in-process. Paths are
    made absolute first, since workers of an existing cluster do not share this process's working directory.
    """
    device = resolve_device(etl.device)
    out_dir = Path(out_dir).absolute()
    train_path, valid_path = Path(split.train).absolute(), Path(split.valid).absolute()
    out_dir.mkdir(parents=True, exist_ok=True)
    reason = fast_path_refusal(etl, device)
    workflow = None
    if reason is None:
        # imported here, when the fast path runs (pyarrow ETL code)
        from pipeline_lib.etl import fast_etl

        t0 = time.perf_counter()
        try:
            workflow, checked = fast_etl.fast_fit_transform(
                lambda cats: build_workflow(columns, cats, history=history, history_stats=history_stats),
                train_path, valid_path, out_dir, etl.part_size)
            path = f"fast (verified against NVTabular on {checked} rows)"
            log.info("ETL on cpu, fast path: %.1f s", time.perf_counter() - t0)
        except (fast_etl.Unsupported, AssertionError) as exc:  # not reproduced exactly: NVTabular decides
            reason = f"fast path refused: {exc}"
        except Exception as exc:  # noqa: BLE001 - any other failure of the fast path: NVTabular as before
            reason = f"fast path failed: {type(exc).__name__}: {exc}"
        if workflow is None:
            log.warning("ETL: %s; running NVTabular", reason)
            for name in ("fit", "train", "valid"):
                shutil.rmtree(out_dir / name, ignore_errors=True)
    if workflow is None:
        workflow = build_workflow(columns, out_dir / "fit", history=history, history_stats=history_stats)
        nvtabular_fit_transform(workflow, device, etl, SplitPaths(train_path, valid_path, split.test), out_dir)
        path = f"nvtabular ({reason})"
    if history:
        history_input_dtype(workflow, columns)
    workflow_dir = out_dir / "workflow"
    workflow.save(str(workflow_dir))
    train_dir = out_dir / "train"
    # Dataset.to_parquet (or the fast path, identically) writes the Merlin schema (schema.pbtxt) beside the data.
    return EtlOutput(workflow_dir, train_dir, out_dir / "valid", train_dir / "schema.pbtxt", device, split, path)


def history_input_dtype(workflow, columns: ColumnsConfig) -> None:
    """The history list's input dtype is the item id's (it holds item ids). The fitted workflow can record
    it as unknown (seen on a 600-row log: merlin infers it from rows whose lists were all empty), which
    merlin-systems cannot map to a Triton type at export; set it on the graph's input nodes."""
    hist, item = history_column(columns), workflow.input_schema[columns.item_id].dtype
    for node in workflow.graph.leaf_nodes:
        for schema in (node.input_schema, node.output_schema):
            if schema is not None and hist in schema.column_names and schema[hist].dtype.element_type.value == "unknown":
                schema.column_schemas[hist] = schema[hist].with_dtype(item)


def nvtabular_fit_transform(workflow, device: str, etl: EtlConfig, split: SplitPaths, out_dir: Path) -> None:
    """NVTabular's fit on train and transform of train and valid into ``out_dir/{train,valid}``."""
    from merlin.io import Dataset

    cpu = device == "cpu"
    with dask_context(device, etl.dask), (fast_list_flatten() if cpu else contextlib.nullcontext()):
        train_ds = Dataset(str(split.train), engine="parquet", part_size=etl.part_size, cpu=cpu)
        valid_ds = Dataset(str(split.valid), engine="parquet", part_size=etl.part_size, cpu=cpu)
        t0 = time.perf_counter()
        log.info("ETL on %s: fitting the workflow on %d train rows (%d partitions) ...", device, train_ds.num_rows,
                 train_ds.npartitions)
        workflow.fit(train_ds)
        t1 = time.perf_counter()
        log.info("workflow fitted in %.1f s; transforming train and validation (%d rows) ...", t1 - t0,
                 valid_ds.num_rows)
        workflow.transform(train_ds).to_parquet(str(out_dir / "train"), output_files=1)
        workflow.transform(valid_ds).to_parquet(str(out_dir / "valid"), output_files=1)
        log.info("transformed in %.1f s", time.perf_counter() - t1)


def load_workflow(workflow_dir: Path):
    import nvtabular as nvt

    return nvt.Workflow.load(str(workflow_dir))
