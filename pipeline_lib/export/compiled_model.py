"""The ranking model compiled for serving: the SavedModel's serving signature converted to ONNX and run
by ONNX Runtime (the model part of a served request, close to the hardware).

A batch-1 request spends most of its time in the TensorFlow call: eager dispatch of the signature's
function, not arithmetic. At export, :func:`compile_signature` converts the signature with tf2onnx
(the Merlin ranking models' list features go through ``RaggedTensorToSparse`` with a trailing
dimension of 1, which tf2onnx 1.17 refuses, and its ragged indices divide by zero when every list of a
request is empty; :func:`_ragged_to_sparse` converts that op itself) and
:func:`verify_and_measure` checks it against the SavedModel on the export's held-out rows: the whole
sample, each of its first rows alone (every list length a request can have), and the sample tiled to
the timed batch sizes; every output within the parity tolerance, same shapes. The same call times both
at each batch size and keeps the compiled model for requests up to the largest batch size where it is
faster (ONNX Runtime's sparse embedding lookups are slower than TensorFlow's at large batches); bigger
requests call the SavedModel where TensorFlow is loaded anyway (the full ensemble, in process), while
a version served without TensorFlow scores them in chunks of the largest verified batch size
(:mod:`pipeline_lib.export.compiled_version`). Anything that fails -- conversion, a missing package, a difference,
no batch size where it is faster -- leaves the SavedModel serving, with the reason recorded.
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any, Callable, Mapping, Optional

import numpy as np

from pipeline_lib.etl.fast_transform import Ragged, n_rows, take_rows, tensors_from_columns

log = logging.getLogger(__name__)

ONNX_FILE = "model.onnx"
BATCH_SIZES = (1, 8, 64, 256, 1024)  # timed at export; the compiled model serves up to the largest faster one
SINGLE_ROWS = 32  # sample rows also verified one per request


class Unsupported(Exception):
    """The model cannot be compiled (or does not reproduce the SavedModel): the SavedModel serves."""


@dataclass
class CompiledModel:
    """An ONNX Runtime session over the converted serving signature: numpy inputs -> numpy outputs."""

    session: Any
    input_dtypes: dict  # input name -> numpy dtype (the signature's)
    output_names: list[str]  # in the order of the ONNX graph's outputs

    @classmethod
    def load(cls, onnx_model: bytes | str, input_dtypes: Mapping[str, Any], output_names: list[str]) -> "CompiledModel":
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise Unsupported(f"onnxruntime is not installed: {exc}") from exc
        opts = ort.SessionOptions()
        # one thread: a batch-1 request is latency-bound; Triton scales with model instances instead
        opts.intra_op_num_threads = 1
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        try:
            session = ort.InferenceSession(onnx_model, opts, providers=["CPUExecutionProvider"])
        except Exception as exc:  # noqa: BLE001 - e.g. a TF op tf2onnx left unconverted
            raise Unsupported(f"ONNX Runtime cannot load the converted model: {str(exc)[-300:]}") from exc
        return cls(session, {k: np.dtype(v) for k, v in input_dtypes.items()}, list(output_names))

    def __call__(self, arrays: Mapping[str, np.ndarray]) -> dict:
        feed = {}
        for name, dtype in self.input_dtypes.items():
            if name not in arrays:
                raise KeyError(f"model input '{name}' not produced by the workflow")
            feed[name] = np.asarray(arrays[name], dtype=dtype)
        return dict(zip(self.output_names, self.session.run(None, feed)))


def _sparse_indices(ctx, split: str) -> tuple[str, str]:
    """ONNX nodes for the ``[n, 2]`` (row, position) indices and the ``[rows, longest]`` dense shape of a
    ragged tensor's row ``split`` (offsets). Like tf2onnx's ``ragged_lengths_to_sparse_indices``, with the
    divisor kept >= 1: tf2onnx's divides by the longest row, which fails when every list is empty."""
    from onnx import TensorProto, helper
    from tf2onnx import utils
    from tf2onnx.graph_builder import GraphBuilder

    gb = GraphBuilder(ctx)
    if ctx.get_dtype(split) != TensorProto.INT64:
        split = ctx.make_node("Cast", [split], attr={"to": TensorProto.INT64}).output[0]
    big = int(np.iinfo(np.int64).max)
    lens = ctx.make_node("Sub", [gb.make_slice({"data": split, "starts": [1], "ends": [big], "axes": [0]}),
                                 gb.make_slice({"data": split, "starts": [0], "ends": [-1], "axes": [0]})]).output[0]
    longest = gb.make_reduce_max({"data": lens, "axes": [0], "keepdims": True})
    rows = ctx.make_node("Shape", [lens]).output[0]
    one = ctx.make_const(utils.make_name("one"), np.array([1], np.int64)).output[0]
    step = ctx.make_node("Max", [longest, one]).output[0]
    ones = ctx.make_node("ConstantOfShape", [ctx.make_node("Mul", [step, rows]).output[0]],
                         attr={"value": helper.make_tensor("value", TensorProto.INT64, dims=[1], vals=[1])}).output[0]
    zero = ctx.make_const(utils.make_name("zero"), np.array(0, np.int64)).output[0]
    dense = ctx.make_node("CumSum", [ones, zero], attr={"exclusive": True}).output[0]
    col, row = ctx.make_node("Mod", [dense, step]).output[0], ctx.make_node("Div", [dense, step]).output[0]
    keep = ctx.make_node("Less", [col, ctx.make_node("Gather", [lens, row]).output[0]]).output[0]
    row, col = (gb.make_unsqueeze({"data": ctx.make_node("Compress", [x, keep]).output[0], "axes": [1]})
                for x in (row, col))
    indices = ctx.make_node("Concat", [row, col], attr={"axis": 1}).output[0]
    return indices, ctx.make_node("Concat", [rows, step], attr={"axis": 0}).output[0]


