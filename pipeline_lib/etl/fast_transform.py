"""A fitted NVTabular workflow compiled into a numpy-only per-request transform (the serving fast path).

NVTabular executes a fitted workflow per request through pandas: every DAG node builds and merges
small DataFrames and Categorify merges the request against each vocabulary table -- ~45 ms per
request whatever its size (benchmarks/README.md). :func:`compile_workflow` reads the *fitted*
workflow's graph, ops and statistics (vocabulary files, fill values, means/stds) -- nothing is
re-fitted -- and returns a :class:`CompiledWorkflow` that runs the same graph on numpy arrays:

- ``Categorify`` (joint encoding, single columns or joint column groups, no hash buckets): value -> index exactly as
  NVTabular 23.08 encodes: the vocabulary file's row index is the label (first label >= 3), 0 is
  padding, 1 null, 2 out-of-vocabulary; numeric vocabularies use ``np.searchsorted`` on a sorted
  copy, string vocabularies a dict (keys as ``str`` and as the ``bytes`` Triton delivers); list
  columns encode their flat values and keep their offsets;
- ``FillMissing`` and ``FillMedian`` (the fitted medians; no indicator columns), ``LogOp`` (``log(float32(x) + 1)``), ``Normalize``
  (``(x - mean) / std`` or ``x - mean``, then the op's output dtype), the pipeline's
  ``etl.to_float32`` and ``sessions.time_deltas`` lambdas, ``ListSlice`` without padding,
  ``Rename``, and the schema-only ops (selection, subsets, concatenation, tags).

Any other op, option or input representation is *not supported*: :func:`compile_workflow` raises
:class:`Unsupported` and the caller keeps NVTabular. The graph is interpreted the way merlin's
``LocalExecutor`` interprets it (upstream outputs merged, missing root columns taken from the
request), so a node's columns flow exactly as in NVTabular. :func:`verify` compares the compiled
transform with ``Workflow.transform`` on raw rows (plus edge rows: nulls, unseen values, empty
lists, every vocabulary entry up to a cap) and demands identical columns, dtypes and values;
export only enables the fast path when it passes.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np
import pandas as pd

from pipeline_lib.etl.lambda_ops import time_deltas, to_float32

PAD, NULL, OOV = 0, 1, 2
BULK_ROWS = 4096  # from this many values, vocabulary lookups run vectorised (the ETL's row batches)


class Unsupported(Exception):
    """The workflow (or a request's representation) is outside what the compiled path reproduces."""


@dataclass
class Ragged:
    """A list column: flat ``values`` and row ``offsets`` (len rows + 1)."""

    values: np.ndarray
    offsets: np.ndarray


# --- Categorify ---------------------------------------------------------------------------------


class _Vocabulary:
    """One Categorify vocabulary file: value -> label, as NVTabular's ``_encode`` merges it."""

    def __init__(self, path: str, column: str, dtype):
        table = pd.read_parquet(path, columns=[column])
        labels = table.index.to_numpy().astype(np.int64)
        if len(labels) and labels[0] < OOV + 1:  # NVTabular shifts a 0-based index the same way
            labels = labels + OOV + 1
        keys = table[column]
        keep = ~keys.isna().to_numpy()
        keys, labels = keys[keep], labels[keep]
        self.dtype = np.dtype(dtype)
        self.key_dtype = keys.dtype
        if keys.dtype.kind in "iuf":
            order = np.argsort(keys.to_numpy(), kind="stable")
            self.sorted_keys = keys.to_numpy()[order]
            self.sorted_labels = labels[order]
            if len(self.sorted_keys) != len(np.unique(self.sorted_keys)):
                raise Unsupported(f"vocabulary {path} has duplicate values")
            self.lookup = None
        elif keys.dtype == object and all(isinstance(k, str) for k in keys):
            self.lookup = {}
            for k, lab in zip(keys.tolist(), labels.tolist()):
                self.lookup[k] = lab
                self.lookup[k.encode("utf-8")] = lab
            self.lookup[None] = NULL
        else:
            raise Unsupported(f"vocabulary {path}: values of dtype {keys.dtype} are not supported")

    def encode(self, x: np.ndarray) -> np.ndarray:
        if self.lookup is None:
            if x.dtype.kind not in "iuf" or (x.dtype.kind == "f") != (self.key_dtype.kind == "f"):
                raise Unsupported(f"values of dtype {x.dtype} against a {self.key_dtype} vocabulary")
            n = len(self.sorted_keys)
            if n == 0:
                out = np.full(len(x), OOV, dtype=np.int64)
            elif x.dtype.kind in "iu" and len(x) >= BULK_ROWS and self._dense_ok():
                out = self._encode_dense(x)
            else:
                pos = np.searchsorted(self.sorted_keys, x)
                np.minimum(pos, n - 1, out=pos)
                out = np.where(self.sorted_keys[pos] == x, self.sorted_labels[pos], OOV)
            if x.dtype.kind == "f":
                out[np.isnan(x)] = NULL
        else:
            if isinstance(x, pd.Categorical):  # dictionary-encoded strings (the ETL's arrow batches)
                return self._lookup_distinct(x.codes, np.asarray(x.categories, dtype=object))
            if x.dtype != object:
                raise Unsupported(f"values of dtype {x.dtype} against a string vocabulary")
            if len(x) >= BULK_ROWS:
                # the same lookup on the distinct values only (pandas' factorize: nulls -> code -1 -> null index)
                return self._lookup_distinct(*pd.factorize(x))
            out = self._lookup(x)
        return out.astype(self.dtype, copy=False)

    def _lookup_distinct(self, codes: np.ndarray, uniques: np.ndarray) -> np.ndarray:
        """Values given as codes into their distinct values (code -1: null): each distinct value looked up once."""
        return np.append(self._lookup(np.asarray(uniques, dtype=object)), NULL)[codes].astype(self.dtype, copy=False)

    def _lookup(self, x: np.ndarray) -> np.ndarray:
        get = self.lookup.get
        # v != v: NaN (pandas' null for object columns) -> null index
        return np.fromiter((get(v, OOV) if v == v else NULL for v in x), dtype=np.int64, count=len(x))

    def _dense_ok(self) -> bool:
        """Integer keys in a range at most 4x the vocabulary (+ 1024): a dense value -> label table."""
        keys = self.sorted_keys
        lo, hi = int(keys[0]), int(keys[-1])
        return keys.dtype.kind in "iu" and -2**62 < lo and hi < 2**62 and hi - lo < 4 * len(keys) + 1024

    def _encode_dense(self, x: np.ndarray) -> np.ndarray:
        """``searchsorted`` semantics through a table over [min key, max key]: absent values -> OOV."""
        lo, hi = int(self.sorted_keys[0]), int(self.sorted_keys[-1])
        table = np.full(hi - lo + 1, OOV, dtype=np.int64)
        table[self.sorted_keys.astype(np.int64) - lo] = self.sorted_labels
        inside = (x >= lo) & (x <= hi)
        out = np.full(len(x), OOV, dtype=np.int64)
        out[inside] = table[x[inside].astype(np.int64) - lo]
        return out


# --- the per-node steps ---------------------------------------------------------------------------


def _group_ok(op) -> bool:
    """Column groups are compiled where they only name columns: a selection, or a jointly encoded
    Categorify group (one shared vocabulary)."""
    import nvtabular as nvt
    from merlin.dag.ops.selection import SelectionOp

    return type(op) is SelectionOp or (type(op) is nvt.ops.Categorify and op.encode_type == "joint")


def _floats(x, what: str) -> np.ndarray:
    if isinstance(x, Ragged) or x.dtype.kind not in "iuf":
        raise Unsupported(f"{what}: non-numeric or list input")
    return x


def _op_step(op, selection: list[str]) -> Callable[[dict], dict]:
    """The numpy equivalent of ``op.transform(selection, df)`` for a supported op; raises Unsupported.
    Every step is a small picklable object holding plain data (names, numpy arrays, vocabularies), so a
    compiled workflow is saved with the version and served without NVTabular, merlin or TensorFlow."""
    from merlin.dag.operator import Operator
    from merlin.dag.ops.add_metadata import AddMetadata
    from nvtabular.ops.add_metadata import AddMetadata as NvtAddMetadata

    kind = type(op)
    for kinds, build in _step_builders():
        if kind in kinds:
            return build(op, list(selection))
    if (isinstance(op, AddMetadata) and kind.transform is Operator.transform) or (
        isinstance(op, NvtAddMetadata) and kind.transform is NvtAddMetadata.transform
    ):
        return Identity()  # AddTags / TagAs*: schema only
    raise Unsupported(f"op {kind.__module__}.{kind.__qualname__} is not compiled")


def _step_builders() -> list[tuple[tuple[type, ...], Callable[[Any, list[str]], Callable[[dict], dict]]]]:
    """(op types, the function that compiles such an op on its selected columns)."""
    import nvtabular as nvt
    from merlin.dag.ops.concat_columns import ConcatColumns
    from merlin.dag.ops.selection import SelectionOp
    from merlin.dag.ops.subset_columns import SubsetColumns
    from merlin.dag.ops.udf import UDF

    return [
        ((SelectionOp,), lambda op, sel: Select(list(sel) if sel else list(op.selector.names))),
        ((ConcatColumns, SubsetColumns), lambda op, sel: Select(sel)),  # `a + b` and `a[...]`: the selected columns
        ((nvt.ops.Categorify,), _categorify_step),
        ((nvt.ops.FillMissing, nvt.ops.FillMedian), _fill_step),
        ((nvt.ops.LogOp,), lambda op, sel: MapColumns(log1p_as, dict.fromkeys(sel, np.dtype(op.output_dtype)), True)),
        ((nvt.ops.Normalize,), _normalize_step),
        ((UDF,), _udf_step),
        ((nvt.ops.Rename,), _rename_step),
        ((nvt.ops.ListSlice,), _list_slice_step),
    ]


@dataclass
class Identity:
    """A schema-only op: the columns unchanged."""

    def __call__(self, cols: dict) -> dict:
        return cols


@dataclass
class Select:
    """Selection, concatenation, subsets: the named columns."""

    names: list[str]

    def __call__(self, cols: dict) -> dict:
        return {c: cols[c] for c in self.names}


@dataclass
class Renamed:
    """Rename: new name -> the column it comes from."""

    mapping: dict[str, str]

    def __call__(self, cols: dict) -> dict:
        return {new: cols[old] for new, old in self.mapping.items()}


@dataclass
class MapColumns:
    """``fn(column, args[column])`` on each column of ``args`` (a module-level ``fn``: picklable); with
    ``keep`` the other columns pass through, else only these are returned."""

    fn: Callable[[Any, Any], Any]
    args: dict  # column -> the argument fn gets with it (None where it takes none)
    keep: bool = False

    def __call__(self, cols: dict) -> dict:
        return mapped(cols, self.fn, self.args, self.keep)


def mapped(cols: dict, fn: Callable[[Any, Any], Any], args: dict, keep: bool) -> dict:
    """``fn(cols[c], args[c])`` for each column ``c`` of ``args``; with ``keep`` the other columns pass through."""
    out = dict(cols) if keep else {}
    out.update({c: fn(cols[c], a) for c, a in args.items()})
    return out


# Encode and Fill keep their own names and fields: compiled transforms pickled by earlier exports
# (``ensemble/transform.pkl``) refer to them.
@dataclass
class Encode:
    """Categorify: each selected column (or list column's values) through its vocabulary; others kept."""

    vocabs: dict  # column -> _Vocabulary

    def __call__(self, cols: dict) -> dict:
        return mapped(cols, encoded, self.vocabs, True)


@dataclass
class Fill:
    """FillMissing / FillMedian: NaN of float columns -> the column's fill value; others kept."""

    fills: dict  # column -> value

    def __call__(self, cols: dict) -> dict:
        return mapped(cols, filled, self.fills, True)


def encoded(x, vocab: "_Vocabulary"):
    """A column (or a list column's values, offsets kept) through its vocabulary."""
    return Ragged(vocab.encode(x.values), x.offsets) if isinstance(x, Ragged) else vocab.encode(x)


def filled(x, value):
    """NaN of a float column -> ``value`` (a copy); a column of another kind unchanged."""
    y = _floats(x, "FillMissing")
    if y.dtype.kind != "f":
        return x
    nan = np.isnan(y)
    if nan.any():
        y = y.copy()
        y[nan] = value
    return y


def log1p_as(x: np.ndarray, dtype: np.dtype) -> np.ndarray:
    """LogOp: ``log(x as dtype + 1)``."""
    return np.log(_floats(x, "LogOp").astype(dtype) + 1)


def normalized(x: np.ndarray, params: tuple) -> np.ndarray:
    """Normalize with ``params`` = (mean, std, output dtype): ``(x - mean) / std``, or ``x - mean`` when std is 0."""
    mean, std, dtype = params
    x = _floats(x, "Normalize")
    return ((x - mean) / std if std > 0 else x - mean).astype(dtype)


def as_float32(x: np.ndarray, _: object = None) -> np.ndarray:
    return _floats(x, "to_float32").astype("float32")


def _categorify_step(op, selection: list[str]) -> Callable[[dict], dict]:
    if op.encode_type != "joint" or op.single_table or op.num_buckets or op.max_size or op.vocabs:
        raise Unsupported("Categorify with buckets, max_size, single_table, vocabs or combo encoding")
    if (op.split_out if isinstance(op.split_out, int) else 1) != 1 or op.search_sorted:
        raise Unsupported("Categorify with split_out > 1 or search_sorted")
    # joint encoding of a column group ([item_id, item_id_history]): every column of the group is
    # looked up in the group's one vocabulary, stored under its storage name (NVTabular's transform)
    vocabs, tables = {}, {}
    for name in selection:
        storage = op.storage_name.get(name, name)
        if storage not in op.categories:
            raise Unsupported(f"Categorify has no vocabulary for {name}")
        if storage not in tables:
            tables[storage] = _Vocabulary(op.categories[storage], storage, op.output_dtype)
        vocabs[name] = tables[storage]
    return Encode(vocabs)


def _fill_step(op, selection: list[str]) -> Callable[[dict], dict]:
    if op.add_binary_cols:
        raise Unsupported(f"{type(op).__name__} with indicator columns")
    import nvtabular as nvt

    median = type(op) is nvt.ops.FillMedian
    return Fill({n: op.medians[n] if median else op.fill_val for n in selection})


def _normalize_step(op, selection: list[str]) -> Callable[[dict], dict]:
    if op.out_dtype not in (None,) and np.dtype(op.out_dtype).kind != "f":
        raise Unsupported("Normalize with a non-float output dtype")
    dtype = np.dtype(op.output_dtype)
    return MapColumns(normalized, {n: (op.means[n], op.stds[n], dtype) for n in selection})


def _udf_step(op, selection: list[str]) -> Callable[[dict], dict]:
    """The pipeline's own LambdaOps: ``etl.workflow.to_float32`` and ``etl.sessions.time_deltas``."""
    if op.f is to_float32 and op._param_count == 1:
        return MapColumns(as_float32, dict.fromkeys(selection))
    if op.f is time_deltas and op._param_count == 1:
        return MapColumns(deltas_log1p, dict.fromkeys(selection))
    raise Unsupported(f"LambdaOp {getattr(op.f, '__qualname__', op.f)!r} "
                      "(only etl.to_float32 and sessions.time_deltas are compiled)")


def _rename_step(op, selection: list[str]) -> Callable[[dict], dict]:
    from merlin.dag import ColumnSelector

    mapping = op.column_mapping(ColumnSelector(list(selection)))  # new name -> [old name]
    return Renamed({new: old[0] for new, old in mapping.items()})


def _list_slice_step(op, selection: list[str]) -> Callable[[dict], dict]:
    if op.pad:
        raise Unsupported("ListSlice with padding")
    return MapColumns(sliced, dict.fromkeys(selection, (int(op.start), int(op.end))))


def sliced(x: Ragged, bounds: tuple[int, int]) -> Ragged:
    """ListSlice with ``bounds`` = (start, end): every row's ``row[start:end]`` (Python slice semantics, as
    NVTabular's CPU ListSlice)."""
    start, end = bounds
    if not isinstance(x, Ragged):
        raise Unsupported("ListSlice of a non-list input")
    off = np.asarray(x.offsets, dtype=np.int64)
    length = np.diff(off)
    lo = np.maximum(length + start, 0) if start < 0 else np.minimum(start, length)
    hi = np.maximum(length + end, 0) if end < 0 else np.minimum(end, length)
    return _gather(x, off[:-1] + lo, np.maximum(hi - lo, 0))


def _gather(x: Ragged, starts: np.ndarray, lengths: np.ndarray) -> Ragged:
    """A list column whose row i is ``x.values[starts[i]:starts[i] + lengths[i]]`` (vectorised)."""
    new = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    flat = np.repeat(starts - new[:-1], lengths) + np.arange(new[-1], dtype=np.int64)
    return Ragged(x.values[flat], new.astype(x.offsets.dtype))


def deltas_log1p(x: Ragged, _: object = None) -> Ragged:
    """``sessions.time_deltas`` on flat values: log1p(seconds since the previous event of the same
    session, clipped at 0), 0 for a session's first event; float64 arithmetic, float32 result."""
    if not isinstance(x, Ragged) or x.values.dtype.kind not in "iuf":
        raise Unsupported("time_deltas of a non-numeric or non-list input")
    a = x.values.astype(np.float64)
    d = np.diff(a, prepend=a[:1]) if len(a) else np.zeros(0, dtype=np.float64)
    off = np.asarray(x.offsets, dtype=np.int64)
    d[off[:-1][np.diff(off) > 0]] = 0.0
    return Ragged(np.log1p(np.clip(d, 0.0, None)).astype(np.float32), x.offsets)


@dataclass
class _Node:
    upstream: list[int]  # indices into CompiledWorkflow.nodes
    input_columns: list[str]  # node.input_schema columns: taken from the request when no upstream has them
    dependency_columns: list[str]  # raw-column dependencies: always taken from the request (as merlin does)
    step: Callable[[dict], dict] | None


class CompiledWorkflow:
    """Runs a fitted workflow's graph on a dict of numpy arrays (``Ragged`` for list columns)."""

    def __init__(self, workflow):
        self.input_columns = list(workflow.input_schema.column_names)
        self.output_columns = list(workflow.output_schema.column_names)
        self.ragged_inputs = {c.name for c in workflow.input_schema if c.is_list}
        self.input_kinds = {c.name: _numpy_kind(c.dtype) for c in workflow.input_schema}
        self.nodes: list[_Node] = []
        ids: dict[int, int] = {}

        def add(node) -> int:
            if id(node) in ids:
                return ids[id(node)]
            upstream = [add(p) for p in node.parents_with_dependencies]
            cols = list(node.input_schema.column_names)
            deps = [c for c in node.dependency_columns.names if c not in cols]
            step = None
            if node.op is not None:
                selection = node.input_columns.resolve(node.input_schema)
                if selection.subgroups and not _group_ok(node.op):
                    raise Unsupported("column groups (subgroups) are not compiled")
                step = _op_step(node.op, list(selection.names))
            self.nodes.append(_Node(upstream, cols, deps, step))
            ids[id(node)] = len(self.nodes) - 1
            return ids[id(node)]

        self.output = add(workflow.output_node)

    def __call__(self, inputs: Mapping[str, Any]) -> dict:
        """Raw columns -> transformed columns (the workflow's output schema, in order)."""
        for name in self.input_columns:
            x = inputs[name]
            if isinstance(x, Ragged) != (name in self.ragged_inputs):
                raise Unsupported(f"input {name}: list/scalar representation differs from the workflow's")
            kind, want = (x.values if isinstance(x, Ragged) else x).dtype.kind, self.input_kinds[name]
            if want is not None and kind != want and not (want in "iu" and kind in "iu"):
                raise Unsupported(f"input {name}: dtype kind {kind!r}, the workflow was fitted on {want!r}")
        results: list[Any] = [None] * len(self.nodes)  # dict per node, once run
        for i, node in enumerate(self.nodes):
            # merlin's LocalExecutor: upstream outputs merged in order (later ones win), then the
            # node's input columns no upstream produced and its raw-column dependencies, from the request
            upstream = [u for u in (results[j] for j in node.upstream) if u]
            present = set().union(*upstream) if upstream else set()
            root = [c for c in node.input_columns if c not in present] + node.dependency_columns
            merged: dict = {}
            for u in upstream:
                merged.update(u)
            for c in root:
                merged[c] = inputs[c]
            results[i] = node.step(merged) if node.step is not None else merged
        out = results[self.output]
        return {c: out[c] for c in self.output_columns}


def _numpy_kind(dtype) -> str | None:
    """The numpy kind of a schema dtype; None when the schema does not know it (a derived column
    such as the user history), in which case only :func:`verify` vouches for the representation."""
    try:
        return np.dtype(dtype.to_numpy).kind
    except (ValueError, TypeError):
        return None


def compile_workflow(workflow) -> CompiledWorkflow:
    """Compile a fitted workflow; raises :class:`Unsupported` for anything not reproduced exactly."""
    return CompiledWorkflow(workflow)


# --- request tensors <-> columns -------------------------------------------------------------------


def columns_from_tensors(arrays: Mapping[str, np.ndarray], ragged: set[str]) -> dict:
    """Request tensors (``col``, ``col__values``/``col__offsets``) -> columns (``Ragged`` for lists)."""
    cols: dict = {}
    for name, arr in arrays.items():
        if name.endswith("__values") and name[:-8] in ragged:
            base = name[:-8]
            cols[base] = Ragged(arr, np.asarray(arrays[f"{base}__offsets"]))
        elif name.endswith("__offsets") and name[:-9] in ragged:
            continue
        else:
            cols[name] = arr
    return cols


def take_rows(x, rows: np.ndarray):
    """Rows ``rows`` (any order, repeats allowed) of a column: ``x[rows]``, or for a ``Ragged`` list
    column the selected rows' lists with new offsets (vectorised, no per-row Python)."""
    if not isinstance(x, Ragged):
        return x[rows]
    off = np.asarray(x.offsets, dtype=np.int64)
    return _gather(x, off[rows], np.diff(off)[rows])


def n_rows(x) -> int:
    return len(x.offsets) - 1 if isinstance(x, Ragged) else len(x)


def tensors_from_columns(cols: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Columns -> model input tensors (a list column becomes ``col__values``/``col__offsets``)."""
    out: dict[str, np.ndarray] = {}
    for name, x in cols.items():
        if isinstance(x, Ragged):
            out[f"{name}__values"], out[f"{name}__offsets"] = x.values, x.offsets
        else:
            out[name] = x
    return out


# --- verification against NVTabular ---------------------------------------------------------------


def edge_rows(workflow, raw: pd.DataFrame, vocab_cap: int = 2048) -> pd.DataFrame:
    """``raw`` plus rows that exercise the encodings: every vocabulary entry (up to ``vocab_cap`` per
    column, first and last), unseen values, nulls in continuous and string columns, empty lists."""
    import nvtabular as nvt
    from merlin.dag import postorder_iter_nodes

    if raw.empty:
        return raw
    frames = [raw.reset_index(drop=True)]
    n = len(raw)
    vocabs: dict[str, pd.Series] = {}
    for node in postorder_iter_nodes(workflow.output_node):
        if isinstance(node.op, nvt.ops.Categorify):
            for name, path in node.op.categories.items():
                if name in raw.columns and isinstance(path, str):
                    v = pd.read_parquet(path, columns=[name])[name].dropna()
                    vocabs[name] = pd.concat([v.head(vocab_cap // 2), v.tail(vocab_cap // 2)]).drop_duplicates()
    size = max([len(v) for v in vocabs.values()] + [n])
    base = raw.iloc[np.arange(size) % n].reset_index(drop=True)
    for name, v in vocabs.items():
        vals = v.to_numpy()[np.arange(size) % len(v)] if len(v) else None
        if vals is None:
            continue
        if _is_list(raw[name]):
            base[name] = [[x] for x in vals]
        else:
            base[name] = pd.Series(vals, dtype=raw[name].dtype)
    frames.append(base)
    odd = raw.iloc[np.arange(min(n, 8))].reset_index(drop=True).copy()
    for name in raw.columns:
        s = raw[name]
        if _is_list(s):
            sample = next((x for x in s if len(x)), [0])
            unseen = _unseen(pd.Series(list(sample)))
            odd[name] = [[] if i % 2 == 0 else [unseen, *list(sample)] for i in range(len(odd))]
        elif s.dtype.kind == "f":
            odd.loc[odd.index % 2 == 0, name] = np.nan
        elif s.dtype == object:
            odd[name] = [None if i % 3 == 0 else (_unseen(s) if i % 3 == 1 else s.iloc[0]) for i in range(len(odd))]
        elif s.dtype.kind in "iu":
            odd.loc[odd.index % 2 == 0, name] = _unseen(s)
    frames.append(odd)
    return pd.concat(frames, ignore_index=True)


def _is_list(s: pd.Series) -> bool:
    return s.dtype == object and len(s) > 0 and isinstance(s.iloc[0], (list, tuple, np.ndarray))


def _unseen(s: pd.Series):
    if s.dtype.kind in "iu" or (len(s) and isinstance(s.iloc[0], (int, np.integer))):
        return int(pd.to_numeric(s).max()) + 7919
    return "__never_seen_in_training__"


def verify(compiled: CompiledWorkflow, workflow, raw: pd.DataFrame, to_columns: Callable[[pd.DataFrame], dict]) -> int:
    """Compare the compiled transform with ``workflow.transform`` on ``raw`` (plus :func:`edge_rows`):
    same columns in the same order, same dtypes, equal values (NaN == NaN). ``to_columns`` turns raw
    rows into request columns as the server receives them. Returns the rows checked; raises
    AssertionError on any difference."""
    from merlin.io import Dataset

    rows = edge_rows(workflow, raw)
    want = workflow.transform(Dataset(rows.copy(), cpu=True)).to_ddf().compute().reset_index(drop=True)
    got = compiled(to_columns(rows))
    if list(got) != list(want.columns):
        raise AssertionError(f"columns {list(got)} != workflow's {list(want.columns)}")
    for name, x in got.items():
        w = want[name]
        if isinstance(x, Ragged):
            if not _is_list(w) and len(w):
                raise AssertionError(f"{name}: list in the compiled path, not in the workflow's output")
            lengths = np.array([len(v) for v in w], dtype=np.int64)
            if not np.array_equal(np.diff(x.offsets.astype(np.int64)), lengths):
                raise AssertionError(f"{name}: list lengths differ")
            flat = np.concatenate([np.asarray(v) for v in w]) if lengths.sum() else np.array([], dtype=x.values.dtype)
            if flat.dtype != x.values.dtype or not np.array_equal(flat, x.values):
                raise AssertionError(f"{name}: list values differ ({x.values.dtype} vs {flat.dtype})")
        else:
            wv = w.to_numpy()
            if wv.dtype != x.dtype:
                raise AssertionError(f"{name}: dtype {x.dtype} != workflow's {wv.dtype}")
            floats = wv.dtype.kind == "f"
            eq = ((wv == x) | (np.isnan(wv) & np.isnan(x))) if floats else (wv == x)
            if not eq.all():
                bad = int(np.flatnonzero(~eq)[0])
                raise AssertionError(f"{name}: values differ, e.g. row {bad}: {x[bad]!r} vs workflow {wv[bad]!r}")
    return len(rows)
