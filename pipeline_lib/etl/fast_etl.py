"""The fast CPU ETL path: NVTabular's workflow, fitted and applied without NVTabular's per-partition pandas.

``workflow.fit_transform`` on CPU without a dask cluster uses this path (``etl.fast_path``, on by default):

- **fit** (:func:`fast_fit`): the workflow's fit as merlin's executor runs it, phase by phase, except that
  every ``Categorify`` counts its values here (pyarrow ``value_counts`` per row batch, summed) and hands the
  counts to NVTabular's own vocabulary writer (``categorify._write_uniques``: the same files, order,
  tie-breaking, ``freq_threshold``, null and meta rows); the other statistics (FillMedian's dask quantile,
  Normalize's moments) are NVTabular's fit on the same partitions, reading only their columns; output
  dtypes are captured on a sample. The saved workflow is a normal fitted NVTabular workflow.
- **transform** (:func:`transform_to_parquet`): the fitted workflow compiled by
  ``fast_transform.compile_workflow`` runs on pyarrow row batches (memory bounded by ``etl.part_size``)
  and writes what ``Dataset.to_parquet(output_files=1)`` writes: ``part_0.parquet`` (uncompressed, same
  columns, dtypes and list layout), ``schema.pbtxt``, ``.merlin/schema.json``, ``_metadata``,
  ``_metadata.json`` and ``_file_list.txt``.
- **verification at fit time** (:func:`verify_fit`): on a sample of the training rows, our Categorify
  counts give NVTabular's vocabulary and meta files, the rows read by pyarrow for the other statistics
  equal merlin's reading, and the fast fit's output schema equals NVTabular's fit of the sample; on the
  sample plus ``fast_transform.edge_rows`` (nulls, unseen values, empty lists) the compiled transform equals
  ``Workflow.transform``. Any difference or :class:`~pipeline_lib.etl.fast_transform.Unsupported` makes
  ``fit_transform`` run NVTabular as before and say why (``EtlOutput.etl_path``).
"""
from __future__ import annotations

import logging
import math
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Iterator, Optional

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from pipeline_lib.etl.fast_transform import Ragged, Unsupported, compile_workflow, verify

if TYPE_CHECKING:
    import dask.dataframe as dd

log = logging.getLogger(__name__)

Batches = Callable[[Optional[list[str]]], Iterator[pa.Table]]  # columns (None: all) -> row batches of the training data


# --- reading ------------------------------------------------------------------------------------------


def batch_rows(path: Path, part_size: str) -> int:
    """Rows per batch so that a batch takes about ``part_size`` in memory as a pandas frame (strings and
    lists as Python objects), as merlin sizes NVTabular's partitions: measured on the first rows."""
    from dask.utils import parse_bytes

    f = pq.ParquetFile(path)
    if not f.metadata.num_rows:
        return 1
    head = next(f.iter_batches(batch_size=2048)).to_pandas()
    row_bytes = head.memory_usage(deep=True, index=False).sum() / max(len(head), 1)
    return max(1, int(parse_bytes(part_size) / max(row_bytes, 1.0)))


def parquet_batches(path: Path, rows: int) -> Batches:
    """Row batches of at most ``rows`` rows of the named columns of ``path`` (never the whole file)."""
    def batches(columns: Optional[list[str]]) -> Iterator[pa.Table]:
        f = pq.ParquetFile(path)
        for b in f.iter_batches(batch_size=rows, columns=columns, use_threads=True):
            yield pa.Table.from_batches([b])
    return batches


def arrow_columns(table: pa.Table) -> dict:
    """An arrow table -> the compiled workflow's columns: numpy arrays (nulls as NaN, as pandas reads
    them), strings as a ``pd.Categorical`` (nulls: code -1), ``Ragged`` for list columns (no null lists
    or list values)."""
    cols: dict = {}
    for name in table.column_names:
        arr = table.column(name).combine_chunks()
        if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
            if arr.null_count:
                raise Unsupported(f"{name}: null lists")
            off = arr.offsets.to_numpy()
            values = arr.values.slice(off[0], off[-1] - off[0])
            if values.null_count:
                raise Unsupported(f"{name}: null list values")
            cols[name] = Ragged(values.to_numpy(zero_copy_only=False), (off - off[0]).astype(np.int64))
        elif pa.types.is_string(arr.type):  # dictionary-encoded: each distinct string is looked up once
            cols[name] = arr.dictionary_encode().to_pandas().array
        elif pa.types.is_integer(arr.type) or pa.types.is_floating(arr.type):
            cols[name] = arr.to_numpy(zero_copy_only=False)
        else:
            raise Unsupported(f"{name}: arrow type {arr.type}")
    return cols


