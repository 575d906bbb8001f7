"""Session-based next-item model (Merlin Models, TensorFlow), its evaluation and two baselines.

The model is ``mm.Model(InputBlockV2 -> SessionEncoder -> CategoricalOutput(item_id))``:

- inputs: Merlin ``Embeddings`` of the categorical sequences (``sequence_combiner=None``, so
  one vector per event) and the time-delta sequence, concatenated per event;
- ``SessionEncoder`` (``session.model.type``): ``gru`` -- stacked Keras GRUs over the ragged
  sequence; ``transformer`` -- causal self-attention blocks (Keras ``MultiHeadAttention`` with a
  causal + padding mask, learned positions, GPT-style pre-norm). Merlin's own
  ``mm.GPT2Block``/``XLNetBlock`` wrap HuggingFace ``transformers``, which this environment does
  not install (it is not in the lock file), so the transformer is built from Keras layers;
- trained with ``mm.SequencePredictNext`` (targets = the sequence shifted by one, every position
  predicts the next item; causal encoders see only the past). At inference (and evaluation) the
  encoder returns the state of the *last* event: the logits over the item vocabulary are the
  next-item scores of the session so far;
- the output bias starts at the log training frequency of each item (``popularity_prior``): the
  untrained model ranks like the most-popular baseline and training fits what the session adds.
  Without it the first epochs only learn popularity, and on a log with little sequential signal
  the model then memorises the training sessions before it ever beats popularity;
- early stopping (``early_stopping_on``, ``early_stopping_patience``): the Recall@k of the validation
  sessions (default; or, ``train_share``, of a ``validation_fraction`` share of the training sessions
  kept out of the fit) is measured after each epoch (``val_recall`` in the history) and the best
  epoch's weights are kept. The test split is never seen.

Evaluation: every held-out session minus its last event goes through the fitted feature workflow
and the trained model (in memory; its SavedModel's serving signature gives the same scores, the
offline path that serving must reproduce: :func:`offline_scores`); the last item is the
target; Recall@k, NDCG@k and MRR@k come from Merlin's ``mm.RecallAt``/``mm.NDCGAt``/``mm.MRRAt``.
The same metrics score two baselines on the same held-out prefixes: most-popular items (train
frequency) and item-to-item transitions (next-item counts after the prefix's last item in train
sessions, popularity as the fallback). With ``session.exclude_seen`` (default on) the prefix's own
items are masked for the model and both baselines alike (:func:`exclusions`, :func:`mask_scores`).
The classical session models (``session_knn``, ``sequential_rules``: :mod:`.session_classical`) are
scored beside them as baselines, and ``session.model.type`` set to one of them trains that instead.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import pandas as pd

from pipeline_lib.config import SessionColumns, SessionModelConfig
from pipeline_lib.etl.sessions import item_vocabulary, prefixes
from pipeline_lib.etl.workflow import load_workflow
from pipeline_lib.models.baselines import mask_rows
from pipeline_lib.models.common import (TrainOutput, first_output, import_tf, load_encoder, plot_learning_curve,
                                        save_metrics, save_model, signature_encoder)
from pipeline_lib.progress import epoch_logger

log = logging.getLogger(__name__)

CLASSICAL_BASELINES = ("session_knn", "sequential_rules")  # session_classical.TYPES, scored beside a deep model
N_SPECIAL = 3  # Categorify: 0 padding, 1 null, 2 out-of-vocabulary; never recommended
MASKED = -1e9


_ENCODER = None


def _encoder_class():
    """The Keras layer class, defined once on first use (TensorFlow is imported lazily)."""
    global _ENCODER
    if _ENCODER is None:
        _ENCODER = _define_encoder()
    return _ENCODER


def _define_encoder():
    tf = import_tf()

    @tf.keras.utils.register_keras_serializable(package="recsys_pipeline")
    class SessionEncoder(tf.keras.layers.Layer):  # type: ignore[name-defined]  # TensorFlow is imported lazily
        """Ragged [batch, events, features] -> per-event states (training) or last-event state."""

        def __init__(self, kind="gru", hidden_dim=64, num_layers=1, num_heads=2, dropout=0.1, max_length=20, **kwargs):
            super().__init__(**kwargs)
            self.kind, self.hidden_dim, self.num_layers = kind, hidden_dim, num_layers
            self.num_heads, self.dropout, self.max_length = num_heads, dropout, max_length
            self.supports_masking = True
            self.project = tf.keras.layers.Dense(hidden_dim)
            self.drop = tf.keras.layers.Dropout(dropout)
            if kind == "gru":
                self.rnns = [tf.keras.layers.GRU(hidden_dim, return_sequences=True) for _ in range(num_layers)]
            else:
                self.positions = tf.keras.layers.Embedding(max_length, hidden_dim)
                self.attn = [tf.keras.layers.MultiHeadAttention(num_heads, hidden_dim // num_heads, dropout=dropout)
                             for _ in range(num_layers)]
                self.norm1 = [tf.keras.layers.LayerNormalization() for _ in range(num_layers)]
                self.norm2 = [tf.keras.layers.LayerNormalization() for _ in range(num_layers)]
                self.ffn = [tf.keras.Sequential([tf.keras.layers.Dense(2 * hidden_dim, activation="gelu"),
                                                 tf.keras.layers.Dense(hidden_dim)]) for _ in range(num_layers)]
                self.final_norm = tf.keras.layers.LayerNormalization()

        def call(self, inputs, training=False, mask=None):
            x = inputs if isinstance(inputs, tf.RaggedTensor) else tf.RaggedTensor.from_tensor(inputs)
            lengths = x.row_lengths()
            h = x.with_flat_values(self.drop(self.project(x.flat_values), training=training))
            if self.kind == "gru":
                for rnn in self.rnns:
                    h = rnn(h, training=training)
                # GRU4Rec's hidden-state dropout (the transformer drops inside its blocks)
                h = h.with_flat_values(self.drop(h.flat_values, training=training))
            else:
                h = _causal_attention(self, h, lengths, training)
            if training:
                return h  # every position predicts the next item (SequencePredictNext)
            last = h.row_limits() - 1
            return tf.gather(h.flat_values, last)

        def compute_mask(self, inputs, mask=None):
            return mask

        def get_config(self):
            return {**super().get_config(), "kind": self.kind, "hidden_dim": self.hidden_dim,
                    "num_layers": self.num_layers, "num_heads": self.num_heads, "dropout": self.dropout,
                    "max_length": self.max_length}

    return SessionEncoder


def _causal_attention(layer, h, lengths, training):
    """The transformer encoder's blocks over ragged per-event states ``h``: learned positions, causal +
    padding mask, pre-norm self-attention and feed-forward with residuals, a final norm."""
    tf = import_tf()
    dense = h.to_tensor()  # [B, T, d], zero padded at the end
    T = tf.shape(dense)[1]
    dense = dense + layer.positions(tf.range(T))[tf.newaxis]
    pad = tf.sequence_mask(lengths, T)  # [B, T]
    attn_mask = tf.logical_and(pad[:, tf.newaxis, :], pad[:, :, tf.newaxis])
    causal = tf.linalg.band_part(tf.ones((T, T), tf.bool), -1, 0)
    attn_mask = tf.logical_and(attn_mask, causal[tf.newaxis])
    for attn, n1, n2, ffn in zip(layer.attn, layer.norm1, layer.norm2, layer.ffn):
        a = n1(dense)
        dense = dense + layer.drop(attn(a, a, attention_mask=attn_mask, training=training), training=training)
        dense = dense + layer.drop(ffn(n2(dense)), training=training)
    return tf.RaggedTensor.from_tensor(layer.final_norm(dense), lengths=lengths)


def item_column(schema, cols: SessionColumns):
    return schema[cols.item_id]


def build_session_model(schema, cfg: SessionModelConfig, cols: SessionColumns, max_length: int, tie=None):
    """``tie`` (default ``cfg.tie_weights``): the output layer scores items with the input item-id
    embedding table (plus a per-item bias), the session state projected to ``embedding_dim``."""
    import merlin.models.tf as mm
    from merlin.models.tf.outputs.classification import EmbeddingTablePrediction
    from merlin.schema import Tags

    tf = import_tf()
    tie = cfg.tie_weights if tie is None else tie
    seq = schema.select_by_tag(Tags.SEQUENCE)
    cats = seq.select_by_tag(Tags.CATEGORICAL)
    dims = {c: (cfg.embedding_dim if c == cols.item_id else max(4, cfg.embedding_dim // 4)) for c in cats.column_names}
    embeddings = mm.Embeddings(cats, dim=dims, sequence_combiner=None)
    input_block = mm.InputBlockV2(seq, categorical=embeddings)
    encoder = _encoder_class()(cfg.type, cfg.hidden_dim, cfg.num_layers, cfg.num_heads, cfg.dropout, max_length,
                               name="session_encoder")
    if not tie:
        return mm.Model(input_block, encoder, mm.CategoricalOutput(item_column(schema, cols)))
    project = tf.keras.layers.Dense(cfg.embedding_dim, name="to_item_space")
    table = EmbeddingTablePrediction(embeddings[cols.item_id], use_bias=True)
    return mm.Model(input_block, encoder, project, mm.CategoricalOutput(to_call=table, target_name=cols.item_id))


def train_session_model(train_dir: Path, cfg: SessionModelConfig, cols: SessionColumns, max_length: int, seed: int,
                        out_dir: Path, k: int = 10, valid_dir: Optional[Path] = None):
    """Fit with ``mm.SequencePredictNext`` and save the SavedModel (without Keras' layer traces:
    ``common.save_model``); returns (model, model_dir, history).
    The epoch is picked (:func:`early_stopping`) on the transformed validation sessions in ``valid_dir``
    (``cfg.early_stopping_on: validation``, every training session fits) or, with ``train_share`` (or
    no ``valid_dir``), on a ``cfg.validation_fraction`` share of the training sessions held out of the fit.
    Never on the test split: this function is not given it."""
    tf = import_tf()
    import merlin.models.tf as mm
    from merlin.io import Dataset
    from merlin.schema import Tags

    tf.keras.utils.set_random_seed(seed)
    ds = Dataset(str(train_dir), engine="parquet")
    schema = ds.schema.select_by_tag(Tags.SEQUENCE)
    n_items = int(schema[cols.item_id].int_domain.max) + 1
    frame = pd.read_parquet(sorted(Path(train_dir).glob("*.parquet"))[0])
    on_valid = cfg.early_stopping_on == "validation" and valid_dir is not None
    stop = np.random.default_rng(seed).random(len(frame)) < (0.0 if on_valid else cfg.validation_fraction)
    fit_ds = Dataset(frame.loc[~stop].reset_index(drop=True), schema=ds.schema, cpu=True) if stop.any() else ds
    held_out = (pd.read_parquet(sorted(Path(valid_dir).glob("*.parquet"))[0]) if on_valid and valid_dir is not None
                else frame.loc[stop])
    model = build_session_model(schema, cfg, cols, max_length)
    model.compile(optimizer=tf.keras.optimizers.Adam(learning_rate=cfg.learning_rate), run_eagerly=False)
    loader = mm.Loader(fit_ds, batch_size=cfg.batch_size, shuffle=True, schema=schema)
    if cfg.popularity_prior:
        init_output_bias(model, loader, frame.loc[~stop, cols.item_id], n_items)
    callbacks = [epoch_logger(cfg.epochs, log)]
    if len(held_out):
        callbacks.insert(0, early_stopping(held_out, ds.schema, cols.item_id, k, cfg.early_stopping_patience))
    log.info("training session_%s: up to %d epochs over %d sessions (batch %d)", cfg.type, cfg.epochs,
             int((~stop).sum()), cfg.batch_size)
    hist = model.fit(loader, epochs=cfg.epochs, verbose=0, callbacks=callbacks,
                     pre=mm.SequencePredictNext(schema=schema, target=cols.item_id))
    history = {key: [float(x) for x in v] for key, v in hist.history.items()}
    if len(held_out):
        history["best_epoch"] = callbacks[0].best_epoch
    out_dir.mkdir(parents=True, exist_ok=True)
    return model, save_model(model, out_dir / "model"), history


def early_stopping(sessions: pd.DataFrame, schema, item_col: str, k: int, patience: int):
    """A Keras callback: after every epoch, Recall@k of the model on ``sessions`` (transformed training
    sessions kept out of the fit: prefix in, last item as target, the prefix's items excluded); logs it
    as ``val_recall``, stops after ``patience`` epochs without improvement and restores the best weights."""
    tf = import_tf()
    import merlin.models.tf as mm
    from merlin.io import Dataset

    prefix = sessions.reset_index(drop=True).copy()
    targets = prefix[item_col].map(lambda v: int(v[-1])).to_numpy()
    for c in prefix.columns:
        if prefix[c].map(lambda v: hasattr(v, "__len__")).all():
            prefix[c] = prefix[c].map(lambda v: list(v)[:-1])
    excl = [np.asarray(v, dtype=np.int64) for v in prefix[item_col]]

    class EarlyStopping(tf.keras.callbacks.Callback):  # type: ignore[name-defined]  # TensorFlow is imported lazily
        def __init__(self):
            super().__init__()
            self.best, self.best_epoch, self.best_weights, self.wait = -1.0, 0, None, 0

        def on_epoch_end(self, epoch, logs=None):
            out = []
            for x, _ in mm.Loader(Dataset(prefix, schema=schema, cpu=True), batch_size=1024, shuffle=False):
                out.append(first_output(self.model(x)))
            recall = topk_metrics(mask_scores(np.concatenate(out), excl), targets, k)[f"recall@{k}"]
            if logs is not None:
                logs["val_recall"] = recall
            if recall > self.best:
                self.best, self.best_epoch, self.best_weights, self.wait = recall, epoch + 1, self.model.get_weights(), 0
            else:
                self.wait += 1
                self.model.stop_training = self.wait >= patience > 0

        def on_train_end(self, logs=None):
            if self.best_weights is not None:
                self.model.set_weights(self.best_weights)

    return EarlyStopping()


def init_output_bias(model, loader, train_lists: pd.Series, n_items: int) -> None:
    """Start the output layer's per-item bias at the log training frequency of each item (add-one),
    so the untrained model already ranks like the most-popular baseline and training fits what the
    session adds to it (with a zero bias, the first epochs are spent learning popularity)."""
    inputs, _ = next(iter(loader))
    model(inputs)  # builds every layer
    biases = [v for v in model.trainable_variables if "bias" in v.name and tuple(v.shape) == (n_items,)]
    if not biases:
        log.warning("no output bias of %d items found: the popularity prior is not applied", n_items)
        return
    bias = biases[-1]
    counts = popularity_scores(train_lists, n_items).astype(np.float64) + 1.0
    bias.assign(np.log(counts / counts.sum()).astype(np.float32))


# --- scoring: the offline path that serving reproduces ----------------------------------------------


def raw_to_transformed(workflow, raw: pd.DataFrame) -> pd.DataFrame:
    """Raw session lists -> the feature workflow's output (NVTabular ``Workflow.transform`` on a Dataset)."""
    from merlin.io import Dataset

    return workflow.transform(Dataset(raw.reset_index(drop=True), cpu=True)).to_ddf().compute().reset_index(drop=True)


def offline_scores(workflow, model_dir: Path | None, raw: pd.DataFrame, batch_size: int = 512,
                   model=None) -> np.ndarray:
    """Next-item scores [sessions, vocabulary] for raw sessions so far: workflow + Merlin Loader + the
    SavedModel's serving signature; ``model``: what to call on the Loader's input batches instead (the
    in-memory Keras model, or an already loaded SavedModel's ``common.signature_encoder``)."""
    import merlin.models.tf as mm
    from merlin.io import Dataset

    transformed = raw_to_transformed(workflow, raw)
    model = model or signature_encoder(load_encoder(model_dir))  # type: ignore[arg-type]
    ds = Dataset(transformed, schema=workflow.output_schema, cpu=True)
    out = []
    for inputs, _ in mm.Loader(ds, batch_size=batch_size, shuffle=False):
        out.append(first_output(model(inputs)))
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def mask_scores(scores: np.ndarray, exclude: list[np.ndarray] | None, value: float = MASKED) -> np.ndarray:
    """A copy of ``scores`` with the special slots and each row's excluded indices set to ``value``."""
    s = np.array(scores, dtype=np.float32, copy=True)
    s[:, :N_SPECIAL] = value
    return mask_rows(s, exclude, value)


def vocabulary_lookup(vocabulary: np.ndarray) -> pd.Index:
    """Raw item id -> encoded index (position in the Index + ``N_SPECIAL``), from the decoded vocabulary."""
    return pd.Index(np.asarray(vocabulary, dtype=object)[N_SPECIAL:], dtype=object)


def exclusions(lookup: pd.Index, seen: list | None, extra: list | None, rows: int) -> list[np.ndarray] | None:
    """Per row, the encoded items never to return: the session's own raw item ids so far (``seen``,
    when ``session.exclude_seen``) and the request's ``exclude_item_ids`` (``extra``). Unknown ids
    (not in the training vocabulary) are ignored. None when nothing is excluded."""
    out, found = [], False
    for i in range(rows):
        ids = [v for part in (seen, extra) if part is not None for v in _as_list(part[i])]
        if not ids:
            out.append(np.zeros(0, dtype=np.int64))
            continue
        raw = np.array([v.decode("utf-8") if isinstance(v, bytes) else v for v in ids], dtype=object)
        pos = lookup.get_indexer(raw)
        out.append(np.unique(pos[pos >= 0]).astype(np.int64) + N_SPECIAL)
        found = found or len(out[-1]) > 0
    return out if found else None


def _as_list(v) -> list:
    if v is None or (isinstance(v, float) and np.isnan(v)):
        return []
    return list(v)


# --- metrics (Merlin's) and baselines ----------------------------------------------------------------


def topk_metrics(scores: np.ndarray, targets: np.ndarray, k: int, batch: int = 2048, mask_special: bool = True) -> dict:
    """Recall@k, NDCG@k, MRR@k of score rows against one target index each (mm.RecallAt/NDCGAt/MRRAt).
    Ties are broken at random (Merlin's ``extract_topk``, seeded)."""
    tf = import_tf()
    import merlin.models.tf as mm

    metrics = {f"recall@{k}": mm.RecallAt(k, seed=0), f"ndcg@{k}": mm.NDCGAt(k, seed=0), f"mrr@{k}": mm.MRRAt(k, seed=0)}
    s = np.array(scores, dtype=np.float32, copy=True)
    if mask_special:
        s[:, :N_SPECIAL] = MASKED
    n_items = s.shape[1]
    for i in range(0, len(s), batch):
        t = np.asarray(targets[i:i + batch], dtype=np.int64)
        y_true = tf.one_hot(np.clip(t, 0, n_items - 1), n_items) * tf.cast((t < n_items)[:, None], tf.float32)
        y_pred = tf.constant(s[i:i + batch])
        for m in metrics.values():
            m.update_state(y_true, y_pred)
    return {name: float(m.result().numpy()) for name, m in metrics.items()}


def metrics_from_topk(ids: np.ndarray, scores: Optional[np.ndarray], targets: np.ndarray, k: int) -> dict:
    """Recall/NDCG/MRR@k of top-k lists (item ids or catalogue rows) against one target each, with Merlin's
    metrics: the k listed items plus one 'everything else' column (where a missed target goes) form the
    score rows. The gate's figures of a version, and the classical session models' own."""

    n = len(ids)
    hit = ids == np.asarray(targets).reshape(-1, 1)
    rank = np.where(hit.any(axis=1), hit.argmax(axis=1), k)
    s = np.concatenate([np.tile(np.arange(k, 0, -1, dtype=np.float32), (n, 1)), np.zeros((n, 1), np.float32)], axis=1)
    return topk_metrics(s, rank, k, mask_special=False)


def popularity_scores(train_lists: pd.Series, n_items: int) -> np.ndarray:
    """Train frequency of every (encoded) item."""
    counts = np.bincount(np.concatenate(train_lists.map(np.asarray).to_numpy()), minlength=n_items)[:n_items]
    return counts.astype(np.float32)


def transition_counts(train_lists: pd.Series, n_items: int) -> np.ndarray:
    """counts[a, b] = how often b directly followed a in the training sessions."""
    counts = np.zeros((n_items, n_items), dtype=np.float32)
    for seq in train_lists:
        a = np.asarray(seq)
        if len(a) > 1:
            np.add.at(counts, (a[:-1], a[1:]), 1.0)
    return counts


def baseline_scores(train_lists: pd.Series, last_items: np.ndarray, n_items: int) -> dict[str, np.ndarray]:
    pop = popularity_scores(train_lists, n_items)
    pop_norm = pop / max(pop.max(), 1.0)
    trans = transition_counts(train_lists, n_items)
    # co-occurrence: transition counts from the last item, popularity breaks ties / fills empty rows
    cooc = trans[np.clip(last_items, 0, n_items - 1)] + 1e-3 * pop_norm[None, :]
    return {"most_popular": np.tile(pop, (len(last_items), 1)), "cooccurrence": cooc}


def evaluate(workflow, model, valid_sessions: pd.DataFrame, train_transformed: pd.DataFrame,
             cols: SessionColumns, k: int, n_items: int, exclude_seen: bool = True,
             model_dir: Path | None = None, units: bool = False) -> dict:
    """Model vs baselines on the last item of every held-out session (prefix = the events before it).
    ``model``: the trained (in-memory) model, or any callable on Loader batches (:func:`offline_scores`);
    None: the SavedModel in ``model_dir``; neither: the baselines only (a classical session model scores
    itself: :mod:`.session_classical`).
    ``exclude_seen``: the prefix's own items are never recommended, by the model and by the baselines.
    ``units``: each method's result also holds ``units``, per-session recall/NDCG/MRR@k
    (:func:`pipeline_lib.models.intervals.rank_units`; ties by item index, as served top-k)."""
    from pipeline_lib.models import intervals

    req, _ = prefixes(valid_sessions, cols)
    # targets in the model's index space: encode the full held-out sessions with the same workflow
    full = raw_to_transformed(workflow, valid_sessions[req.columns])
    targets = full[cols.item_id].map(lambda v: int(v[-1])).to_numpy()
    enc_prefix = raw_to_transformed(workflow, req)
    last_items = enc_prefix[cols.item_id].map(lambda v: int(v[-1])).to_numpy()
    lookup = vocabulary_lookup(item_vocabulary(workflow, cols.item_id))
    excl = exclusions(lookup, req[cols.item_id].tolist(), None, len(req)) if exclude_seen else None
    def scored(scores: np.ndarray) -> dict:
        masked = mask_scores(scores, excl)
        out = topk_metrics(masked, targets, k)
        if units:
            out["units"] = {key: v for key, v in intervals.rank_units(intervals.target_ranks(masked, targets), k).items()
                            if not key.startswith("precision")}
        return out

    results: dict[str, Any] = {}
    if model is not None or model_dir is not None:
        results["model"] = scored(offline_scores(workflow, model_dir, req, model=model))
    for name, s in baseline_scores(train_transformed[cols.item_id], last_items, n_items).items():
        results[name] = scored(s)
    results["n_sessions"] = int(len(targets))
    results["target_oov_rate"] = float(np.mean(targets < N_SPECIAL))
    seen = [set(v) for v in req[cols.item_id]]
    results["target_in_prefix_rate"] = float(np.mean([t in p for t, p in zip(valid_sessions[cols.item_id].map(
        lambda v: v[-1]), seen)])) if len(seen) else 0.0
    return results


def train_and_evaluate(etl_out, cfg, out_dir: Path,
                       extra_baselines: Optional[Callable[[pd.DataFrame], dict[str, dict]]] = None) -> TrainOutput:
    """Train (``session.model``, a deep type), evaluate against the baselines on the held-out sessions, save
    metrics.json. ``extra_baselines``: more baselines scored on the same held-out sessions (the classical
    session models: :func:`pipeline_lib.models.session_classical.baseline_metrics`)."""
    s = cfg.session
    t0 = time.perf_counter()
    model, model_dir, history = train_session_model(etl_out.train_dir, s.model, s.columns, s.etl.max_session_length,
                                                    cfg.seed, out_dir, s.top_k, etl_out.valid_dir)
    train_s = time.perf_counter() - t0
    best_epoch = history.pop("best_epoch", None)
    workflow = load_workflow(etl_out.workflow_dir)
    n_items = int(workflow.output_schema[s.columns.item_id].int_domain.max) + 1
    train_tf = pd.read_parquet(sorted(Path(etl_out.train_dir).glob("*.parquet"))[0])
    valid = pd.read_parquet(etl_out.split.valid)
    results = evaluate(workflow, model, valid, train_tf, s.columns, s.top_k, n_items, s.exclude_seen)
    k = s.top_k
    if extra_baselines is not None:
        results.update(extra_baselines(valid))
    metrics = {
        "model": f"session_{s.model.type}",
        **{f"{m}@{k}": results["model"][f"{m}@{k}"] for m in ("recall", "ndcg", "mrr")},
        "baselines": {n: results[n] for n in ("most_popular", "cooccurrence", *CLASSICAL_BASELINES) if n in results},
        "n_train": int(len(train_tf)), "n_valid": results["n_sessions"], "n_items": n_items,
        "target_oov_rate": results["target_oov_rate"], "exclude_seen": s.exclude_seen,
        "target_in_prefix_rate": results["target_in_prefix_rate"], "epochs_run": len(history.get("loss", [])), "best_epoch": best_epoch,
        "train_seconds": round(train_s, 1),
    }
    if s.exclude_seen and results["target_in_prefix_rate"] > 0.1:
        log.warning("%.0f%% of the held-out targets are items already in their session: with session.exclude_seen "
                    "they are never recommended (repeat consumption; see docs/sessions.md)",
                    100 * results["target_in_prefix_rate"])
    metrics_path = save_metrics(out_dir, metrics, history)
    plot_learning_curve(history, out_dir / "learning_curve.png", keys=("loss",),
                        title=f"session_{s.model.type}: recall@{k} {metrics[f'recall@{k}']:.4f} (held-out sessions)")
    log.info("session_%s: recall@%d %.4f ndcg@%d %.4f (most popular %.4f, co-occurrence %.4f)", s.model.type, k,
             metrics[f"recall@{k}"], k, metrics[f"ndcg@{k}"], results["most_popular"][f"recall@{k}"],
             results["cooccurrence"][f"recall@{k}"])
    return TrainOutput(model_dir, metrics, history, metrics_path)
