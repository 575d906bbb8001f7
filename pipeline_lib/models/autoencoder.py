"""Mult-DAE and Mult-VAE (Liang et al., "Variational Autoencoders for Collaborative Filtering", WWW 2018):
``model.type: mult_dae | mult_vae``, deep retrieval models that score a user's whole history row, like EASE.

- input: the user's binary history row over the catalogue, L2-normalised (dropout ``model.autoencoder.dropout``
  on it while training);
- ``mult_dae``: one tanh hidden layer (``hidden_dim``), then a dense layer to the item logits;
- ``mult_vae``: the encoder's tanh hidden layer gives the mean and log-variance of a ``latent_dim`` Gaussian, the
  decoder (tanh ``hidden_dim``, then the item logits) reads a sample of it while training and its mean when
  scoring; the KL term's weight grows linearly by ``1 / anneal_steps`` per update up to ``beta_max``;
- loss: the multinomial log-likelihood (a softmax over every catalogue item) of the user's training items;
  Adam; after each epoch the model is scored per user on the validation split (the baselines' protocol, seen
  items excluded) and the best epoch is kept (``epochs``, ``early_stopping_patience``).

Trained with TensorFlow/Keras (imported on first use); the trained layers are kept as numpy arrays
(:class:`HistoryMLP`) and every score -- validation, test, export, the served version -- is their forward pass in
numpy, so the served model imports no TensorFlow. :mod:`pipeline_lib.models.classical` saves, loads and serves
them as it does EASE's weights (``history @ W`` there, ``HistoryMLP.scores(history)`` here).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import scipy.sparse as sp

log = logging.getLogger(__name__)

TYPES = ("mult_dae", "mult_vae")
MLP_FILE = "mlp.npz"


@dataclass(frozen=True)
class HistoryMLP:
    """Dense layers over the L2-normalised history row: ``tanh`` on every layer whose ``activations`` entry is
    ``"tanh"``, none on the others; the last layer's outputs are the item logits (float64 numpy)."""

    kernels: tuple[np.ndarray, ...]
    biases: tuple[np.ndarray, ...]
    activations: tuple[str, ...]

    @property
    def n_items(self) -> int:
        return int(self.kernels[0].shape[0])

    def scores(self, history: sp.spmatrix) -> np.ndarray:
        """Logits [users, catalogue]; a row without history scores zero everywhere (the popularity tie-break
        then ranks it: the most popular items, as for EASE and as the served version answers unknown users)."""
        x = sp.csr_matrix(history, dtype=np.float64)
        norms = np.sqrt(np.asarray(x.multiply(x).sum(axis=1))).ravel()
        h: Any = sp.diags(1.0 / np.where(norms > 0, norms, 1.0)) @ x
        for w, b, act in zip(self.kernels, self.biases, self.activations):
            h = np.asarray(h @ w) + b
            if act == "tanh":
                h = np.tanh(h)
        out = np.asarray(h, dtype=np.float64)
        out[norms == 0] = 0.0
        return out

    def aligned(self, pos: np.ndarray) -> "HistoryMLP":
        """The same model over the catalogue re-indexed by ``pos`` (input rows and output columns)."""
        kernels = (self.kernels[0][pos],) + self.kernels[1:-1] + (self.kernels[-1][:, pos],)
        biases = self.biases[:-1] + (self.biases[-1][pos],)
        return HistoryMLP(kernels, biases, self.activations)

    def save(self, path: Path) -> Path:
        """``path`` (npz); arrays that float32 holds exactly (Keras' weights) are stored as float32: half the size,
        the same scores."""
        arrays = {f"kernel_{i}": _compact(w) for i, w in enumerate(self.kernels)}
        arrays.update({f"bias_{i}": _compact(b) for i, b in enumerate(self.biases)})
        np.savez(path, activations=np.asarray(self.activations), **arrays)
        return path

    @classmethod
    def load(cls, path: Path) -> "HistoryMLP":
        z = np.load(path)
        acts = tuple(str(a) for a in z["activations"])
        n = len(acts)
        return cls(tuple(z[f"kernel_{i}"].astype(np.float64) for i in range(n)),
                   tuple(z[f"bias_{i}"].astype(np.float64) for i in range(n)), acts)


def _compact(a: np.ndarray) -> np.ndarray:
    small = a.astype(np.float32)
    return small if np.array_equal(small, a) else a


