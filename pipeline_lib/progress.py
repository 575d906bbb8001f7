"""One log line per training epoch, for every model of the pipeline.

Keras' own progress bars stay off (``verbose=0``): they redraw with carriage returns and flood
Prefect's task logs. Instead each epoch ends with one line on the ``pipeline_lib`` logger, which
the console and the Prefect UI both show::

    epoch 2/5: loss 0.5123, auc 0.7012; validation: loss 0.5301, auc 0.7512 (12.3 s)
"""
from __future__ import annotations

import logging
import time
from typing import Mapping, Optional

from pipeline_lib.report import num

log = logging.getLogger("pipeline_lib.models.ranking")

# Merlin Models adds bookkeeping entries to the Keras logs that mean nothing to a reader; with one
# target per row MAP@k equals MRR@k and precision@k is recall@k / k.
_HIDDEN = ("regularization_loss", "loss_batch", "map_at_", "precision_at_")


def epoch_line(epoch: int, epochs: int, logs: Mapping[str, float], seconds: Optional[float] = None) -> str:
    """``epoch`` counts from 1. Train figures first, then the ``val_*`` ones, 4 significant digits."""
    def shown(items):
        return ", ".join(f"{k.replace('_at_', '@')} {num(v)}" for k, v in items if not any(h in k for h in _HIDDEN))

    train = shown((k, v) for k, v in logs.items() if not k.startswith("val_"))
    valid = shown((k[4:], v) for k, v in logs.items() if k.startswith("val_"))
    line = f"epoch {epoch}/{epochs}: {train or '-'}"
    if valid:
        line += f"; validation: {valid}"
    if seconds is not None:
        line += f" ({seconds:.1f} s)"
    return line


_CALLBACK = None


def epoch_logger(epochs: int, logger: logging.Logger = log):
    """A Keras callback that logs :func:`epoch_line` after every epoch (TensorFlow imported lazily)."""
    global _CALLBACK
    if _CALLBACK is None:
        import tensorflow as tf

        class EpochLogger(tf.keras.callbacks.Callback):
            def __init__(self, epochs: int, logger: logging.Logger):
                super().__init__()
                self.epochs, self.logger = epochs, logger
                self._t0: Optional[float] = None

            def on_epoch_begin(self, epoch, logs=None):
                self._t0 = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                took = time.perf_counter() - self._t0 if self._t0 is not None else None
                self.logger.info(epoch_line(epoch + 1, self.epochs, logs or {}, took))

        _CALLBACK = EpochLogger
    return _CALLBACK(epochs, logger)