def frame_columns(df: pd.DataFrame) -> dict:
    """A pandas frame (``fast_transform.verify``'s raw rows) -> columns, through the same arrow conversion."""
    return arrow_columns(pa.Table.from_pandas(df, preserve_index=False))


# --- fit ----------------------------------------------------------------------------------------------


def value_counts(batches: Batches, names: list[str], sep: str = "_") -> pd.DataFrame:
    """Counts of the values of ``names`` (list columns flattened; several names: one joint vocabulary)
    over all batches, nulls included: the frame NVTabular's groupby reduction hands to ``_write_uniques``
    (columns ``<joint name>`` and ``<joint name>_size``)."""
    joint = sep.join(names)  # NVTabular's name of a jointly encoded group (Categorify's name_sep)
    parts: list[pd.DataFrame] = []
    for table in batches(names):
        if len(parts) >= 16:  # keep memory at the distinct values: sum what has been counted so far
            parts = [_summed(parts, joint)]
        for name in names:
            arr = table.column(name).combine_chunks()
            if pa.types.is_list(arr.type) or pa.types.is_large_list(arr.type):
                if arr.null_count:
                    raise Unsupported(f"{name}: null lists")
                arr = arr.flatten()
            vc = pc.value_counts(arr)
            parts.append(pd.DataFrame({joint: vc.field("values").to_pandas(),
                                       f"{joint}_size": vc.field("counts").to_numpy().astype(np.int64)}))
    if not parts:
        raise Unsupported(f"no training rows for {joint}")
    return _summed(parts, joint)


def _summed(parts: list[pd.DataFrame], joint: str) -> pd.DataFrame:
    df = pd.concat(parts, ignore_index=True)
    return df.groupby(joint, dropna=False, sort=False)[f"{joint}_size"].sum().reset_index()


def fit_categorify(node, ddf, batches: Batches) -> None:
    """Fit one Categorify node from our own value counts, written by NVTabular's vocabulary writer."""
    from nvtabular.ops import categorify as nvt_cat

    op = node.op
    if op.encode_type != "joint" or op.single_table or op.num_buckets or op.max_size or op.vocabs:
        raise Unsupported("Categorify with buckets, max_size, single_table, vocabs or combo encoding")
    if (op.split_out if isinstance(op.split_out, int) else 1) != 1:
        raise Unsupported("Categorify with split_out > 1")
    op.fit(node.input_columns, ddf)  # NVTabular's own bookkeeping (storage names, cache options); the graph is dropped
    options = op._create_fit_options_from_columns(
        [list(c) if isinstance(c, tuple) else c for c in node.input_columns.grouped_names])
    base = os.path.join(options.out_path, options.stat_name)
    os.makedirs(base, exist_ok=True)
    paths = {}
    for group in options.col_groups:
        counts = value_counts(batches, list(group.names), options.name_sep)
        paths[options.name_sep.join(group.names)] = nvt_cat._write_uniques([counts], base, group, options, True)
    op.fit_finalize(paths)
    op.fitted = True


def _root_columns(node, available: list[str]) -> list[str]:
    """The raw columns a node's ancestors read (for NVTabular's own fit of the non-Categorify statistics)."""
    seen, todo, names = set(), [node], set[str]()
    while todo:
        n = todo.pop()
        if id(n) in seen:
            continue
        seen.add(id(n))
        names.update(n.input_schema.column_names if n.input_schema else [])
        todo.extend(n.parents_with_dependencies)
    return [c for c in available if c in names]


def read_row_groups(path: str, row_groups: list[int], columns: list[str]) -> pd.DataFrame:
    return pq.ParquetFile(path).read_row_groups(row_groups, columns=columns).to_pandas()


