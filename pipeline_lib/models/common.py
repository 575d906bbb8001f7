"""What the three model families (ranking, retrieval, session) share: the train stage's output,
the lazy TensorFlow import, the Keras optimiser by name, the Merlin dataset of a transformed
split, the learning-curve plot and a model's first output.

TensorFlow, Merlin and matplotlib are imported on first use, so importing a model module stays cheap.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

@dataclass
class TrainOutput:
    """A trained model of any family: its SavedModel folder, validation metrics, per-epoch history
    and the metrics.json that holds both."""

    model_dir: Path
    metrics: dict
    history: dict = field(default_factory=dict)
    metrics_path: Optional[Path] = None


def import_tf():
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