class _Layers:
    """The Keras layers of one model type (encoder, optional Gaussian head, decoder) and its forward pass."""

    def __init__(self, tf: Any, model_type: str, n_items: int, cfg: Any, seed: int):
        dense = tf.keras.layers.Dense
        init = tf.keras.initializers.GlorotUniform
        reg = tf.keras.regularizers.L2(cfg.l2) if cfg.l2 > 0 else None
        self.tf, self.vae, self.dropout = tf, model_type == "mult_vae", cfg.dropout
        self.encoder = dense(cfg.hidden_dim, activation="tanh", kernel_initializer=init(seed), kernel_regularizer=reg)
        latent = [dense(cfg.latent_dim, kernel_initializer=init(seed + i), kernel_regularizer=reg) for i in (1, 2)]
        self.mu: Any = latent[0] if self.vae else None
        self.logvar: Any = latent[1] if self.vae else None
        self.decoder = [dense(cfg.hidden_dim, activation="tanh", kernel_initializer=init(seed + 3),
                              kernel_regularizer=reg)] if self.vae else []
        self.out = dense(n_items, kernel_initializer=init(seed + 4), kernel_regularizer=reg)
        self.seed = seed

    @property
    def layers(self) -> list:
        return [x for x in [self.encoder, self.mu, self.logvar, *self.decoder, self.out] if x is not None]

    def __call__(self, x, training: bool):
        """Item logits and the batch's mean KL divergence (0 for the DAE) of dense binary rows ``x``."""
        tf = self.tf
        h = tf.math.l2_normalize(x, axis=1)
        if training and self.dropout > 0:
            h = tf.nn.dropout(h, rate=self.dropout)
        h = self.encoder(h)
        kl = tf.constant(0.0)
        if self.vae:
            mu, logvar = self.mu(h), self.logvar(h)
            kl = tf.reduce_mean(tf.reduce_sum(0.5 * (tf.exp(logvar) + tf.square(mu) - 1.0 - logvar), axis=1))
            h = mu + tf.exp(0.5 * logvar) * tf.random.normal(tf.shape(mu)) if training else mu
            for layer in self.decoder:
                h = layer(h)
        return self.out(h), kl

    def numpy(self) -> HistoryMLP:
        """The scoring path (the VAE's mean, no dropout) as numpy arrays."""
        chain = [self.encoder, self.mu, *self.decoder, self.out] if self.vae else [self.encoder, self.out]
        acts = ["tanh", "linear", "tanh", "linear"] if self.vae else ["tanh", "linear"]
        return HistoryMLP(tuple(np.asarray(l.kernel.numpy(), np.float64) for l in chain),
                          tuple(np.asarray(l.bias.numpy(), np.float64) for l in chain), tuple(acts))


def fit(x: sp.csr_matrix, model_type: str, cfg: Any, seed: int,
        validate: Callable[[HistoryMLP], float]) -> tuple[HistoryMLP, dict, dict]:
    """Train ``model_type`` on the binary user x item rows ``x`` (``cfg``: ``AutoencoderConfig``); after every epoch
    ``validate`` scores the numpy model (higher is better) and the best epoch's model is returned, with the
    per-epoch history (``loss``, ``kl``, ``beta``, ``val_recall``) and a summary (``best_epoch``, ``epochs_run``)."""
    if model_type not in TYPES:
        raise ValueError(f"'{model_type}' is not an autoencoder model ({', '.join(TYPES)})")
    from pipeline_lib.models.common import import_tf

    tf = import_tf()
    tf.random.set_seed(seed)
    rng = np.random.default_rng(seed)
    x = sp.csr_matrix(x, dtype=np.float32)
    x = x[np.asarray(x.sum(axis=1)).ravel() > 0]
    net = _Layers(tf, model_type, x.shape[1], cfg, seed)
    opt = tf.keras.optimizers.Adam(learning_rate=cfg.learning_rate)
    net(tf.zeros((1, x.shape[1])), training=False)  # build the layers
    variables = [v for layer in net.layers for v in layer.trainable_variables]

    @tf.function
    def step(batch, beta):
        with tf.GradientTape() as tape:
            logits, kl = net(batch, training=True)
            nll = -tf.reduce_mean(tf.reduce_sum(tf.nn.log_softmax(logits) * batch, axis=1))
            reg = tf.add_n([l for layer in net.layers for l in layer.losses]) if cfg.l2 > 0 else 0.0
            loss = nll + beta * kl + reg
        opt.apply_gradients(zip(tape.gradient(loss, variables), variables))
        return nll, kl

    history: dict[str, list] = {"loss": [], "kl": [], "beta": [], "val_recall": []}
    best_score, best, best_epoch, updates, t0 = -np.inf, None, 0, 0, time.perf_counter()
    for epoch in range(1, cfg.epochs + 1):
        order = rng.permutation(x.shape[0])
        losses, kls = [], []
        for start in range(0, len(order), cfg.batch_size):
            beta = min(cfg.beta_max, updates / cfg.anneal_steps) if net.vae else 0.0
            nll, kl = step(tf.constant(x[order[start:start + cfg.batch_size]].toarray()), tf.constant(beta, tf.float32))
            losses.append(float(nll))
            kls.append(float(kl))
            updates += 1
        model = net.numpy()
        score = float(validate(model))
        history["loss"].append(float(np.mean(losses)))
        history["kl"].append(float(np.mean(kls)))
        history["beta"].append(float(beta))
        history["val_recall"].append(score)
        if score > best_score:
            best_score, best, best_epoch = score, model, epoch
        elif cfg.early_stopping_patience and epoch - best_epoch >= cfg.early_stopping_patience:
            break
    if best is None:  # every epoch scored NaN
        raise ValueError(f"{model_type}: no epoch had a validation score (is the validation split empty?)")
    log.info("%s: best validation %.4f at epoch %d of %d (%.1f s)", model_type, best_score, best_epoch, epoch,
             time.perf_counter() - t0)
    return best, history, {"best_epoch": best_epoch, "epochs_run": epoch, "best_val_recall": best_score}
