"""Stage 5 -- workflow + model -> ensemble: a merlin-systems ensemble in a Triton model repository.

The ensemble is ``raw columns >> fitted workflow (label removed) >> model``. Both steps run
in-process inside Triton's python backend (merlin-systems' ``executor_model``), so the
repository needs no TensorFlow backend (Triton dropped it in 25.03 and the CPU server here has
none) and no BLS hop between models. merlin-systems swaps ops by *exact* type at export, so
the subclasses below are left in place; they save their own artifacts (workflow, SavedModel)
inside the version directory, which makes each version self-contained and relocatable.

Before anything is written, the ensemble's in-process output is compared with the offline
path (NVTabular ``Workflow.transform`` + the Keras model's ``predict``) on a raw sample; after
writing, the *exported* copy is loaded back and checked the same way, through the ensemble,
through the :class:`DirectPredictor` the served ``model.py`` falls back to, and through the compiled
version it loads first (:mod:`pipeline_lib.export.compiled_version`: no TensorFlow or NVTabular). Before that, the workflow op's
compiled numpy transform (:mod:`pipeline_lib.etl.fast_transform`) is verified column by column against
``Workflow.transform`` and enabled only if identical. A version only appears
in the repository after both checks and the served smoke test pass (``pipeline_lib.serving.repository``).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from merlin.systems.dag.ops.tensorflow import PredictTensorflow  # sets protobuf impl; import first
from merlin.dag import BaseOperator
from merlin.systems.dag.ops.workflow import TransformWorkflow

from pipeline_lib.export.parity import check_parity, ParityError  # noqa: F401  ParityError: re-exported
from pipeline_lib.export import compiled_model as onnx_compiled
from pipeline_lib.export import compiled_version
from pipeline_lib.export.compiled_version import CompiledPlan, CompiledPredictor, request_rows
from pipeline_lib.paths import TRITON_MODELS
from pipeline_lib.etl.fast_transform import (Unsupported, columns_from_tensors, compile_workflow,
                                             tensors_from_columns, verify)
from pipeline_lib.models.common import load_encoder
from pipeline_lib.export.staging import (ExportOptions, StagedVersion, raw_columns,
                                         raw_to_columns)
from pipeline_lib.validate.requests import RequestLimits, write_limit_parameters

log = logging.getLogger(__name__)

ENSEMBLE_SUBDIR = "ensemble"


class InProcessWorkflow(TransformWorkflow):
    """TransformWorkflow that runs inside the executor model instead of a separate Triton model.

    The workflow is stored as an artifact (``ensemble/workflow``) rather than inside the
    ensemble pickle, so Categorify's vocabulary files travel with the version directory.

    Fast path: :meth:`enable_fast_path` (at export) compiles the fitted workflow into a numpy-only
    transform (:mod:`pipeline_lib.etl.fast_transform`) and verifies it against ``Workflow.transform``
    on raw rows; only then is ``fast_status["enabled"]`` pickled with the ensemble, and
    ``load_artifacts`` compiles it again from the version's own workflow. A request the compiled
    path does not cover (other dtypes) and a workflow that does not compile run NVTabular.
    """

    fast_status: Optional[dict] = None  # class default: versions exported before the fast path

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("workflow", "_fast")}

    def save_artifacts(self, artifact_path: str) -> None:
        self.workflow.save(os.path.join(artifact_path, "workflow"))

    def load_artifacts(self, artifact_path: str) -> None:
        import nvtabular as nvt

        if not artifact_path:  # merlin.dag.Graph() calls load_artifacts("") on construction
            return

        self.workflow = nvt.Workflow.load(os.path.join(artifact_path, "workflow"))
        self._fast = None
        if (self.fast_status or {}).get("enabled"):

            try:
                self._fast = compile_workflow(self.workflow)
            except Unsupported as exc:  # verified at export, so not expected: keep NVTabular
                log.warning("fast transform not compiled, using NVTabular: %s", exc)

    def enable_fast_path(self, sample_raw: pd.DataFrame) -> dict:
        """Compile the fitted workflow and verify it against ``Workflow.transform`` on ``sample_raw``
        (plus edge rows); enable it only if every output column is identical."""

        self._fast = None
        try:
            compiled = compile_workflow(self.workflow)
            cols = [c for c in self.workflow.input_schema.column_names]
            n = verify(compiled, self.workflow, sample_raw[cols], raw_to_columns)
        except (Unsupported, AssertionError) as exc:
            self.fast_status = {"enabled": False, "reason": f"{type(exc).__name__}: {exc}"}
            log.warning("serving fast path disabled, NVTabular runs per request: %s", exc)
            return self.fast_status
        self._fast = compiled
        self.fast_status = {"enabled": True, "verified_rows": n}
        return self.fast_status

    @property
    def fast(self):
        return getattr(self, "_fast", None)

    def transform_columns(self, cols: dict) -> dict:
        """Request columns (``Ragged`` lists) -> the workflow's output columns: compiled path, or
        NVTabular when it is not enabled or the request is outside it."""

        if self.fast is not None:
            try:
                return self.fast(cols)
            except Unsupported:
                pass
        from merlin.dag import ColumnSelector
        from merlin.table import TensorTable

        out = self._nvt_transform(ColumnSelector(self.workflow.input_schema.column_names),
                                  TensorTable(tensors_from_columns(cols)))
        if not isinstance(out, TensorTable):
            out = TensorTable.from_df(out)
        ragged = {c.name for c in self.workflow.output_schema if c.is_list}
        return columns_from_tensors(out.to_dict(), ragged)

    def compute_output_schema(self, input_schema, col_selector, prev_output_schema=None):
        return self.output_schema

    def transform(self, col_selector, transformable):
        from merlin.table import TensorTable

        if self.fast is not None and isinstance(transformable, TensorTable):

            ragged = {c.name for c in self.workflow.input_schema if c.is_list}
            try:
                cols = self.fast(columns_from_tensors(transformable.to_dict(), ragged))
                return TensorTable(tensors_from_columns(cols))
            except Unsupported:
                pass
        return self._nvt_transform(col_selector, transformable)

    def _nvt_transform(self, col_selector, transformable):
        # Triton hands string (BYTES) inputs over as numpy object arrays of ``bytes`` (list values
        # too); the workflow's vocabularies were fitted on ``str``. Decode, or every string is OOV.
        from merlin.table import TensorTable

        if isinstance(transformable, TensorTable):
            transformable = transformable.to_df()
        for name in transformable.columns:
            col = transformable[name]
            if col.dtype != object or not len(col):
                continue
            first = col.iloc[0]
            if isinstance(first, bytes):
                transformable[name] = col.str.decode("utf-8")
            elif isinstance(first, (list, np.ndarray)) and any(isinstance(v, bytes) for v in col.explode().head(1)):
                transformable[name] = col.map(lambda vs: [v.decode("utf-8") if isinstance(v, bytes) else v for v in vs])
        return super().transform(col_selector, transformable)


class InProcessTensorflow(PredictTensorflow):
    """PredictTensorflow that calls the SavedModel's serving signature in-process.

    Compiled path: :meth:`enable_compiled` (at export) converts the signature to ONNX and verifies it
    against the SavedModel (:mod:`pipeline_lib.export.compiled_model`); only then is
    ``compiled_status["enabled"]`` pickled, the ONNX file saved beside the SavedModel, and requests of up
    to ``compiled_status["max_rows"]`` rows run by ONNX Runtime. Anything else calls the SavedModel."""

    compiled_status: Optional[dict] = None  # class default: versions exported before the compiled path

    def __init__(self, model_path: str | os.PathLike):
        # not PredictTensorflow.__init__: that saves the loaded model again to a temporary folder only to
        # read its signature back (~3 s of an export); the schemas come from the loaded signature here
        BaseOperator.__init__(self)
        self.path = str(model_path)
        self._bind(load_encoder(self.path)[0])
        self.input_schema, self.output_schema = signature_schemas(self._signature)

    def _bind(self, model) -> None:
        self.model = model
        self._signature = model.signatures["serving_default"]
        self._input_dtypes = {k: v.dtype for k, v in self._signature.structured_input_signature[1].items()}
        self._compiled: Any = None
        self._onnx: Any = None

    def loaded(self) -> tuple:
        """(SavedModel, serving signature, input dtypes): the model as ``common.load_encoder`` returns it."""
        return self.model, self._signature, self._input_dtypes

    def __getstate__(self) -> dict:
        skip = ("model", "_signature", "_input_dtypes", "_compiled", "_onnx")
        return {k: v for k, v in self.__dict__.items() if k not in skip}

    def save_artifacts(self, artifact_path: str) -> None:
        dst = os.path.join(artifact_path, "model")
        if os.path.exists(dst):
            shutil.rmtree(dst)
        shutil.copytree(self.path, dst)
        if getattr(self, "_onnx", None):
            Path(artifact_path, onnx_compiled.ONNX_FILE).write_bytes(self._onnx)

    def load_artifacts(self, artifact_path: str) -> None:
        import tensorflow as tf

        if not artifact_path:
            return

        self._bind(tf.saved_model.load(os.path.join(artifact_path, "model")))
        if (self.compiled_status or {}).get("enabled"):
            try:
                self._compiled = onnx_compiled.CompiledModel.load(
                    os.path.join(artifact_path, onnx_compiled.ONNX_FILE), self._numpy_dtypes(),
                    self.output_schema.column_names)
            except (onnx_compiled.Unsupported, OSError) as exc:  # verified at export, so not expected
                log.warning("compiled model not loaded, the SavedModel serves: %s", exc)

    def _numpy_dtypes(self) -> dict:
        return {k: dt.as_numpy_dtype for k, dt in self._input_dtypes.items()}

    def enable_compiled(self, cols: dict, atol: float) -> dict:
        """Compile the signature and verify it against the SavedModel on the workflow's output columns of
        held-out rows (``cols``); enabled only within ``atol`` and faster at batch 1."""
        self._compiled, self._onnx, self.compiled_status = onnx_compiled.compile_and_verify(
            self._signature, self._numpy_dtypes(), self.output_schema.column_names, cols, self.savedmodel_tensors, atol)
        return self.compiled_status

    @property
    def compiled(self) -> Optional[onnx_compiled.CompiledModel]:
        """The verified compiled model when it serves (else None)."""
        return getattr(self, "_compiled", None)

    def transform(self, col_selector, transformable):
        from merlin.table import TensorTable

        if not isinstance(transformable, TensorTable):
            transformable = TensorTable.from_df(transformable)
        return type(transformable)(self.predict_tensors(transformable.to_dict()))

    def predict_tensors(self, arrays: dict) -> dict:
        """Model input tensors (numpy) -> {output name: numpy array}: the compiled model for requests of up
        to ``compiled_status["max_rows"]`` rows when enabled, else one call of the serving signature."""
        if self.compiled is not None and request_rows(arrays) <= self.compiled_status["max_rows"]:  # type: ignore[index]
            try:
                return self.compiled(arrays)
            except Exception as exc:  # noqa: BLE001 - outside what export verified: the SavedModel answers
                log.warning("compiled model failed on a request, the SavedModel answers: %s", exc)
        return self.savedmodel_tensors(arrays)

    def savedmodel_tensors(self, arrays: dict) -> dict:
        """One call of the SavedModel's serving signature."""
        import tensorflow as tf

        inputs = {}
        for name, dtype in self._input_dtypes.items():
            if name not in arrays:
                raise KeyError(f"model input '{name}' not produced by the workflow")
            inputs[name] = tf.convert_to_tensor(np.asarray(arrays[name]), dtype=dtype)
        outputs = self._signature(**inputs)
        return {k: np.asarray(outputs[k].numpy()) for k in self.output_schema.column_names}


