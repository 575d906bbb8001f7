"""Stage 5 -- workflow + model -> ensemble: a merlin-systems ensemble in a Triton model repository.

The ensemble is ``raw columns >> fitted workflow (label removed) >> model``. Both steps run
in-process inside Triton's python backend (merlin-systems' ``executor_model``), so the
repository needs no TensorFlow backend (Triton dropped it in 25.03 and the CPU server here has
none) and no BLS hop between models. merlin-systems swaps ops by *exact* type at export, so
the subclasses below are left in place; they save their own artifacts (workflow, SavedModel)
inside the version directory, which makes each version self-contained and relocatable.

Before anything is written, the ensemble's in-process output is compared with the offline
path (NVTabular ``Workflow.transform`` + the Keras model's ``predict``) on a raw sample; after
writing, the *exported* copy is loaded back and checked the same way. A version only appears
in the repository after both checks and the served smoke test pass (``pipeline_lib.repository``).
"""
from __future__ import annotations

import json
import logging
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from merlin.systems.dag.ops.tensorflow import PredictTensorflow  # sets protobuf impl; import first
from merlin.systems.dag.ops.workflow import TransformWorkflow

log = logging.getLogger(__name__)

ENSEMBLE_SUBDIR = "ensemble"


class ParityError(AssertionError):
    """The ensemble does not reproduce offline predictions."""


class InProcessWorkflow(TransformWorkflow):
    """TransformWorkflow that runs inside the executor model instead of a separate Triton model.

    The workflow is stored as an artifact (``ensemble/workflow``) rather than inside the
    ensemble pickle, so Categorify's vocabulary files travel with the version directory.
    """

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "workflow"}

    def save_artifacts(self, artifact_path: str) -> None:
        self.workflow.save(os.path.join(artifact_path, "workflow"))

    def load_artifacts(self, artifact_path: str) -> None:
        import nvtabular as nvt

        if not artifact_path:  # merlin.dag.Graph() calls load_artifacts("") on construction
            return

        self.workflow = nvt.Workflow.load(os.path.join(artifact_path, "workflow"))

    def compute_output_schema(self, input_schema, col_selector, prev_output_schema=None):
        return self.output_schema

    def transform(self, col_selector, transformable):
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
    """PredictTensorflow that calls the SavedModel's serving signature in-process."""

    def __init__(self, model_path: str | os.PathLike):
        super().__init__(str(model_path))
        self._bind(self.model)

    def _bind(self, model) -> None:
        self.model = model
        self._signature = model.signatures["serving_default"]
        self._input_dtypes = {k: v.dtype for k, v in self._signature.structured_input_signature[1].items()}

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("model", "_signature", "_input_dtypes")}

    def save_artifacts(self, artifact_path: str) -> None:
        dst = os.path.join(artifact_path, "model")
        if os.path.exists(dst):
            shutil.rmtree(dst)
        shutil.copytree(self.path, dst)

    def load_artifacts(self, artifact_path: str) -> None:
        import tensorflow as tf

        if not artifact_path:
            return

        self._bind(tf.saved_model.load(os.path.join(artifact_path, "model")))

    def transform(self, col_selector, transformable):
        import tensorflow as tf
        from merlin.table import TensorTable

        if not isinstance(transformable, TensorTable):
            transformable = TensorTable.from_df(transformable)
        arrays = transformable.to_dict()
        inputs = {}
        for name, dtype in self._input_dtypes.items():
            if name not in arrays:
                raise KeyError(f"model input '{name}' not produced by the workflow")
            inputs[name] = tf.convert_to_tensor(np.asarray(arrays[name]), dtype=dtype)
        outputs = self._signature(**inputs)
        return type(transformable)({k: np.asarray(outputs[k].numpy()) for k in self.output_schema.column_names})


@dataclass
class ExportOutput:
    staged_repository: Path  # a complete Triton model repository holding only this version
    model_name: str
    version: int
    output_name: str
    parity_max_abs_diff: float

    @property
    def version_dir(self) -> Path:
        return self.staged_repository / self.model_name / str(self.version)

    @property
    def config_path(self) -> Path:
        return self.staged_repository / self.model_name / "config.pbtxt"


def build_ensemble(workflow, model_dir: Path, label: str):
    from merlin.systems.dag import Ensemble

    serving_wf = workflow.remove_inputs([label])
    graph = serving_wf.input_schema.column_names >> InProcessWorkflow(serving_wf) >> InProcessTensorflow(model_dir)
    return Ensemble(graph, serving_wf.input_schema)