def nvtabular_partitions(dataset, columns: list[str]) -> "dd.DataFrame | None":
    """``dataset.to_ddf(columns)`` with the same partitions (NVTabular's: consecutive groups of
    ``row_groups_per_part`` row groups of one parquet file), each read by pyarrow; None where the
    dataset is not one such file or the partition lengths would differ (then merlin reads it)."""
    import dask
    import dask.dataframe as dd

    engine = dataset.engine
    paths = [str(p) for p in getattr(engine, "paths", [])]
    per = getattr(engine, "row_groups_per_part", None)
    if len(paths) != 1 or not per or not os.path.isfile(paths[0]):
        return None
    md = pq.ParquetFile(paths[0]).metadata
    groups = [list(range(i, min(i + per, md.num_row_groups))) for i in range(0, md.num_row_groups, per)]
    if [sum(md.row_group(g).num_rows for g in grp) for grp in groups] != list(dataset.partition_lens):
        return None
    meta = dataset.to_ddf(columns=columns)._meta
    # a DataFrame (its meta is one); dask annotates from_delayed as returning DataFrame | Series
    return dd.from_delayed([dask.delayed(read_row_groups)(paths[0], grp, columns) for grp in groups],  # type: ignore[return-value]
                           meta=meta, verify_meta=False)


def fast_fit(workflow, dataset, batches: Batches, sample: pd.DataFrame) -> None:
    """Fit ``workflow`` on ``dataset`` (its parquet rows also given as ``batches``) as merlin's executor
    does, Categorify from our counts; output dtypes are captured on ``sample`` (raw training rows)."""
    import nvtabular as nvt
    from merlin.dag import Graph
    from merlin.dag.executors import clear_stats
    from merlin.dag.ops.stat_operator import StatOperator
    from merlin.io import Dataset

    graph, executor = workflow.graph, workflow.executor
    clear_stats(graph)
    graph.construct_schema(dataset.schema)
    pending = {n: Graph.get_nodes_by_op_type(n.parents_with_dependencies, StatOperator)
               for n in Graph.get_nodes_by_op_type([graph.output_node], StatOperator)}
    columns = list(dataset.schema.column_names)
    ddf = dataset.to_ddf()
    while pending:
        phase = [n for n, deps in pending.items() if not deps]
        if not phase:
            raise RuntimeError("no dependency-free statistics to fit")
        others = [n for n in phase if type(n.op) is not nvt.ops.Categorify]
        for n in phase:
            if type(n.op) is nvt.ops.Categorify:
                fit_categorify(n, ddf, batches)
        if others:
            needed = sorted({c for n in others for c in _root_columns(n, columns)}, key=columns.index)
            parts = nvtabular_partitions(dataset, needed)
            executor.fit_phase(Dataset(parts if parts is not None else dataset.to_ddf(columns=needed), cpu=True),
                               others)
        for n in phase:
            pending.pop(n)
        for deps in pending.values():
            deps.difference_update(phase)
    sample_ds = Dataset(sample, cpu=True, schema=dataset.schema)
    Dataset(executor.transform(sample_ds.to_ddf(), graph.output_node, graph.output_dtypes, capture_dtypes=True),
            cpu=True, base_dataset=sample_ds, schema=graph.output_schema).sample_dtypes()
    graph.construct_schema(dataset.schema, preserve_dtypes=True)


# --- transform + write --------------------------------------------------------------------------------


def to_arrow(cols: dict) -> pa.Table:
    """Compiled-workflow output -> an arrow table laid out as NVTabular's parquet (lists as
    ``list<element: ...>`` with 32-bit offsets)."""
    arrays, fields = [], []
    for name, x in cols.items():
        if isinstance(x, Ragged):
            values = pa.array(x.values)
            typ = pa.list_(pa.field("element", values.type))
            arrays.append(pa.ListArray.from_arrays(pa.array(np.asarray(x.offsets, dtype=np.int32)), values, type=typ))
        else:
            arrays.append(pa.array(x))
        fields.append(pa.field(name, arrays[-1].type))
    return pa.Table.from_arrays(arrays, schema=pa.schema(fields))


def write_dataset_metadata(out_dir: Path, schema, rows: int, row_groups: list) -> None:
    """The files ``Dataset.to_parquet(output_files=1)`` writes beside ``part_0.parquet``: the Merlin schema
    (``schema.pbtxt``, ``.merlin/schema.json``), ``_metadata``, ``_metadata.json``, ``_file_list.txt``."""
    from fsspec.implementations.local import LocalFileSystem
    from merlin.io.parquet import CPUParquetWriter
    from merlin.schema.io.tensorflow_metadata import TensorflowMetadata

    tf_metadata = TensorflowMetadata.from_merlin_schema(schema.copy())
    tf_metadata.to_proto_text_file(str(out_dir))
    (out_dir / ".merlin").mkdir(exist_ok=True)
    tf_metadata.to_json_file(str(out_dir / ".merlin"))
    fs = LocalFileSystem()
    general = {"data_paths": [str(out_dir / "part_0.parquet")],
               "file_stats": [{"file_name": "part_0.parquet", "num_rows": rows}],
               "cats": [], "conts": [], "labels": []}
    CPUParquetWriter.write_general_metadata(general, fs, str(out_dir))
    CPUParquetWriter.write_special_metadata({"part_0.parquet": row_groups}, fs, str(out_dir))


