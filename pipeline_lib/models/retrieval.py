"""Stage 4 (retrieval) -- transformed + schema -> query encoder + item embeddings, and top-k.

Three Merlin Models retrieval models, trained on the positive interactions of the ETL output:

- ``two_tower``: ``TwoTowerModelV2``; query tower = user id + user + context features, item tower
  = item id + item features; in-batch negatives.
- ``youtube_dnn``: ``YoutubeDNNRetrievalModelV2`` with sampled softmax (``num_sampled``, capped at the id range,
  ``logits_temperature``, ``min_sampled_id``); query = the user's recent positive items (the
  ``<item_id>_history`` list, encoded jointly with the item id) + user + context features; the
  item embeddings are the history embedding table; trained with ``SequencePredictLast`` on
  history + the clicked item.
- ``mf``: ``MatrixFactorizationModelV2`` (user id x item id), in-batch negatives.

Training (``model.retrieval.epochs`` at most, learning rate ``model.retrieval.learning_rate``; null
= the model-wide value): after every epoch the in-memory model is scored under the baselines'
per-user protocol (``baselines.TopKProtocol``: full catalogue, the user's training positives
excluded, recall/NDCG@k per user; :class:`EpochEval`), the weights of the best epoch are kept and
training stops after ``early_stopping_patience`` epochs without improvement. Measured on the
synthetic default and an ml-100k-sized log: at the old 2 epochs and 0.003 (~100 optimiser steps)
every model stopped far short of the item-item baselines; youtube_dnn with 100 sampled negatives
fell below most-popular after its first epoch, with (nearly) the whole catalogue sampled it learns.

Retrieval is exact brute force: scores = query embeddings . item embeddings, top-k by
``np.argsort`` (stable: ties go to the lower catalogue row). The catalogue is every item of the
training split with its latest features; its embeddings are computed from the raw catalogue
through the item part of the fitted workflow (:func:`item_embeddings`).

Metrics (Recall/Precision/NDCG/MRR@k, ``recall`` ...) use Merlin Models' own top-k metric classes
on the full catalogue score matrix of the held-out positives (one query per positive row, seen
items not excluded); ``user_recall@k`` / ``user_ndcg@k`` are the per-user figures of the best epoch.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np
import pandas as pd

from pipeline_lib.config import ColumnsConfig, FeatureSide, ModelConfig
from pipeline_lib.etl.workflow import history_column, load_workflow
from pipeline_lib.models.baselines import TopKProtocol, mask_rows, positives, top_columns
from pipeline_lib.models.common import (Encoder, TrainOutput, import_tf, load_encoder, optimizer, plot_learning_curve,
                                        save_metrics, save_model, signature_encoder)
from pipeline_lib.progress import epoch_line

log = logging.getLogger(__name__)

QUERY_ENCODER = "query_encoder"
ITEM_ENCODER = "item_encoder"
ITEM_TABLE = "item_table.npy"  # youtube_dnn: the history embedding table (rows = item indices)


@dataclass
class RetrievalSpec:
    """Which raw columns form the query and the item side of a retrieval model."""

    model_type: str
    item_id: str
    query_columns: list[str]
    item_columns: list[str]
    history: Optional[str] = None        # youtube_dnn: the history list that is also its item table
    query_history: Optional[str] = None  # two_tower (``retrieval.query_history``): the history list, a query feature

    @classmethod
    def from_config(cls, columns: ColumnsConfig, model_type: str, query_history: bool = False,
                    query_user_id: bool = True) -> "RetrievalSpec":
        user = [f.name for f in columns.features if f.side == FeatureSide.user]
        context = [f.name for f in columns.features if f.side == FeatureSide.context]
        item = [f.name for f in columns.features if f.side == FeatureSide.item]
        if model_type == "mf":
            return cls(model_type, columns.item_id, [columns.user_id], [columns.item_id])
        if model_type == "two_tower":
            lists: list[str] = [history_column(columns)] if query_history else []
            uid = [columns.user_id] if query_user_id or not (lists or user or context) else []
            return cls(model_type, columns.item_id, uid + lists + user + context, [columns.item_id] + item,
                       query_history=lists[0] if lists else None)
        if model_type == "youtube_dnn":
            hist = history_column(columns)
            return cls(model_type, columns.item_id, [hist, columns.user_id] + user + context, [columns.item_id], hist)
        raise ValueError(f"'{model_type}' is not a retrieval model")

    def to_json(self) -> dict:
        return dict(model_type=self.model_type, item_id=self.item_id, query_columns=self.query_columns,
                    item_columns=self.item_columns, history=self.history, query_history=self.query_history)


def side_transform(workflow, raw: pd.DataFrame, keep: list[str], filler: dict) -> pd.DataFrame:
    """Transform only the raw columns ``keep`` with the fitted (serving) workflow.

    Every feature's chain in the workflow reads only its own raw column (the joint item-id /
    history vocabulary is fixed once fitted), so the other inputs are filled with a constant
    training value (``filler``) and their outputs dropped. NVTabular's ``Workflow.remove_inputs``
    would be the library way, but in nvtabular 23.08 it also drops kept columns (user_country
    disappears when item columns are removed), so it is not used.
    """
    from merlin.io import Dataset

    inputs = workflow.input_schema.column_names
    out = workflow.transform(Dataset(with_filler(raw[keep], inputs, filler), cpu=True)).to_ddf().compute()
    return out[[c for c in out.columns if c in keep]].reset_index(drop=True)


def with_filler(frame: pd.DataFrame, inputs: list[str], filler: dict) -> pd.DataFrame:
    """``frame``'s rows with every workflow input it lacks set to the filler row's constant value,
    columns in ``inputs`` order."""
    out = frame.reset_index(drop=True).copy()
    for name in inputs:
        if name not in out.columns:
            out[name] = [filler[name]] * len(out)
    return out[inputs]


def filler_row(raw_train: pd.DataFrame, columns: list[str]) -> dict:
    """A constant, valid value per raw input column (the first training row's)."""
    first = raw_train.iloc[0]
    return {c: first[c] for c in columns if c in raw_train.columns}


def catalogue(raw_train: pd.DataFrame, spec: RetrievalSpec) -> pd.DataFrame:
    """One row per item of the training split (its latest features), ordered by item id."""
    cols = list(dict.fromkeys(spec.item_columns))
    cat = raw_train[cols].drop_duplicates(spec.item_id, keep="last")
    return cat.sort_values(spec.item_id, kind="stable").reset_index(drop=True)


def _model_schema(schema, spec: RetrievalSpec, side: str):
    """The transformed columns a tower reads, with the tags Merlin Models selects by."""
    from merlin.schema import Tags

    names = spec.query_columns if side == "query" else spec.item_columns
    sub = schema.select_by_name([n for n in names if n in schema.column_names])
    if spec.history and side == "query":
        # The history is the candidate-id feature of YoutubeDNN: its own table name (the joint
        # vocabulary's domain is shared with item_id, which the query does not read).
        cols = []
        for col in sub:
            if col.name == spec.history:
                dom = col.int_domain
                col = col.with_tags([Tags.ITEM_ID, Tags.ITEM, Tags.SEQUENCE, Tags.LIST, Tags.CATEGORICAL])
                col = col.with_properties({**col.properties, "domain": {"min": dom.min, "max": dom.max,
                                                                         "name": spec.history}})
            cols.append(col)
        from merlin.schema import Schema

        sub = Schema(cols)
    if spec.query_history and side == "query" and spec.query_history in sub.column_names:
        # two_tower: the history is a plain multi-hot feature of the query (mean of its embeddings), not a
        # sequence; its own table (the joint vocabulary's domain, renamed so no name clashes with the item id)
        from merlin.schema import Schema

        cols = []
        for col in sub:
            if col.name == spec.query_history:
                dom = col.int_domain
                col = col.with_tags([Tags.CATEGORICAL, Tags.USER, Tags.LIST])
                col = _without_tags(col, [Tags.SEQUENCE, Tags.ITEM_ID, Tags.ITEM])
                col = col.with_properties({**col.properties, "domain": {"min": dom.min, "max": dom.max,
                                                                         "name": spec.query_history}})
            cols.append(col)
        sub = Schema(cols)
    return sub


def _without_tags(col, drop: list):
    """``col`` without the tags ``drop``."""
    from merlin.schema import ColumnSchema

    return ColumnSchema(col.name, tags=[t for t in col.tags if t not in drop], properties=col.properties,
                        dtype=col.dtype, is_list=col.is_list, is_ragged=col.is_ragged)


def build_model(schema, spec: RetrievalSpec, cfg: ModelConfig, item_counts: Optional[np.ndarray] = None):
    """A Merlin Models retrieval model. ``item_counts`` (positives per encoded item id) enables the
    logQ correction of in-batch negatives (two_tower, mf)."""
    import merlin.models.tf as mm
    from merlin.models.tf.outputs.base import DotProduct
    from merlin.models.tf.transforms.bias import PopularityLogitsCorrection
    from merlin.schema import Tags

    r = cfg.retrieval
    dims = list(r.tower_mlp) + [cfg.embedding_dim]
    item_id_schema = schema.select_by_name([spec.item_id])
    correction: dict[str, Any] = {}
    if r.logq_correction and item_counts is not None and spec.model_type in ("mf", "two_tower"):
        correction["post"] = PopularityLogitsCorrection(item_counts.astype(np.float32), schema=item_id_schema)
        correction["store_negative_ids"] = True  # the correction needs the in-batch negatives' ids
    if spec.model_type == "mf":
        mf_schema = schema.select_by_name([spec.query_columns[0], spec.item_id])
        output = mm.ContrastiveOutput(to_call=DotProduct(), negative_samplers="in-batch", schema=item_id_schema,
                                      **correction)
        return mm.MatrixFactorizationModelV2(mf_schema, dim=cfg.embedding_dim, outputs=output)
    if spec.model_type == "two_tower":
        q = _model_schema(schema, spec, "query")
        i = _model_schema(schema, spec, "item")
        query = mm.Encoder(q, mm.MLPBlock(dims, no_activation_last_layer=True))
        candidate = mm.Encoder(i, mm.MLPBlock(dims, no_activation_last_layer=True))
        return mm.TwoTowerModelV2(query, candidate, negative_samplers="in-batch", **correction)
    q = _model_schema(schema, spec, "query")
    n_classes = int(q[spec.history].int_domain.max) + 1
    # at most every sampleable id once (Merlin asserts num_sampled <= the id range)
    num_sampled = min(r.num_sampled, n_classes - r.min_sampled_id - 1)
    inputs = mm.InputBlockV2(q, categorical=mm.Embeddings(q.select_by_tag(Tags.CATEGORICAL), dim=cfg.embedding_dim))
    return mm.YoutubeDNNRetrievalModelV2(
        q, inputs=inputs, top_block=mm.MLPBlock(dims, no_activation_last_layer=True),
        num_sampled=num_sampled, logits_temperature=r.logits_temperature, min_sampled_id=r.min_sampled_id,
    )


def training_frame(transformed: pd.DataFrame, label: str, spec: RetrievalSpec, history_length: int) -> pd.DataFrame:
    """Positive interactions; for youtube_dnn the history becomes history + clicked item (the
    target that ``SequencePredictLast`` takes off), keeping rows with at least one earlier item."""
    pos = transformed[transformed[label] == 1].reset_index(drop=True)
    if spec.history:
        seq = [list(h)[-(history_length - 1):] + [i] for h, i in zip(pos[spec.history], pos[spec.item_id])]
        pos[spec.history] = seq
        pos = pos[pos[spec.history].map(len) >= 2].reset_index(drop=True)
    return pos


def first_positive_rows(valid: pd.DataFrame, label: str, user_col: str, users: np.ndarray) -> pd.DataFrame:
    """The query of each user of the per-user protocol: the user's first positive validation row."""
    first = positives(valid, label).drop_duplicates(user_col, keep="first").set_index(user_col)
    return first.loc[users].reset_index()


@dataclass
class EpochEval:
    """The per-user protocol (``baselines.TopKProtocol``: full catalogue, the user's training positives
    excluded, recall/NDCG@k per user) on the in-memory model, after every epoch. The catalogue and
    the user queries are transformed once; each epoch only encodes them."""

    protocol: Any
    items: pd.DataFrame               # transformed item side, protocol catalogue order (table rows: youtube_dnn)
    queries: pd.DataFrame             # transformed query columns, one row per evaluated user
    k: int

    @classmethod
    def build(cls, workflow, spec: RetrievalSpec, train_raw: pd.DataFrame, valid_raw: pd.DataFrame,
              columns: ColumnsConfig, filler: dict, k: int) -> "EpochEval":
        p = TopKProtocol.build(train_raw, valid_raw, columns.user_id, columns.item_id, columns.label)
        cat = catalogue(train_raw, spec).set_index(spec.item_id).loc[p.item_ids].reset_index()
        if spec.history:
            lists = pd.DataFrame({spec.history: [[i] for i in cat[spec.item_id]]})
            items = side_transform(workflow, lists, [spec.history], filler)
        else:
            items = side_transform(workflow, cat, spec.item_columns, filler)
        queries = first_positive_rows(valid_raw, columns.label, columns.user_id, p.users)
        return cls(p, items, side_transform(workflow, queries, spec.query_columns, filler), k)

    def __call__(self, model, spec: RetrievalSpec) -> dict:
        """``recall@k`` / ``ndcg@k`` of the model as it is now."""
        q = encode_with(keras_encoder(model.query_encoder), self.queries, spec.query_columns)
        if spec.history:
            emb = history_table(model, spec)[np.array([v[0] for v in self.items[spec.history]])]
        else:
            emb = encode_with(keras_encoder(model.candidate_encoder), self.items, spec.item_columns)
        return self.protocol.evaluate_scores(lambda rows, xb: q[rows] @ emb.T, self.k)


def retrieval_schedule(cfg: ModelConfig) -> tuple[int, Optional[int], float]:
    """(epochs, early-stopping patience, learning rate) of a retrieval model: ``model.retrieval``'s
    own values, or the model-wide ones where those are null."""
    r = cfg.retrieval
    epochs = r.epochs if r.epochs is not None else cfg.epochs
    patience = r.early_stopping_patience if r.early_stopping_patience is not None else cfg.early_stopping_patience
    return epochs, patience, r.learning_rate if r.learning_rate is not None else cfg.learning_rate


def train(workflow_dir: Path, train_dir: Path, raw_train: Path, raw_valid: Path, columns: ColumnsConfig,
          cfg: ModelConfig, seed: int, out_dir: Path) -> TrainOutput:
    """Train a retrieval model, keep the epoch with the best per-user validation recall@k (the
    baselines' protocol), save its encoders and evaluate top-k on the held-out positives."""
    import_tf().keras.utils.set_random_seed(seed)
    spec = RetrievalSpec.from_config(columns, cfg.type, cfg.retrieval.query_history, cfg.retrieval.query_user_id)
    model, fit, n_train = _compiled_model(train_dir, spec, columns, cfg)
    workflow = load_workflow(workflow_dir).remove_inputs([columns.label])
    valid_raw, train_raw = pd.read_parquet(raw_valid), pd.read_parquet(raw_train)
    cat_raw = catalogue(train_raw, spec)
    filler = filler_row(train_raw, workflow.input_schema.column_names)
    k = cfg.retrieval.k
    check = EpochEval.build(workflow, spec, train_raw, valid_raw, columns, filler, k)
    epochs, patience, lr = retrieval_schedule(cfg)
    log.info("training %s: up to %d epochs over %d positive interactions (batch %d, learning rate %g), "
             "per-user validation top-%d over %d items", cfg.type, epochs, n_train, cfg.batch_size, lr, k,
             len(cat_raw))
    history, best_epoch = _fit_epochs(model, fit, check, spec, epochs, patience)
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = save(model, spec, out_dir / "model")
    m = evaluate(workflow, model, spec, cat_raw, valid_raw, columns.label, k, filler)
    metrics = m | {"model": cfg.type, "epochs_run": len(history["loss"]), "best_epoch": best_epoch + 1,
                   "n_train": n_train, f"user_recall@{k}": history["val_recall"][best_epoch],
                   f"user_ndcg@{k}": history["val_ndcg"][best_epoch]}
    metrics_path = save_metrics(out_dir, metrics, history)
    plot_learning_curve(history, out_dir / "learning_curve.png", keys=("loss", "recall", "ndcg"),
                        title=f"{cfg.type}: validation recall@{k} {metrics['recall']:.4f}")
    log.info("%s validation recall@%d %.4f ndcg@%d %.4f; per user, seen excluded: recall@%d %.4f (epoch %d)",
             cfg.type, k, metrics["recall"], k, metrics["ndcg"], k, metrics[f"user_recall@{k}"], best_epoch + 1)
    return TrainOutput(model_dir=model_dir, metrics=metrics, history=history, metrics_path=metrics_path)


def _compiled_model(train_dir: Path, spec: RetrievalSpec, columns: ColumnsConfig, cfg: ModelConfig):
    """(compiled model, a function that trains it one epoch and returns the loss, training rows)."""
    import merlin.models.tf as mm
    from merlin.io import Dataset

    ds = Dataset(str(train_dir), engine="parquet")
    schema = ds.schema
    frame = training_frame(ds.to_ddf().compute(), columns.label, spec, cfg.retrieval.history_length)
    if not len(frame):
        raise ValueError(f"no positive interactions ({columns.label} == 1) to train the retrieval model on")
    cardinality = int(schema[spec.item_id].int_domain.max) + 1
    # positives per item index, +1 so that no item has probability 0 (log q finite)
    counts = np.bincount(frame[spec.item_id].to_numpy(), minlength=cardinality)[:cardinality] + 1
    model = build_model(schema, spec, cfg, item_counts=counts)
    if spec.model_type == "youtube_dnn":
        model_schema = _model_schema(schema, spec, "query")
    elif spec.model_type == "mf":
        model_schema = schema.select_by_name([spec.query_columns[0], spec.item_id])
    else:
        model_schema = schema.select_by_name(list(dict.fromkeys(spec.query_columns + spec.item_columns)))
    train_ds = Dataset(frame[model_schema.column_names], schema=model_schema, cpu=True)
    model.compile(optimizer=optimizer(cfg.optimizer, retrieval_schedule(cfg)[2]), run_eagerly=False)
    fit_kwargs = {}
    if spec.history:
        fit_kwargs["pre"] = mm.SequencePredictLast(schema=model_schema.select_by_name([spec.history]),
                                                   target=spec.history)
    # drop_last: a last in-batch-negatives batch smaller than k breaks the top-k training metrics
    loader = mm.Loader(train_ds, batch_size=min(cfg.batch_size, len(frame)), shuffle=True, drop_last=True)

    def fit() -> float:
        return float(model.fit(loader, epochs=1, verbose=0, **fit_kwargs).history["loss"][-1])
    return model, fit, int(len(frame))


def _fit_epochs(model, fit, check: EpochEval, spec: RetrievalSpec, epochs: int,
                patience: Optional[int]) -> tuple[dict, int]:
    """Train epoch by epoch, scoring the per-user protocol after each; the model ends with the
    weights of the best epoch (by recall@k). Returns the history and the best epoch (from 0)."""
    history: dict[str, list] = {"loss": [], "val_recall": [], "val_ndcg": []}
    best_w, best_epoch = None, -1
    for epoch in range(epochs):
        t0 = time.perf_counter()
        history["loss"].append(fit())
        m = check(model, spec)
        history["val_recall"].append(m[f"recall@{check.k}"])
        history["val_ndcg"].append(m[f"ndcg@{check.k}"])
        log.info(epoch_line(epoch + 1, epochs, {"loss": history["loss"][-1], f"val_recall@{check.k}": m[f"recall@{check.k}"],
                                                f"val_ndcg@{check.k}": m[f"ndcg@{check.k}"]}, time.perf_counter() - t0))
        if best_w is None or history["val_recall"][-1] > history["val_recall"][best_epoch]:
            best_w, best_epoch = model.get_weights(), epoch
        elif patience and epoch - best_epoch >= patience:
            break
    model.set_weights(best_w)
    return history, best_epoch


def save(model, spec: RetrievalSpec, model_dir: Path) -> Path:
    """Save the query encoder (and item encoder / item table) as SavedModels + spec.json; the encoders
    without Keras' layer traces (``common.save_model``: the serving signature is all that loads them)."""
    if model_dir.exists():
        shutil.rmtree(model_dir)
    model_dir.mkdir(parents=True)
    save_model(model.query_encoder, model_dir / QUERY_ENCODER)
    if spec.history:
        np.save(model_dir / ITEM_TABLE, history_table(model, spec))
    else:
        save_model(model.candidate_encoder, model_dir / ITEM_ENCODER)
    (model_dir / "spec.json").write_text(json.dumps(spec.to_json(), indent=2))
    return model_dir


def history_table(model, spec: RetrievalSpec) -> np.ndarray:
    """youtube_dnn: the in-memory model's history embedding table (its item embeddings), float32."""
    table = model.query_encoder.first["categorical"][spec.history].table.embeddings
    return np.asarray(table.numpy(), dtype=np.float32)


# -- inference: raw rows -> embeddings -> top-k (shared by export, smoke test, gate, served model) --


def keras_encoder(layer) -> Encoder:
    """The :data:`Encoder` of an in-memory Keras encoder, called in inference mode (the same embeddings
    as its SavedModel's signature: tests/unit/models/test_retrieval.py)."""
    tf = import_tf()
    return lambda arrays: np.asarray(layer({n: tf.convert_to_tensor(v) for n, v in arrays.items()}, training=False),
                                     dtype=np.float32)


def encode(bound, transformed: pd.DataFrame, names: list[str] | None = None, batch_size: int = 4096) -> np.ndarray:
    """Call a SavedModel's serving signature on transformed rows, in batches (see :func:`encode_with`)."""
    return encode_with(signature_encoder(bound), transformed, names, batch_size)


def encode_with(fn, transformed: pd.DataFrame, names: list[str] | None = None, batch_size: int = 4096) -> np.ndarray:
    """``fn`` (model input arrays -> outputs) on transformed rows, in batches; list columns go in
    as values/offsets (merlin ``TensorTable``, as merlin-systems hands them to a model).

    (The Merlin ``Loader`` is not used here: merlin-dataloader 23.08 fails on a batch whose first
    row holds an empty list, which an empty user history is.)
    """
    from merlin.table import TensorTable

    df = transformed.reset_index(drop=True)
    if names is not None:
        df = df[[c for c in df.columns if c in names]]
    out = [fn(TensorTable.from_df(df.iloc[start:start + batch_size].reset_index(drop=True)).to_dict())
           for start in range(0, len(df), batch_size)]
    return np.concatenate(out) if out else np.zeros((0, 0), dtype=np.float32)


def item_embeddings(workflow, model_dir: Optional[Path], spec: RetrievalSpec, cat_raw: pd.DataFrame,
                    filler: dict, model=None) -> tuple[np.ndarray, np.ndarray]:
    """(raw item ids, embeddings) of the catalogue, computed from the raw catalogue rows through
    the item part of the fitted workflow; by the saved item encoder / table of ``model_dir``, or by the
    in-memory retrieval ``model`` when given (the same embeddings)."""
    if spec.history:  # youtube_dnn: rows of the history table, indexed by the joint vocabulary
        lists = pd.DataFrame({spec.history: [[i] for i in cat_raw[spec.item_id]]})
        idx = np.array([v[0] for v in side_transform(workflow, lists, [spec.history], filler)[spec.history]])
        table = history_table(model, spec) if model is not None else np.load(Path(model_dir) / ITEM_TABLE)  # type: ignore[arg-type]
        return cat_raw[spec.item_id].to_numpy(), table[idx]
    transformed = side_transform(workflow, cat_raw, spec.item_columns, filler)
    enc = (keras_encoder(model.candidate_encoder) if model is not None
           else signature_encoder(load_encoder(Path(model_dir) / ITEM_ENCODER)))  # type: ignore[arg-type]
    return cat_raw[spec.item_id].to_numpy(), encode_with(enc, transformed, spec.item_columns)


def query_embeddings(workflow, model_dir: Optional[Path], spec: RetrievalSpec, raw: pd.DataFrame, filler: dict,
                     encoder: Optional[Encoder] = None) -> np.ndarray:
    """Offline query path: NVTabular transform of the raw query columns + the saved query encoder
    (``encoder``: the query :data:`Encoder` at hand -- an already loaded SavedModel's, the in-memory
    model's; else the SavedModel of ``model_dir`` loaded here)."""
    transformed = side_transform(workflow, raw, spec.query_columns, filler)
    enc = encoder or signature_encoder(load_encoder(Path(model_dir) / QUERY_ENCODER))  # type: ignore[arg-type]
    return encode_with(enc, transformed, spec.query_columns)


def top_k(query: np.ndarray, items: np.ndarray, k: int,
          exclude: Optional[list[np.ndarray]] = None) -> tuple[np.ndarray, np.ndarray]:
    """Exact top-k by dot product: (catalogue row indices [n, k], scores [n, k]), best first;
    ties go to the lower row. ``exclude``: per query, catalogue rows never returned (their score
    is -inf; a query left with fewer than k other items gets them last, at -inf)."""
    return top_k_scores(np.asarray(query, dtype=np.float32) @ np.asarray(items, dtype=np.float32).T, k, exclude)


def top_k_scores(scores: np.ndarray, k: int,
                 exclude: Optional[list[np.ndarray]] = None) -> tuple[np.ndarray, np.ndarray]:
    """Top-k of a [rows, catalogue] score matrix (float32): column indices and scores, best first, ties
    to the lower column; ``exclude``'d columns get -inf (last, when a row has fewer than k others).
    The one masked top-k of exact retrieval and of session top-k; masks ``scores`` in place (float32 input)."""
    scores = mask_rows(np.asarray(scores, dtype=np.float32), exclude, -np.inf)
    idx = top_columns(scores, k)
    return idx, np.take_along_axis(scores, idx, axis=1)


def evaluate(workflow, model, spec: RetrievalSpec, cat_raw: pd.DataFrame, valid_raw: pd.DataFrame,
             label: str, k: int, filler: dict) -> dict:
    """Recall/Precision/NDCG/MRR@k of the held-out positives against the whole catalogue, by the in-memory
    retrieval ``model`` (its saved encoders give the same embeddings; none is loaded back here)."""
    item_ids, item_emb = item_embeddings(workflow, None, spec, cat_raw, filler, model)
    pos = valid_raw[valid_raw[label] == 1].reset_index(drop=True)
    q = query_embeddings(workflow, None, spec, pos, filler, keras_encoder(model.query_encoder))
    return retrieval_metrics(q @ item_emb.T, item_ids, pos[spec.item_id].to_numpy(), k)


def retrieval_metrics(scores: np.ndarray, item_ids: np.ndarray, targets: np.ndarray, k: int) -> dict:
    """Merlin Models' RecallAt/PrecisionAt/NDCGAt/MRRAt over a [queries, catalogue] score matrix;
    one relevant item per query (its target). Queries whose target is not in the catalogue (an
    item never seen in training) count as misses."""
    tf = import_tf()
    import merlin.models.tf as mm

    row = pd.Series(np.arange(len(item_ids)), index=item_ids)
    target_row = row.reindex(targets).to_numpy()
    known = ~np.isnan(target_row)
    y_true = np.zeros(scores.shape, dtype=np.float32)
    y_true[np.nonzero(known)[0], target_row[known].astype(int)] = 1.0
    out = {"k": k, "n_queries": int(len(targets)), "target_in_catalogue": float(known.mean()) if len(known) else 0.0}
    metrics = {"recall": mm.RecallAt(k), "precision": mm.PrecisionAt(k), "ndcg": mm.NDCGAt(k), "mrr": mm.MRRAt(k)}
    for name, metric in metrics.items():
        if not known.any():
            out[name] = 0.0
            continue
        metric.update_state(tf.constant(y_true[known]), tf.constant(scores[known], dtype=tf.float32))
        out[name] = float(metric.result().numpy()) * float(known.mean())  # unknown targets: misses
    return out