def signature_schemas(signature) -> tuple:
    """(input, output) Merlin schemas of a SavedModel's serving signature, as merlin-systems'
    ``PredictTensorflow`` derives them: a list input (``name__values`` / ``name__offsets``) is one column
    ``name`` of the values' dtype, dims ``[None, None, ...]``; other tensors keep their shape (-1 -> None)."""
    from merlin.schema import ColumnSchema, Schema

    def schema(specs: dict) -> Schema:
        cols = {}
        for name, spec in specs.items():
            base = name.removesuffix("__values").removesuffix("__offsets")
            if base != name:
                values = specs[f"{base}__values"]
                cols[base] = ColumnSchema(base, dtype=values.dtype, dims=[None, None, *values.shape.as_list()[1:]])
            else:
                cols[name] = ColumnSchema(name, dtype=spec.dtype, dims=spec.shape.as_list())
        return Schema(list(cols.values()))

    return schema(signature.structured_input_signature[1]), schema(signature.structured_outputs)


@dataclass
class ExportOutput(StagedVersion):
    output_name: str
    parity_max_abs_diff: float
    fast_transform: Optional[dict] = None  # {"enabled": bool, "verified_rows" | "reason"}
    compiled_model: Optional[dict] = None  # {"enabled": bool, "max_rows", "max_abs_diff", "timings" | "reason"}


