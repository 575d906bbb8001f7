"""mult_dae / mult_vae (Liang et al. 2018): the numpy forward pass that scores, exports and serves them; training
keeps the best validation epoch and reports the figure of the saved model under the baselines' protocol; the
config rules. Served over Triton beside EASE in tests/integration/test_classical.py; the exported version in
tests/unit/export/test_classical.py."""
import json

import numpy as np
import pytest
import scipy.sparse as sp

from pipeline_lib.config import AutoencoderConfig, ModelConfig, load_config
from pipeline_lib.models import autoencoder, classical
from pipeline_lib.models import baselines as bl
from pipeline_lib.models.autoencoder import HistoryMLP
from pipeline_lib.release.lineage import model_fingerprint

from tests.unit.models.test_classical import COLUMNS, split  # noqa: F401  (the module-scoped split fixture)

SMALL_AE = dict(hidden_dim=16, latent_dim=4, batch_size=16, epochs=6, early_stopping_patience=None)


def _mlp(seed: int = 0, n_items: int = 7, hidden: int = 5) -> HistoryMLP:
    rng = np.random.default_rng(seed)
    return HistoryMLP((rng.normal(size=(n_items, hidden)), rng.normal(size=(hidden, n_items))),
                      (rng.normal(size=hidden), rng.normal(size=n_items)), ("tanh", "linear"))


def test_forward_pass_normalises_the_row_and_scores_an_empty_row_zero(tmp_path):
    m = _mlp()
    x = sp.csr_matrix(np.array([[1, 0, 1, 0, 0, 1, 0], [0] * 7, [0, 1, 0, 0, 0, 0, 0]], dtype=np.float64))
    got = m.scores(x)
    dense = x.toarray()
    row = dense[0] / np.linalg.norm(dense[0])
    want = np.tanh(row @ m.kernels[0] + m.biases[0]) @ m.kernels[1] + m.biases[1]
    np.testing.assert_allclose(got[0], want, atol=1e-12)
    assert (got[1] == 0).all() and got.dtype == np.float64  # no history: the popularity tie-break ranks it
    np.testing.assert_allclose(m.scores(2 * x)[0], got[0], atol=1e-12)  # L2-normalised: scale-free
    # a re-indexed catalogue (input rows, output columns) scores the same items the same
    pos = np.array([3, 0, 6, 1, 5, 2, 4])
    np.testing.assert_allclose(m.aligned(pos).scores(x[:, pos]), got[:, pos], atol=1e-12)
    back = HistoryMLP.load(m.save(tmp_path / autoencoder.MLP_FILE))
    np.testing.assert_array_equal(back.scores(x), got)
    assert classical.scores(x, back).tolist() == got.tolist()  # the classical scorer dispatches to it


@pytest.mark.parametrize("kind", autoencoder.TYPES)
def test_training_keeps_the_best_epoch_and_reports_its_protocol_figure(split, tmp_path, kind):  # noqa: F811
    tmp, train, valid = split
    model = ModelConfig(type=kind, autoencoder=AutoencoderConfig(**SMALL_AE))
    out = classical.train(tmp / "train.parquet", tmp / "valid.parquet", COLUMNS, model, tmp_path, seed=3)
    m, h = out.metrics, out.history
    assert m["model"] == kind and m["epochs_run"] == 6 == len(h["val_recall"]) == len(h["loss"])
    assert m["user_recall@10"] == max(h["val_recall"]) == h["val_recall"][m["best_epoch"] - 1]
    w = classical.load_weights(out.model_dir)
    assert isinstance(w, HistoryMLP) and len(w.kernels) == (4 if kind == "mult_vae" else 2)
    assert w.kernels[0].shape == (40, 16) and m["weights_nnz"] == sum(x.size for x in w.kernels + w.biases)
    stored = np.load(out.model_dir / autoencoder.MLP_FILE)  # Keras' float32 weights, stored exactly as float32
    assert stored["kernel_0"].dtype == np.float32 and w.kernels[0].dtype == np.float64
    p = bl.TopKProtocol.build(train, valid, "user_id", "item_id", "click")
    res = p.evaluate_scores(classical.protocol_scorer(w), 10)  # the saved model is the reported epoch's
    assert res["recall@10"] == m["user_recall@10"] and res["ndcg@10"] == m["user_ndcg@10"]
    popular = bl.retrieval_baselines(train, valid, "user_id", "item_id", 10, label="click")["most_popular"]
    assert m["user_recall@10"] > popular["recall@10"]  # the block structure is learnt
    if kind == "mult_vae":  # the KL weight anneals from 0 (anneal_steps 2000: still small here)
        assert h["beta"][0] < h["beta"][-1] <= 0.2
    spec = json.loads((out.model_dir / classical.SPEC_FILE).read_text())
    assert spec["model_type"] == kind and spec["params"]["hidden_dim"] == 16
    before = model_fingerprint(out.model_dir)  # lineage: the layers' file is fingerprinted
    classical.save_weights(out.model_dir, HistoryMLP(w.kernels, w.biases[:-1] + (w.biases[-1] + 1.0,), w.activations))
    assert model_fingerprint(out.model_dir) != before
    saved = json.loads((tmp_path / "metrics.json").read_text())  # the learning curve's history
    assert saved["history"]["val_recall"] == h["val_recall"]


def test_patience_stops_training(split, tmp_path):  # noqa: F811
    tmp, _, _ = split
    cfg = AutoencoderConfig(**{**SMALL_AE, "epochs": 200, "early_stopping_patience": 2, "learning_rate": 0.05})
    out = classical.train(tmp / "train.parquet", tmp / "valid.parquet", COLUMNS,
                          ModelConfig(type="mult_dae", autoencoder=cfg), tmp_path)
    assert out.metrics["epochs_run"] == out.metrics["best_epoch"] + 2 < 200


def test_config_autoencoders_are_deep_retrieval_served_by_user_id():
    cfg = load_config(None, {"model": {"type": "mult_vae", "autoencoder": {"hidden_dim": 300}}})
    assert cfg.family == "retrieval" and cfg.model.scores_history and not cfg.model.is_classical
    assert cfg.unknown_users == "popular" and cfg.model.autoencoder.hidden_dim == 300
    with pytest.raises(ValueError, match="unknown_users: model does not apply"):
        load_config(None, {"model": {"type": "mult_dae", "retrieval": {"unknown_users": "model"}}})
    with pytest.raises(ValueError, match=r"set model.autoencoder's parameters directly"):
        load_config(None, {"model": {"type": "mult_dae"}, "tune": {"enabled": True}})
    with pytest.raises(ValueError, match="dropout"):
        AutoencoderConfig(dropout=1.0)