def _ragged_to_sparse(ctx, node, name, args) -> None:
    """tf2onnx handler for ``RaggedTensorToSparse`` with one row split and dense values of shape ``[n]``
    or ``[n, 1]`` (a list feature expanded to rank 2, as Merlin's embedding tables read it): the sparse
    indices of the ragged rows, plus a column of zeros and a trailing 1 in the dense shape for ``[n, 1]``."""
    from tf2onnx import utils
    from tf2onnx.graph_builder import GraphBuilder

    values, splits = node.input[-1], node.input[:-1]
    rank, shape = ctx.get_rank(values), ctx.get_shape(values)
    utils.make_sure(len(splits) == 1 and (rank in (None, 1) or (rank == 2 and shape[-1] == 1)),
                    "RaggedTensorToSparse: only one row split and dense values of shape [n] or [n, 1] are supported")
    indices, dense_shape = _sparse_indices(ctx, splits[0])
    if rank == 2:
        first = GraphBuilder(ctx).make_slice({"data": indices, "starts": [0], "ends": [1], "axes": [1]})
        zeros = ctx.make_node("Sub", [first, first]).output[0]
        indices = ctx.make_node("Concat", [indices, zeros], attr={"axis": 1}).output[0]
        one = ctx.make_const(utils.make_name("one"), np.array([1], np.int64)).output[0]
        dense_shape = ctx.make_node("Concat", [dense_shape, one], attr={"axis": 0}).output[0]
        flat = ctx.make_const(utils.make_name("flat"), np.array([-1], np.int64)).output[0]
        values = ctx.make_node("Reshape", [values, flat]).output[0]
    ctx.replace_all_inputs(node.output[0], indices)
    ctx.replace_all_inputs(node.output[1], values)
    ctx.replace_all_inputs(node.output[2], dense_shape)
    ctx.remove_node(node.name)


def compile_signature(signature, output_names: list[str]) -> bytes:
    """The SavedModel's serving signature -> a serialized ONNX model with the signature's input names and
    ``output_names`` as outputs, in that order. Raises :class:`Unsupported`."""
    try:
        import tensorflow as tf
        import tf2onnx
    except ImportError as exc:
        raise Unsupported(f"tf2onnx is not installed: {exc}") from exc
    specs = [tf.TensorSpec(s.shape, s.dtype, name=k) for k, s in signature.structured_input_signature[1].items()]

    def call(*args):
        out = signature(**{s.name: a for s, a in zip(specs, args)})
        return [out[n] for n in output_names]

    logging.getLogger("tf2onnx").setLevel(logging.CRITICAL)  # unconverted ops: ONNX Runtime's load says which
    try:
        proto, _ = tf2onnx.convert.from_function(tf.function(call), input_signature=specs, opset=17,
                                                 custom_op_handlers={"RaggedTensorToSparse": (_ragged_to_sparse, [])})
    except Exception as exc:  # noqa: BLE001 - any conversion failure means: serve the SavedModel
        raise Unsupported(f"tf2onnx conversion failed: {type(exc).__name__}: {str(exc)[:300]}") from exc
    return proto.SerializeToString()


def _median_ms_pair(fast: Callable[[], object], slow: Callable[[], object], budget_s: float = 0.4,
                    max_calls: int = 200) -> tuple[float, float]:
    """Median milliseconds of ``fast`` and ``slow``, called alternately (a busy machine slows both alike)."""
    for _ in range(3):
        fast(), slow()
    times: tuple[list[float], list[float]] = ([], [])
    end = time.perf_counter() + budget_s
    while len(times[0]) < max_calls and (len(times[0]) < 5 or time.perf_counter() < end):
        for fn, acc in zip((fast, slow), times):
            t0 = time.perf_counter()
            fn()
            acc.append(time.perf_counter() - t0)
    return float(np.median(times[0])) * 1e3, float(np.median(times[1])) * 1e3


