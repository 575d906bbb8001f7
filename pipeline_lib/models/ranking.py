"""Stage 4 -- transformed + schema -> model: Merlin Models (TensorFlow) trained with Merlin loaders."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

import numpy as np
from sklearn.metrics import log_loss, roc_auc_score

from pipeline_lib.config import ModelConfig
from pipeline_lib.models.common import (TrainOutput, import_tf, optimizer, parquet_dataset, plot_learning_curve,
                                        save_metrics, save_model)
from pipeline_lib.progress import epoch_logger

log = logging.getLogger(__name__)


def _regularizer(l2: float):
    return import_tf().keras.regularizers.L2(l2) if l2 > 0 else None


def _embeddings(schema, cfg: ModelConfig):
    """One embedding table per categorical/list feature, all ``embedding_dim`` wide (list features:
    the mean of their values' embeddings), with an L2 penalty ``embedding_l2`` on every table: it
    keeps rare ids near zero (a user or item seen a few times is not memorised) and, with Adam,
    pulls rows no training row uses (the out-of-vocabulary index) to zero instead of leaving them
    at their random initial values."""
    import merlin.models.tf as mm
    from merlin.schema import Tags

    return mm.Embeddings(schema.select_by_tag(Tags.CATEGORICAL), dim=cfg.embedding_dim, sequence_combiner="mean",
                         embeddings_regularizer=_regularizer(cfg.embedding_l2))


def _mlp(dims: list[int], cfg: ModelConfig):
    import merlin.models.tf as mm

    return mm.MLPBlock(dims, dropout=cfg.dropout or None)


def build_model(schema, cfg: ModelConfig, label: str):
    """A Merlin Models ranking model from the ETL schema (embeddings and MLPs sized and regularised
    alike for the four types; docs/ranking.md)."""
    import merlin.models.tf as mm
    from merlin.schema import Tags

    task = mm.BinaryOutput(label)
    if cfg.type == "dlrm":
        return mm.DLRMModel(schema, embeddings=_embeddings(schema, cfg), bottom_block=_mlp(cfg.bottom_mlp, cfg),
                            top_block=_mlp(cfg.top_mlp, cfg), prediction_tasks=task)
    if cfg.type == "dcn":
        return mm.DCNModel(schema, depth=cfg.cross_depth, deep_block=_mlp(cfg.top_mlp, cfg),
                           input_block=mm.InputBlockV2(schema, categorical=_embeddings(schema, cfg)),
                           prediction_tasks=task)
    # The wide (first-order) parts one-hot encode categoricals with CategoryEncoding, which takes no
    # ragged input: multi-hot list features feed the embedding/deep parts only.
    cats = schema.select_by_tag(Tags.CATEGORICAL)
    wide_cats = cats.select_by_name([c.name for c in cats if not c.is_list])
    if cfg.type == "deepfm":
        wide_input = mm.ParallelBlock({
            "categorical": mm.CategoryEncoding(wide_cats, output_mode="multi_hot", sparse=True),
            "continuous": mm.Filter(schema.select_by_tag(Tags.CONTINUOUS)).connect(mm.ToSparse()),
        }, aggregation="concat")
        return mm.DeepFMModel(
            schema, deep_block=_mlp(cfg.top_mlp, cfg), wide_input_block=wide_input,
            input_block=mm.InputBlockV2(schema, aggregation=None, categorical=_embeddings(schema, cfg)),
            prediction_tasks=task,
        )
    if cfg.type == "wide_deep":
        return mm.WideAndDeepModel(
            schema,
            wide_schema=wide_cats,
            deep_schema=schema,
            deep_block=_mlp(cfg.top_mlp, cfg),
            deep_input_block=mm.InputBlockV2(schema, categorical=_embeddings(schema, cfg)),
            wide_preprocess=mm.CategoryEncoding(wide_cats, output_mode="multi_hot", sparse=True),
            wide_regularizer=_regularizer(cfg.embedding_l2),
            prediction_tasks=task,
        )
    raise ValueError(f"unknown model type '{cfg.type}'")


def compiled_model(schema, cfg: ModelConfig, label: str):
    """:func:`build_model` compiled with ``model.optimizer`` at ``model.learning_rate``, AUC as its metric."""
    model = build_model(schema, cfg, label)
    model.compile(optimizer=optimizer(cfg.optimizer, cfg.learning_rate), run_eagerly=False,
                  metrics=[import_tf().keras.metrics.AUC(name="auc")])
    return model


def train(train_dir: Path, valid_dir: Path, cfg: ModelConfig, label: str, seed: int, out_dir: Path) -> TrainOutput:
    """Train on ``train_dir``, evaluate AUC/logloss on ``valid_dir``, save model + metrics."""
    import merlin.models.tf as mm
    from merlin.schema import Tags

    keras = import_tf().keras
    keras.utils.set_random_seed(seed)
    train_ds, valid_ds = parquet_dataset(train_dir), parquet_dataset(valid_dir)
    schema = train_ds.schema
    if label not in schema.column_names:
        raise ValueError(f"label column '{label}' missing from the transformed schema")
    features = schema.excluding_by_tag(Tags.TARGET)
    note = architecture_note(features, cfg.type)
    if note:
        log.warning(note)
    model = compiled_model(schema, cfg, label)

    train_loader = mm.Loader(train_ds, batch_size=cfg.batch_size, shuffle=True)
    valid_loader = mm.Loader(valid_ds, batch_size=cfg.batch_size, shuffle=False)
    callbacks = [epoch_logger(cfg.epochs, log)]
    if cfg.early_stopping_patience:
        callbacks.append(keras.callbacks.EarlyStopping(
            monitor="val_auc", mode="max", patience=cfg.early_stopping_patience, restore_best_weights=True))
    log.info("training %s: %d epochs over %d rows (batch %d), validation on %d rows", cfg.type, cfg.epochs,
             train_ds.num_rows, cfg.batch_size, valid_ds.num_rows)
    hist = model.fit(train_loader, validation_data=valid_loader, epochs=cfg.epochs, callbacks=callbacks, verbose=0)
    history = {k: [float(x) for x in v] for k, v in hist.history.items()}
    if cfg.early_stopping_patience and len(history.get("loss", [])) < cfg.epochs:
        log.info("early stopping after %d epochs (no better validation auc for %d epochs); best weights restored",
                 len(history["loss"]), cfg.early_stopping_patience)

    preds = predict_dataset(model, valid_ds, cfg.batch_size)
    labels = valid_ds.to_ddf()[label].compute().to_numpy()
    metrics = ranking_metrics(labels, preds)
    metrics.update(model=cfg.type, epochs_run=len(history.get("loss", [])), n_train=int(train_ds.num_rows),
                   n_valid=int(len(labels)), features=features.column_names, **({"note": note} if note else {}))

    log.info("%s validation AUC %.4f logloss %.4f; saving the SavedModel ...", cfg.type, metrics["auc"],
             metrics["logloss"])
    out_dir.mkdir(parents=True, exist_ok=True)
    model_dir = save_model(model, out_dir / "model")
    metrics_path = save_metrics(out_dir, metrics, history)
    plot_learning_curve(history, out_dir / "learning_curve.png", title=f"{cfg.type}: validation AUC {metrics['auc']:.4f}")
    return TrainOutput(model_dir=model_dir, metrics=metrics, history=history, metrics_path=metrics_path)


def architecture_note(features, model_type: str) -> Optional[str]:
    """A warning for a model type that fits the features badly, else None. DLRM without a continuous
    feature: Merlin's DLRM then feeds its top MLP the pairwise dot products of the embeddings alone (no
    bottom MLP), and on a MovieLens-layout log with categorical features only it lost to logistic regression
    (validation AUC 0.7813 against 0.7839) where DCN-v2 beat it (0.7925) and DLRM with the age bucket as a
    continuous feature reached 0.7931 (docs/ranking.md)."""
    from merlin.schema import Tags

    if model_type != "dlrm" or len(features.select_by_tag(Tags.CONTINUOUS)) > 0:
        return None
    return ("dlrm without any continuous feature: its top MLP sees only the pairwise dot products of the "
            "embeddings; consider model.type: dcn, or a numeric feature as kind: continuous (docs/ranking.md)")


def predict_dataset(model, dataset, batch_size: int) -> np.ndarray:
    """Scores for every row of a transformed dataset, in file order."""
    import merlin.models.tf as mm

    loader = mm.Loader(dataset, batch_size=batch_size, shuffle=False)
    return np.asarray(model.predict(loader, verbose=0)).reshape(-1)


def raw_scores(workflow, model_dir: Optional[Path], raw, label: str, batch_size: int = 1024,
               encoder: Optional[tuple] = None) -> np.ndarray:
    """The model's scores for raw rows on the training-time path: NVTabular ``Workflow.transform``
    of the rows as a Dataset, then the trained SavedModel's serving signature on batches of the
    transformed rows (``encoder``: the SavedModel of ``model_dir`` already loaded). What export's
    parity check and the test-split figures score with (``pipeline_lib.export.ranking.offline_scores``)."""
    from merlin.io import Dataset

    from pipeline_lib.models.common import load_encoder
    from pipeline_lib.models.retrieval import encode

    frame = raw.copy()
    if label not in frame.columns:
        frame[label] = 0  # the workflow's fitted graph includes the label column
    transformed = workflow.transform(Dataset(frame, cpu=True)).to_ddf().compute()
    if not len(transformed):
        return np.array([], dtype=np.float32)
    features = [c for c in transformed.columns if c != label]
    if encoder is None:
        if model_dir is None:
            raise ValueError("raw_scores needs the model: an encoder or its model_dir")
        encoder = load_encoder(model_dir)
    return encode(encoder, transformed[features], batch_size=batch_size).reshape(-1)


def ranking_metrics(labels: np.ndarray, scores: np.ndarray) -> dict:
    labels = np.asarray(labels).reshape(-1)
    scores = np.clip(np.asarray(scores, dtype=np.float64).reshape(-1), 1e-7, 1 - 1e-7)
    return {
        "auc": float(roc_auc_score(labels, scores)),
        "logloss": float(log_loss(labels, scores, labels=[0, 1])),
        "positive_rate": float(labels.mean()),
    }