def build_ensemble(workflow, model_dir: Path, label: str, fast_sample: Optional[pd.DataFrame] = None):
    """``raw columns >> workflow (label removed) >> model``. With ``fast_sample`` (raw rows), the
    workflow op's compiled fast path is verified on them and enabled if identical to NVTabular."""
    from merlin.systems.dag import Ensemble

    serving_wf = workflow.remove_inputs([label])
    wf_op = InProcessWorkflow(serving_wf)
    if fast_sample is not None:
        wf_op.enable_fast_path(fast_sample)
    graph = serving_wf.input_schema.column_names >> wf_op >> InProcessTensorflow(model_dir)
    return Ensemble(graph, serving_wf.input_schema)


class DirectPredictor:
    """What the served model runs per request when the ensemble is ``workflow >> model`` (every
    version this module exports): request tensors -> workflow op -> TensorFlow signature, on plain
    dicts of numpy arrays, without merlin's DAG runtime and TensorTable conversions. The ops are the
    ensemble's own (same compiled transform / NVTabular fallback, same SavedModel signature), so it
    returns what ``ensemble.transform`` returns."""

    def __init__(self, wf_op: InProcessWorkflow, tf_op: InProcessTensorflow, ragged: set[str]):
        self.wf_op, self.tf_op, self.ragged = wf_op, tf_op, ragged

    @classmethod
    def from_ensemble(cls, ensemble) -> Optional["DirectPredictor"]:
        from merlin.dag import postorder_iter_nodes

        ops = [n.op for n in postorder_iter_nodes(ensemble.graph.output_node, flatten_subgraphs=True) if n.op is not None]
        ops = [op for op in ops if type(op).__name__ != "SelectionOp"]
        if len(ops) != 2 or type(ops[0]) is not InProcessWorkflow or type(ops[1]) is not InProcessTensorflow:
            return None
        ragged = {c.name for c in ensemble.input_schema if c.is_ragged}
        return cls(ops[0], ops[1], ragged)

    def __call__(self, tensors: dict) -> dict:

        cols = self.wf_op.transform_columns(columns_from_tensors(tensors, self.ragged))
        return self.tf_op.predict_tensors(tensors_from_columns(cols))