def _max_diff(got: dict, want: dict, what: str, atol: float) -> float:
    worst = 0.0
    for name, w in want.items():
        g = np.asarray(got[name])
        if g.shape != w.shape:
            raise Unsupported(f"{what}: output '{name}' shape {g.shape} != SavedModel {w.shape}")
        diff = float(np.max(np.abs(g - w))) if w.size else 0.0
        if not diff <= atol:  # NaN fails too
            raise Unsupported(f"{what}: max |compiled - SavedModel| of '{name}' = {diff:.3g} > {atol}")
        worst = max(worst, diff)
    return worst


def verify_and_measure(compiled: Callable[[dict], dict], savedmodel: Callable[[dict], dict],
                       batches: Mapping[str, dict], atol: float) -> dict:
    """Compare ``compiled`` with ``savedmodel`` on every batch of model inputs (``batches``: label ->
    inputs; the ``batch<N>`` ones are also timed) and pick the largest timed batch size up to which the
    compiled model is faster. Returns the status recorded in the version; raises :class:`Unsupported`."""
    worst, timings, max_rows = 0.0, {}, 0
    for label, inputs in batches.items():
        try:
            got = compiled(inputs)
        except Exception as exc:  # noqa: BLE001 - e.g. an ONNX Runtime kernel refusing a shape
            raise Unsupported(f"{label}: the compiled model failed: {type(exc).__name__}: {str(exc)[-200:]}") from exc
        worst = max(worst, _max_diff(got, savedmodel(inputs), label, atol))
    for label, inputs in batches.items():
        if not label.startswith("batch"):
            continue
        fast, slow = _median_ms_pair(lambda: compiled(inputs), lambda: savedmodel(inputs))  # noqa: B023 - called now
        timings[label] = {"compiled_ms": round(fast, 4), "savedmodel_ms": round(slow, 4),
                          "speedup": round(slow / fast, 2)}
        if fast >= slow:
            break
        max_rows = int(label[len("batch"):])
    if max_rows == 0:
        raise Unsupported(f"the compiled model is not faster than the SavedModel at batch 1: {timings}")
    largest = max(int(label[len("batch"):]) for label in batches if label.startswith("batch"))
    return {"enabled": True, "runtime": _runtime(), "max_rows": max_rows, "max_abs_diff": worst,
            "verified_batches": len(batches), "largest_verified_batch": largest, "timings": timings}


def _runtime() -> str:
    import onnxruntime

    return f"onnxruntime {onnxruntime.__version__}"


def verification_batches(cols: Mapping[str, object]) -> dict:
    """Model-input batches for :func:`verify_and_measure` from the workflow's output columns of the held-out
    sample (lists as :class:`~pipeline_lib.etl.fast_transform.Ragged`): the sample, its first rows one at a
    time (each its own list lengths), one row with every list empty, and the sample tiled to each of
    :data:`BATCH_SIZES`."""
    n = n_rows(next(iter(cols.values())))
    if n == 0:
        raise Unsupported("no held-out rows to verify the compiled model on")

    def rows(idx: np.ndarray) -> dict:
        return tensors_from_columns({k: take_rows(v, idx) for k, v in cols.items()})

    out = {"sample": rows(np.arange(n))}
    out.update({f"row{i}": rows(np.array([i])) for i in range(min(n, SINGLE_ROWS))})
    first = {k: take_rows(v, np.array([0])) for k, v in cols.items()}  # row 0 with every list empty
    out["empty_lists"] = tensors_from_columns(
        {k: Ragged(v.values[:0], np.zeros(2, dtype=v.offsets.dtype)) if isinstance(v, Ragged) else v
         for k, v in first.items()})
    out.update({f"batch{b}": rows(np.arange(b) % n) for b in BATCH_SIZES})
    return out


def compile_and_verify(signature, input_dtypes: Mapping[str, Any], output_names: list[str],
                       cols: Mapping[str, object], savedmodel: Callable[[dict], dict],
                       atol: float) -> tuple[Optional[CompiledModel], Optional[bytes], dict]:
    """Convert, load, verify against ``savedmodel`` on the held-out columns ``cols`` and time; returns
    (compiled model, its ONNX bytes, status), or (None, None, {"enabled": False, "reason": ...})."""
    try:
        onnx_bytes = compile_signature(signature, output_names)
        compiled = CompiledModel.load(onnx_bytes, input_dtypes, output_names)
        status = verify_and_measure(compiled, savedmodel, verification_batches(cols), atol)
    except Unsupported as exc:
        log.warning("compiled model disabled, the SavedModel serves: %s", exc)
        return None, None, {"enabled": False, "reason": str(exc)}
    return compiled, onnx_bytes, status