def _row_group_rows(out: pa.Table) -> int:
    """NVTabular's CPU writer: row groups of ~128 MB of the frame in memory."""
    head = out.slice(0, 1024).to_pandas()
    return math.ceil(128_000_000 / max(head.memory_usage(deep=True).sum() / max(len(head), 1), 1))


def transform_to_parquet(compiled, schema, source: Batches, out_dir: Path) -> int:
    """Apply the compiled workflow batch by batch and write ``out_dir`` as NVTabular would; -> rows written.
    One batch is written (pyarrow, without the GIL) while the next is transformed: two batches in memory."""
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)
    path, collected, writer, rows, pending = out_dir / "part_0.parquet", list[Any](), None, 0, None
    with ThreadPoolExecutor(1) as pool:
        try:
            for table in source(list(compiled.input_columns)):
                out = to_arrow(compiled(arrow_columns(table)))
                if writer is None:
                    group_rows = _row_group_rows(out)
                    # uncompressed like NVTabular's; plain encoding (no dictionary pages: same data, faster to write)
                    writer = pq.ParquetWriter(path, out.schema, compression="NONE", use_dictionary=False,
                                              metadata_collector=collected)
                if pending is not None:
                    pending.result()
                pending = pool.submit(writer.write_table, out, row_group_size=group_rows)
                rows += out.num_rows
            if pending is not None:
                pending.result()
        finally:
            if pending is not None:
                pending.exception()  # wait for the last write before closing (also on an error)
            if writer is not None:
                writer.close()
    if writer is None:
        raise Unsupported("no rows to transform")
    collected[0].set_file_path("part_0.parquet")
    write_dataset_metadata(out_dir, schema, rows, collected)
    return rows


# --- verification --------------------------------------------------------------------------------------


def _same_file(a: str, b: str, what: str) -> None:
    x, y = pd.read_parquet(a), pd.read_parquet(b)
    if not (x.equals(y) and list(x.index) == list(y.index) and list(x.dtypes) == list(y.dtypes)):
        raise AssertionError(f"{what}: the fast fit's {os.path.basename(a)} differs from NVTabular's")


def compare_fits(fast, nvt, statistics: bool = True) -> None:
    """Two workflows of the same graph, one fitted by :func:`fast_fit`, one by NVTabular on the same rows:
    equal vocabulary and meta files and (``statistics``) fill values, moments and output schema; raises
    AssertionError."""
    import nvtabular as nvt_mod
    from merlin.dag import postorder_iter_nodes

    for a, b in zip(postorder_iter_nodes(fast.output_node), postorder_iter_nodes(nvt.output_node)):
        if type(a.op) is not type(b.op):
            raise AssertionError("the two workflows' graphs differ")
        if isinstance(a.op, nvt_mod.ops.Categorify):
            if sorted(a.op.categories) != sorted(b.op.categories) or a.op.storage_name != b.op.storage_name:
                raise AssertionError(f"Categorify vocabularies {sorted(a.op.categories)} != {sorted(b.op.categories)}")
            for key, path in a.op.categories.items():
                other = b.op.categories[key]
                _same_file(path, other, key)
                metas = [p.replace("unique.", "meta.") for p in (path, other)]
                if any(os.path.exists(m) for m in metas):  # written by the fit, not copied by Workflow.save
                    _same_file(metas[0], metas[1], key)
        for attr in ("medians", "means", "stds") if statistics else ():
            if getattr(a.op, attr, None) != getattr(b.op, attr, None):
                raise AssertionError(f"{type(a.op).__name__}.{attr}: {getattr(a.op, attr)} != {getattr(b.op, attr)}")
    if statistics:
        compare_schemas(fast, nvt)