def offline_scores(workflow, model_dir: Path, raw: pd.DataFrame, label: str, batch_size: int = 1024,
                   encoder: Optional[tuple] = None) -> np.ndarray:
    """The training-time path: NVTabular ``Workflow.transform`` of the raw rows as a Dataset, and the
    trained SavedModel's serving signature called on batches of the transformed rows (lists as
    values/offsets, as the Merlin loader and merlin-systems hand them to the model).

    The SavedModel object is used rather than ``tf.keras.models.load_model``: Keras' rebuild of
    Merlin's DCN-v2 from its config does not reproduce the trained model (differences ~1e-3,
    checked against the in-memory model), while the SavedModel's traced functions match it to
    ~1e-7. Batches are built with merlin's ``TensorTable`` rather than the Merlin ``Loader``:
    merlin-dataloader 23.08 fails on a batch in which every row holds an empty list. ``encoder``: the
    SavedModel of ``model_dir`` already loaded (``common.load_encoder``'s triple), else loaded here.
    """
    from pipeline_lib.models.ranking import raw_scores

    return raw_scores(workflow, model_dir, raw, label, batch_size, encoder)


def load_version(version_dir: Path):
    """Load an exported version's ensemble in-process, with its artifacts (workflow, model)."""
    from merlin.dag import postorder_iter_nodes
    from merlin.systems.dag import Ensemble

    artifacts = Path(version_dir) / ENSEMBLE_SUBDIR
    ensemble = Ensemble.load(str(artifacts))
    for node in postorder_iter_nodes(ensemble.graph.output_node, flatten_subgraphs=True):
        node.op.load_artifacts(str(artifacts))
    return ensemble