def offline_scores(workflow, model_dir: Path, raw: pd.DataFrame, label: str, batch_size: int = 1024) -> np.ndarray:
    """The training-time path: NVTabular ``Workflow.transform`` of the raw rows as a Dataset, and the
    trained SavedModel's serving signature called on batches of the transformed rows (lists as
    values/offsets, as the Merlin loader and merlin-systems hand them to the model).

    The SavedModel object is used rather than ``tf.keras.models.load_model``: Keras' rebuild of
    Merlin's DCN-v2 from its config does not reproduce the trained model (differences ~1e-3,
    checked against the in-memory model), while the SavedModel's traced functions match it to
    ~1e-7. Batches are built with merlin's ``TensorTable`` rather than the Merlin ``Loader``:
    merlin-dataloader 23.08 fails on a batch in which every row holds an empty list.
    """
    from merlin.io import Dataset

    from pipeline_lib.retrieval import encode, load_encoder

    frame = raw.copy()
    if label not in frame.columns:
        frame[label] = 0  # the workflow's fitted graph includes the label column
    transformed = workflow.transform(Dataset(frame, cpu=True)).to_ddf().compute()
    if not len(transformed):
        return np.array([], dtype=np.float32)
    features = [c for c in transformed.columns if c != label]
    return encode(load_encoder(model_dir), transformed[features], batch_size=batch_size).reshape(-1)


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
    from merlin.table import TensorTable

    cols = ensemble.input_schema.column_names
    table = raw_to_tensor_table(raw[cols])
    out = ensemble.transform(table, runtime=Runtime())
    name = ensemble.output_schema.column_names[0]
    return np.asarray(out[name].values).reshape(-1)


def raw_to_tensor_table(raw: pd.DataFrame):
    """Raw rows -> TensorTable as Triton hands them to the executor: ragged lists, strings as bytes."""
    from merlin.table import TensorTable

    cols = {}
    for name in raw.columns:
        s = raw[name]
        if s.dtype == object and len(s) and isinstance(s.iloc[0], (list, tuple, np.ndarray)):
            lengths = s.map(len).to_numpy()
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            values = np.concatenate([np.asarray(v) for v in s]) if lengths.sum() else np.array([], dtype=np.int64)
            if values.dtype.kind in "OU":  # string lists travel as BYTES too
                values = np.array([v.encode("utf-8") if isinstance(v, str) else v for v in values], dtype=object)
            cols[name] = (values, offsets)
        elif s.dtype == object:
            # Triton delivers BYTES inputs as bytes objects: reproduce that here.
            cols[name] = np.array([v.encode("utf-8") if isinstance(v, str) else v for v in s], dtype=object)
        else:
            cols[name] = s.to_numpy()
    return TensorTable(cols)


def _check(name: str, got: np.ndarray, want: np.ndarray, atol: float) -> float:
    if got.shape != want.shape:
        raise ParityError(f"{name}: shape {got.shape} != offline {want.shape}")
    diff = float(np.max(np.abs(got - want))) if len(got) else 0.0
    if not diff <= atol:
        raise ParityError(f"{name}: max |ensemble - offline| = {diff:.3g} > {atol}")
    return diff


def export_ensemble(
    workflow_dir: Path,
    model_dir: Path,
    sample_raw: pd.DataFrame,
    label: str,
    staging_dir: Path,
    model_name: str,
    version: int,
    atol: float = 1e-5,
    run_info: dict | None = None,
    max_request_rows: int = 65536,
) -> ExportOutput:
    """Check parity in-process, export the ensemble as ``staging_dir/<model_name>/<version>``,
    load the exported copy back and check it again. Nothing touches the live repository."""
    import nvtabular as nvt

    workflow = nvt.Workflow.load(str(workflow_dir))
    ensemble = build_ensemble(workflow, model_dir, label)
    want = offline_scores(workflow, model_dir, sample_raw, label)
    diff_inproc = _check("in-process ensemble", ensemble_scores(ensemble, sample_raw), want, atol)

    if staging_dir.exists():
        shutil.rmtree(staging_dir)
    staging_dir.mkdir(parents=True)
    # merlin-systems 23.08 writes ensemble.pkl/model.py into version "1" whatever ``version`` says
    # (TritonExecutorRuntime._executor_model_export is called without it) while the op artifacts
    # go to ``<version>/``; so export as 1 and rename the folder.
    ensemble.export(str(staging_dir), name=model_name, version=1)
    if version != 1:
        os.rename(staging_dir / model_name / "1", staging_dir / model_name / str(version))
    _install_serving_model(staging_dir / model_name, version, max_request_rows)
    exported = load_version(staging_dir / model_name / str(version))
    diff_exported = _check("exported ensemble", ensemble_scores(exported, sample_raw), want, atol)
    out = ExportOutput(staging_dir, model_name, version, ensemble.output_schema.column_names[0],
                       max(diff_inproc, diff_exported))
    (out.version_dir / "run_info.json").write_text(
        json.dumps({**(run_info or {}), "parity_max_abs_diff": out.parity_max_abs_diff}, indent=2)
    )
    return out


def _install_serving_model(model_dir: Path, version: int, max_request_rows: int) -> None:
    """Swap merlin-systems' executor model.py for ours (request checks, one-line errors) and
    record the request-size limit as a model parameter in config.pbtxt."""
    import tritonclient.grpc.model_config_pb2 as mc
    from google.protobuf import text_format

    # serving_model.py imports triton_python_backend_utils, so it is copied, never imported here
    shutil.copyfile(Path(__file__).with_name("serving_model.py"), model_dir / str(version) / "model.py")
    cfg_path = model_dir / "config.pbtxt"
    cfg = text_format.Parse(cfg_path.read_text(), mc.ModelConfig())
    cfg.parameters["max_request_rows"].string_value = str(max_request_rows)
    cfg_path.write_text(text_format.MessageToString(cfg))