def compare_schemas(fast, nvt) -> None:
    """Output columns, dtypes, list/ragged flags and tags equal (vocabulary sizes aside); raises AssertionError."""
    if fast.output_schema.column_names != nvt.output_schema.column_names or [
            (c.dtype, c.is_list, c.is_ragged, c.tags) for c in fast.output_schema] != [
            (c.dtype, c.is_list, c.is_ragged, c.tags) for c in nvt.output_schema]:
        raise AssertionError("the fast fit's output schema differs from NVTabular's")


def verify_fit(build: Callable[[Path], Any], sample_path: Path, work: Path) -> Any:
    """What the fast fit does itself, against NVTabular's fit of the rows of ``sample_path``: our Categorify
    counts (through NVTabular's writer) give the same vocabulary and meta files, and the partitions read by
    pyarrow for NVTabular's other statistics equal merlin's reading. Returns NVTabular's fitted workflow
    (its output schema is compared with the fast fit's by :func:`compare_schemas`)."""
    import nvtabular as nvt_mod
    from merlin.dag import Graph
    from merlin.io import Dataset

    nvt, ours = build(work / "nvt"), build(work / "fast")
    ds = Dataset(str(sample_path), engine="parquet", cpu=True)
    nvt.fit(ds)
    ours.graph.construct_schema(ds.schema)
    ddf, batches = ds.to_ddf(), parquet_batches(sample_path, 1 << 30)
    for node in Graph.get_nodes_by_op_type([ours.output_node], nvt_mod.ops.Categorify):
        fit_categorify(node, ddf, batches)
    compare_fits(ours, nvt, statistics=False)
    scalars = [c.name for c in ds.schema if not c.is_list]
    parts = nvtabular_partitions(ds, scalars)
    if parts is not None:
        mine, merlins = parts.compute(scheduler="synchronous"), ds.to_ddf(columns=scalars).compute(scheduler="synchronous")
        if not (mine.reset_index(drop=True).equals(merlins.reset_index(drop=True))
                and list(mine.dtypes) == list(merlins.dtypes)):
            raise AssertionError("the training rows read by pyarrow differ from merlin's reading")
    return nvt


# --- the path ------------------------------------------------------------------------------------------

SAMPLE_ROWS = 4096  # training rows the fit-time checks use (plus fast_transform.edge_rows)


def fast_fit_transform(build: Callable[[Path], Any], train: Path, valid: Path, out_dir: Path,
                       part_size: str) -> tuple[Any, int]:
    """Fit ``build(categories_dir)``'s workflow on ``train`` and write ``out_dir/{train,valid}`` through the
    fast path, verified against NVTabular first; -> (fitted workflow, rows verified). Raises Unsupported or
    AssertionError when the fast path does not reproduce NVTabular (the caller falls back)."""
    work = out_dir / "fast-verify"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    try:
        return _fit_transform_checked(build, train, valid, out_dir, part_size, work)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _fit_transform_checked(build: Callable[[Path], Any], train: Path, valid: Path, out_dir: Path,
                           part_size: str, work: Path) -> tuple[Any, int]:
    """:func:`fast_fit_transform` with its scratch folder ``work``."""
    from merlin.io import Dataset

    sample = next(parquet_batches(train, SAMPLE_ROWS)(None), None)
    if sample is None or not sample.num_rows:
        raise Unsupported("no training rows")
    sample_path = work / "sample.parquet"
    pq.write_table(sample, sample_path)
    t0 = time.perf_counter()
    nvt_sample = verify_fit(build, sample_path, work)
    t1 = time.perf_counter()
    workflow = build(out_dir / "fit")
    dataset = Dataset(str(train), engine="parquet", part_size=part_size, cpu=True)
    train_batches = parquet_batches(train, batch_rows(train, part_size))
    fast_fit(workflow, dataset, train_batches, sample.to_pandas())
    compare_schemas(workflow, nvt_sample)
    t2 = time.perf_counter()
    compiled = compile_workflow(workflow)
    inputs = list(compiled.input_columns)
    checked = verify(compiled, workflow, sample.select(inputs).to_pandas(), frame_columns)
    valid_batches = parquet_batches(valid, batch_rows(valid, part_size))
    for batches, name in ((train_batches, "train"), (valid_batches, "valid")):
        transform_to_parquet(compiled, workflow.output_schema, batches, out_dir / name)
    log.info("fast ETL: fit checked on a sample %.1f s, fit %.1f s, transform checked + written %.1f s",
             t1 - t0, t2 - t1, time.perf_counter() - t2)
    return workflow, checked