def ensemble_scores(ensemble, raw: pd.DataFrame) -> np.ndarray:
    """Run the ensemble in-process on raw rows, as the served executor model does."""
    from merlin.dag.runtime import Runtime

    cols = ensemble.input_schema.column_names
    table = raw_to_tensor_table(raw[cols])
    out = ensemble.transform(table, runtime=Runtime())
    name = ensemble.output_schema.column_names[0]
    return np.asarray(out[name].values).reshape(-1)


def raw_to_tensor_table(raw: pd.DataFrame):
    """Raw rows -> TensorTable as Triton hands them to the executor: ragged lists, strings as bytes."""
    from merlin.table import TensorTable

    return TensorTable(raw_columns(raw))


def export_ensemble(workflow_dir: Path, model_dir: Path, sample_raw: pd.DataFrame, label: str, staging_dir: Path,
                    model_name: str, version: int = 1, options: Optional[ExportOptions] = None) -> ExportOutput:
    """Check parity in-process, export the ensemble as ``staging_dir/<model_name>/<version>``,
    load the exported copy back and check it again. Nothing touches the live repository.

    ``options.fast_transform``: compile the fitted workflow for serving (verified identical to NVTabular
    on ``sample_raw`` plus edge rows, else NVTabular serves). ``options.dynamic_batching``: a
    :class:`pipeline_lib.config.DynamicBatchingConfig` written into the version's config.pbtxt.
    ``options.compiled_model``: "auto" serves the model compiled to ONNX where it is verified equal to the SavedModel
    within ``atol`` and faster (:mod:`pipeline_lib.export.compiled_model`); "off" always the SavedModel."""
    import nvtabular as nvt

    o = options or ExportOptions()
    workflow = nvt.Workflow.load(str(workflow_dir))
    ensemble = build_ensemble(workflow, model_dir, label, fast_sample=sample_raw if o.fast_transform else None)
    compiled_status = enable_compiled_model(ensemble, sample_raw, o.atol) if o.compiled_model == "auto" else \
        {"enabled": False, "reason": "export.compiled_model is off"}
    # the reference calls the SavedModel the ensemble loaded from model_dir (loading it again took ~2 s)
    want = offline_scores(workflow, model_dir, sample_raw, label, encoder=_model_op(ensemble).loaded())
    diff_inproc = check_parity("in-process ensemble", ensemble_scores(ensemble, sample_raw), want, o.atol)

    export_as_version(ensemble, staging_dir, model_name, version)
    install_serving_model(staging_dir / model_name, version, o.limits(), o.dynamic_batching)
    version_dir = staging_dir / model_name / str(version)
    light = write_compiled_version(ensemble, version_dir / ENSEMBLE_SUBDIR)
    exported = load_version(version_dir)
    diff_exported = max(check_parity("exported ensemble", ensemble_scores(exported, sample_raw), want, o.atol),
                        _served_paths_parity(exported, version_dir, sample_raw, want, o.atol))
    fast_status = fast_transform_status(ensemble)
    out = ExportOutput(staging_dir, model_name, version, ensemble.output_schema.column_names[0],
                       max(diff_inproc, diff_exported), fast_status, compiled_status)
    (out.version_dir / "run_info.json").write_text(
        json.dumps({**(o.run_info or {}), "parity_max_abs_diff": out.parity_max_abs_diff,
                    "fast_transform": fast_status, "compiled_model": compiled_status,
                    "loads_without_tensorflow": light}, indent=2)
    )
    return out


