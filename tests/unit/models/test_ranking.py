import json

import numpy as np
import pytest
import tensorflow as tf

from pipeline_lib.data import sources as data
from pipeline_lib.etl import workflow as etl
from pipeline_lib.models import ranking as train
from pipeline_lib.models.common import load_encoder, parquet_dataset
from pipeline_lib.models.retrieval import encode
from pipeline_lib.config import RunConfig


def test_training_writes_model_and_metrics(trained):
    m = trained.model
    assert m.model_dir.joinpath("saved_model.pb").exists()
    saved = json.loads(m.metrics_path.read_text())
    assert 0.5 < saved["metrics"]["auc"] <= 1.0
    assert 0 < saved["metrics"]["logloss"] < 1.0
    assert saved["metrics"]["n_valid"] == m.metrics["n_valid"] > 0
    assert len(saved["history"]["loss"]) == trained.cfg.model.epochs
    sig = tf.saved_model.load(str(m.model_dir)).signatures["serving_default"]
    inputs = set(sig.structured_input_signature[1])
    assert {"user_id", "item_id", "item_tags__values", "item_tags__offsets"} <= inputs
    assert "click" not in inputs
    # saved without Keras' layer traces (train.save_model): the serving signature is the trained model --
    # its scores of the validation rows give the AUC computed in memory before saving
    valid = parquet_dataset(trained.etl.valid_dir).to_ddf().compute()
    scores = encode(load_encoder(m.model_dir), valid.drop(columns=["click"]))
    assert train.ranking_metrics(valid["click"].to_numpy(), scores)["auc"] == pytest.approx(saved["metrics"]["auc"], abs=1e-6)
    assert (m.model_dir / ".merlin" / "output_schema.json").is_file()
    assert set(tf.keras.models.load_model(str(m.model_dir)).signatures) == {"serving_default"}  # Keras loads it too


def test_ranking_metrics_match_known_values():
    labels = np.array([0, 0, 1, 1])
    scores = np.array([0.1, 0.4, 0.35, 0.8])
    got = train.ranking_metrics(labels, scores)
    assert got["auc"] == pytest.approx(0.75)
    assert got["logloss"] == pytest.approx(-np.mean(np.log([0.9, 0.6, 0.35, 0.8])))


def test_default_synthetic_data_is_learnable(tmp_path):
    """Issue requirement: DLRM validation AUC >= 0.70 on the embedded default size."""
    cfg = RunConfig()
    raw = data.write_raw(cfg.data, cfg.seed, tmp_path / "raw")
    split = etl.split_raw(raw, cfg.split, cfg.columns, cfg.seed, tmp_path / "split")
    out = etl.fit_transform(cfg.columns, cfg.etl, split, tmp_path / "t")
    res = train.train(out.train_dir, out.valid_dir, cfg.model, cfg.columns.label, cfg.seed, tmp_path / "m")
    assert res.metrics["auc"] >= 0.70, res.metrics


def test_embedding_l2_pulls_rows_no_training_row_uses_to_zero(trained):
    """embedding_l2 (default on): the user table's padding/null/out-of-vocabulary rows, which no
    training row uses (every training user is in the vocabulary), shrink to ~0 instead of keeping
    their random initial values, so an unseen user adds ~nothing to a score; trained rows do not."""
    from merlin.io import Dataset

    assert trained.cfg.model.embedding_l2 > 0
    rows = Dataset(str(trained.etl.train_dir), engine="parquet").schema["user_id"].int_domain.max + 1
    saved = tf.train.load_checkpoint(str(trained.model.model_dir / "variables" / "variables"))
    tables = [saved.get_tensor(k) for k in saved.get_variable_to_shape_map()
              if k.endswith("user_id/table/embeddings/.ATTRIBUTES/VARIABLE_VALUE")]
    assert len(tables) == 1 and tables[0].shape[0] == rows
    norms = np.linalg.norm(tables[0], axis=1)
    assert norms[:3].max() < 0.5 * np.median(norms[3:]), (norms[:3], np.median(norms[3:]))


# --- moved from tests/test_models.py --------------------------------------------


@pytest.mark.parametrize("kind", ["dlrm", "dcn", "deepfm", "wide_deep"])
def test_model_trains_with_metrics_history_and_learning_curve(ranking_zoo, kind):
    res = ranking_zoo[kind]
    saved = json.loads(res.metrics_path.read_text())
    assert saved["metrics"]["model"] == kind and 0.0 <= saved["metrics"]["auc"] <= 1.0
    assert saved["history"]["val_auc"] and len(saved["history"]["loss"]) == saved["metrics"]["epochs_run"]
    png = res.metrics_path.with_name("learning_curve.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_dlrm_without_a_continuous_feature_gets_a_warning_note():
    """Merlin's DLRM without continuous features has no bottom MLP (docs/ranking.md): the training warns."""
    from merlin.schema import ColumnSchema, Schema, Tags

    cats = [ColumnSchema(n, tags=[Tags.CATEGORICAL]) for n in ("user_id", "item_id")]
    only_cats, with_cont = Schema(cats), Schema(cats + [ColumnSchema("age", tags=[Tags.CONTINUOUS])])
    assert "consider model.type: dcn" in train.architecture_note(only_cats, "dlrm")
    assert train.architecture_note(with_cont, "dlrm") is None
    assert train.architecture_note(only_cats, "dcn") is None
