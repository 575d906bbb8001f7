"""What the three model families (ranking, retrieval, session) share: the train stage's output,
the lazy TensorFlow import, the Keras optimiser by name, the Merlin dataset of a transformed
split, the learning-curve plot, a model's first output, the trace-less SavedModel save and the load and
call of its serving signature.

TensorFlow, Merlin and matplotlib are imported on first use, so importing a model module stays cheap.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

@dataclass
class TrainOutput:
    """A trained model of any family: its SavedModel folder, validation metrics, per-epoch history
    and the metrics.json that holds both."""

    model_dir: Path
    metrics: dict
    history: dict = field(default_factory=dict)
    metrics_path: Optional[Path] = None


def import_tf() -> Any:
    """The ``tensorflow`` module, imported on first use with its C++ INFO/WARNING logs off."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow

    return tensorflow


def optimizer(name: str, learning_rate: float):
    """A Keras optimiser by ``model.optimizer`` name (``adam``, ``adagrad`` or ``sgd``)."""
    keras = import_tf().keras.optimizers
    return {"adam": keras.Adam, "adagrad": keras.Adagrad, "sgd": keras.SGD}[name](learning_rate=learning_rate)


def parquet_dataset(path: Path):
    """The Merlin ``Dataset`` of a transformed split (parquet + schema.pbtxt)."""
    from merlin.io import Dataset

    return Dataset(str(path), engine="parquet")


def first_output(pred) -> np.ndarray:
    """A model call's output as float32 numpy: the first value of a dict of outputs, or the tensor."""
    return np.asarray(next(iter(pred.values())) if isinstance(pred, dict) else pred, dtype=np.float32)


def save_model(model, model_dir: Path) -> Path:
    """A Merlin model (or encoder) as a SavedModel whose ``serving_default`` signature is the model's call,
    plus Merlin's schema files (``.merlin/``), as ``merlin.models.tf.Model.save`` writes them -- but without
    Keras' per-layer traces. Tracing every layer took more than half of a small ranking training (6-15 s CPU)
    and made every load ~4x slower, and nothing uses them: export, serving, the gate and the offline scores
    call the serving signature (same scores, checked in tests/unit/models/test_ranking.py, test_retrieval.py
    and test_session.py). ``tf.saved_model.load`` gives no ``__call__`` or ``.variables`` (docs/models.md);
    ``tf.keras.models.load_model`` still loads it, rebuilding the layers from their configs."""
    from keras.saving.legacy.saving_utils import trace_model_call
    from merlin.models.io import save_merlin_metadata
    from tensorflow.python.saved_model.signature_serialization import DEFAULT_SIGNATURE_ATTR

    call = trace_model_call(model)
    # the root's default signature, as Keras' traced save also keeps it: a tf.saved_model.save of the loaded
    # object (merlin-systems' PredictTensorflow does one to read the signature) writes serving_default again
    setattr(model, DEFAULT_SIGNATURE_ATTR, call)
    import_tf().keras.Model.save(model, str(model_dir), save_format="tf", save_traces=False, signatures=call)
    save_merlin_metadata(model_dir, model.schema, _output_schema(call.structured_outputs))
    return model_dir


Encoder = Callable[[dict], np.ndarray]  # model input arrays (lists as values/offsets) -> first output, float32


def load_encoder(path: str | os.PathLike):
    """A SavedModel's serving signature and its input dtypes."""
    tf = import_tf()
    model = tf.saved_model.load(str(path))
    fn = model.signatures["serving_default"]
    dtypes = {k: v.dtype for k, v in fn.structured_input_signature[1].items()}
    return model, fn, dtypes


def signature_encoder(bound) -> Encoder:
    """The :data:`Encoder` of a loaded SavedModel (:func:`load_encoder`'s triple): its serving signature."""
    return lambda arrays: call_signature(bound, arrays)


def call_signature(bound, arrays: dict) -> np.ndarray:
    """One call of a SavedModel's serving signature on model input tensors (numpy; lists as
    ``name__values``/``name__offsets``); returns its (first) output as float32."""
    tf = import_tf()
    _, fn, dtypes = bound
    inputs = {}
    for name, dtype in dtypes.items():
        if name not in arrays:
            raise KeyError(f"model input '{name}' not produced by the workflow")
        inputs[name] = tf.convert_to_tensor(np.asarray(arrays[name]), dtype=dtype)
    res = fn(**inputs)
    res = next(iter(res.values())) if isinstance(res, dict) else res
    return np.asarray(res.numpy(), dtype=np.float32)


def _output_schema(outputs: dict):
    """Merlin's output schema of a model's outputs (name -> tensor), as ``Model.save`` records it."""
    from merlin.schema import ColumnSchema, Schema

    cols = []
    for name, out in outputs.items():
        wide = out.shape.rank > 1 and (out.shape[1] or 1) > 1
        cols.append(ColumnSchema(name, dtype=out.dtype.as_numpy_dtype, dims=(None, out.shape[1]) if wide else None))
    return Schema(cols)


def save_metrics(out_dir: Path, metrics: dict, history: dict) -> Path:
    """``out_dir/metrics.json``: the validation metrics and the per-epoch history."""
    path = out_dir / "metrics.json"
    path.write_text(json.dumps({"metrics": metrics, "history": history}, indent=2))
    return path


def plot_learning_curve(history: dict, path: Path, title: str = "", keys: tuple[str, ...] = ("loss", "auc"),
                        references: dict[str, dict[str, float]] | None = None) -> Path:
    """Loss and a metric per epoch, train vs validation, as a PNG. ``references``: ``{key:
    {label: value}}`` drawn as horizontal lines on the panel of ``key`` (the baselines)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.5), squeeze=False)
    for ax, key in zip(axes[0], keys):
        for prefix, style in (("", "-o"), ("val_", "--s")):
            values = history.get(prefix + key)
            if values:
                ax.plot(range(1, len(values) + 1), values, style, label=(prefix or "train_") + key)
        for i, (label, value) in enumerate((references or {}).get(key, {}).items()):
            ax.axhline(value, color=f"C{i + 2}", linestyle=":", linewidth=1.5, label=f"{label} {value:.4f}")
        ax.set_xlabel("epoch")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(key)
        ax.legend(fontsize="small")
        ax.grid(alpha=0.3)
    fig.suptitle(title)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path