def write_compiled_version(ensemble, artifact_dir: Path) -> bool:
    """When both the compiled transform and the compiled model serve, write the plan that lets the served
    model load without TensorFlow / NVTabular (:mod:`pipeline_lib.export.compiled_version`); returns
    whether it was written."""
    from merlin.systems.triton.conversions import tensor_names

    direct = DirectPredictor.from_ensemble(ensemble)
    if direct is None or direct.wf_op.fast is None or direct.tf_op.compiled is None:
        return False
    dtypes = {k: np.dtype(v).name for k, v in direct.tf_op._numpy_dtypes().items()}
    chunk = int(direct.tf_op.compiled_status["largest_verified_batch"])  # type: ignore[index]
    plan = CompiledPlan(list(tensor_names(ensemble.input_schema)), sorted(direct.ragged),
                        list(ensemble.output_schema.column_names), dtypes, chunk)
    compiled_version.write(artifact_dir, plan, direct.wf_op.fast)
    return True


def _served_paths_parity(exported, version_dir: Path, sample_raw: pd.DataFrame, want: np.ndarray,
                         atol: float) -> float:
    """The exported copy through what the served model.py runs per request: the direct path (the whole
    sample, then single rows where the compiled model serves them) and, where it was written, the compiled
    version (the whole sample in one request, then single rows)."""
    raw = sample_raw[exported.input_schema.column_names].reset_index(drop=True)
    diff = 0.0
    direct = DirectPredictor.from_ensemble(exported)
    if direct is not None:
        diff = check_parity("exported ensemble (direct path)", _scores(direct, raw), want, atol)
        if direct.tf_op.compiled is not None:
            diff = max(diff, _single_rows_parity(direct, "direct path", raw, want, atol))
    light = CompiledPredictor.load(version_dir / ENSEMBLE_SUBDIR)
    if light is not None:
        diff = max(diff, check_parity("exported compiled version", _scores(light, raw), want, atol),
                   _single_rows_parity(light, "compiled version", raw, want, atol))
    return diff


def _scores(predict, raw: pd.DataFrame) -> np.ndarray:
    """Raw rows -> the first output of ``predict`` (request tensors -> outputs), flat."""
    return np.asarray(next(iter(predict(_raw_tensors(raw)).values()))).reshape(-1)


def fast_transform_status(ensemble) -> dict:
    """The workflow op's compiled-transform status (``{"enabled": False, ...}`` when it was not tried)."""
    return _workflow_op(ensemble).fast_status or {"enabled": False, "reason": "export.fast_transform is off"}


def enable_compiled_model(ensemble, sample_raw: pd.DataFrame, atol: float) -> dict:
    """Compile the ensemble's model op (ONNX) and verify it against the SavedModel on the workflow's output
    for ``sample_raw``; the status recorded in the version (``{"enabled": False, "reason": ...}`` if not)."""

    direct = DirectPredictor.from_ensemble(ensemble)
    if direct is None:
        return {"enabled": False, "reason": "the ensemble is not workflow >> model"}
    tensors = _raw_tensors(sample_raw[ensemble.input_schema.column_names])
    cols = direct.wf_op.transform_columns(columns_from_tensors(tensors, direct.ragged))
    return direct.tf_op.enable_compiled(cols, atol)


def _single_rows_parity(predict, what: str, raw: pd.DataFrame, want: np.ndarray, atol: float) -> float:
    """One-row requests (the compiled batch-1 path) through ``predict``: the first rows of ``raw``."""
    diff = 0.0
    for i in range(min(len(raw), onnx_compiled.SINGLE_ROWS)):
        got = _scores(predict, raw.iloc[[i]])
        diff = max(diff, check_parity(f"exported ensemble ({what}, row {i})", got, want[i:i + 1], atol))
    return diff


def _workflow_op(ensemble) -> InProcessWorkflow:
    return _op_of_type(ensemble, InProcessWorkflow)


def _model_op(ensemble) -> InProcessTensorflow:
    return _op_of_type(ensemble, InProcessTensorflow)


def _op_of_type(ensemble, kind: type):
    from merlin.dag import postorder_iter_nodes

    return next(n.op for n in postorder_iter_nodes(ensemble.graph.output_node, flatten_subgraphs=True)
                if isinstance(n.op, kind))


def _raw_tensors(raw: pd.DataFrame) -> dict:
    """Raw rows -> request tensors (``col``, ``col__values``/``col__offsets``) as Triton delivers them."""
    out = {}
    for name, v in raw_columns(raw).items():
        if isinstance(v, tuple):
            out[f"{name}__values"], out[f"{name}__offsets"] = v
        else:
            out[name] = v
    return out


def export_as_version(ensemble, staging_dir: Path, model_name: str, version: int) -> None:
    """``Ensemble.export`` into a fresh ``staging_dir`` as ``<model_name>/<version>``.

    merlin-systems 23.08 writes ensemble.pkl/model.py into version "1" whatever ``version`` says
    (TritonExecutorRuntime._executor_model_export is called without it) while the op artifacts
    go to ``<version>/``; so export as 1 and rename the folder.
    """
    if staging_dir.exists():
        shutil.rmtree(staging_dir)
    staging_dir.mkdir(parents=True)
    ensemble.export(str(staging_dir), name=model_name, version=1)
    if version != 1:
        os.rename(staging_dir / model_name / "1", staging_dir / model_name / str(version))


def install_serving_model(model_dir: Path, version: int, limits, dynamic_batching=None) -> None:
    """Swap merlin-systems' executor model.py for ours (request checks, one-line errors) and
    record the request limits (:class:`~pipeline_lib.validate.requests.RequestLimits`, or a row count)
    as model parameters in config.pbtxt."""
    import tritonclient.grpc.model_config_pb2 as mc
    from google.protobuf import text_format

    # serving_model.py imports triton_python_backend_utils, so it is copied, never imported here
    shutil.copyfile(TRITON_MODELS / "ranking.py", model_dir / str(version) / "model.py")
    cfg_path = model_dir / "config.pbtxt"
    cfg = text_format.Parse(cfg_path.read_text(), mc.ModelConfig())
    write_limit_parameters(cfg, limits if isinstance(limits, RequestLimits) else RequestLimits(int(limits)))
    # the id of the answered request (the impression log's key; feedback names it): pipeline_lib.online
    if not any(o.name == "request_id" for o in cfg.output):
        cfg.output.append(mc.ModelOutput(name="request_id", data_type=mc.TYPE_STRING, dims=[1]))
    if dynamic_batching is not None and dynamic_batching.enabled:
        # One request = one batch entry: every input gets a leading batch dimension of 1 and is a
        # ragged-batch input (requests of different row and list-value counts are queued together;
        # the python backend hands them to model.py as separate requests, which scores them in one
        # call). Row-wise batching with ragged lists is refused by Triton ("input 'device' batch size
        # does not match other inputs"): values/offsets have no row-sized first dimension.
        cfg.max_batch_size = dynamic_batching.max_batch_size
        for inp in cfg.input:
            inp.allow_ragged_batch = True
        cfg.dynamic_batching.max_queue_delay_microseconds = dynamic_batching.max_queue_delay_microseconds
        cfg.dynamic_batching.preferred_batch_size.extend(dynamic_batching.preferred_batch_size)
    cfg_path.write_text(text_format.MessageToString(cfg))
