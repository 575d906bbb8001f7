"""Classical retrieval models (ease, item_knn): their weights and per-user validation metrics equal the
baselines' scorers under the same top-k protocol; the config rules of the two types; lineage of their folder.
Export and serving of their versions: tests/unit/export/test_classical.py, tests/integration/test_classical.py."""
import json

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from pipeline_lib.config import ClassicalConfig, ColumnsConfig, ModelConfig, load_config
from pipeline_lib.models import baselines as bl
from pipeline_lib.models import classical
from pipeline_lib.release.lineage import model_fingerprint

COLUMNS = ColumnsConfig(features=[])


def interactions(seed: int = 0, n_users: int = 60, n_items: int = 40, n: int = 900, item_ids=None) -> pd.DataFrame:
    """Users with a taste for one block of items, labels 0/1 (positives: click > 0)."""
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, n)
    block = (users % 4) * (n_items // 4)
    items = np.where(rng.random(n) < 0.7, block + rng.integers(0, n_items // 4, n), rng.integers(0, n_items, n))
    ids = np.asarray(item_ids)[items] if item_ids is not None else items
    return pd.DataFrame({"user_id": users, "item_id": ids, "click": (rng.random(n) < 0.8).astype(np.int64)})


@pytest.fixture(scope="module")
def split(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("classical")
    df = interactions()
    train, valid = df.iloc[:700], pd.concat([df.iloc[700:], pd.DataFrame(
        {"user_id": [999, 999], "item_id": [3, 5], "click": [1, 1]})])  # user 999: cold (popular fallback)
    train.to_parquet(tmp / "train.parquet")
    valid.to_parquet(tmp / "valid.parquet")
    return tmp, train, valid


def _model(kind: str, **classical_cfg) -> ModelConfig:
    return ModelConfig(type=kind, classical=ClassicalConfig(**classical_cfg))


@pytest.mark.parametrize("kind,params,baseline", [
    ("ease", {"ease_lambda": 50.0}, "ease"),
    ("item_knn", {"knn_shrinkage": 0.0, "knn_neighbours": None}, "item_cooccurrence"),
])
def test_validation_metrics_equal_the_baselines_scorer(split, tmp_path, kind, params, baseline):
    tmp, train, valid = split
    out = classical.train(tmp / "train.parquet", tmp / "valid.parquet", COLUMNS, _model(kind, **params), tmp_path)
    base = bl.retrieval_baselines(train, valid, "user_id", "item_id", 10, label="click", ease_lambda=50.0)[baseline]
    m = out.metrics
    assert m["user_recall@10"] == pytest.approx(base["recall@10"], abs=1e-12)
    assert m["user_ndcg@10"] == pytest.approx(base["ndcg@10"], abs=1e-12)
    assert m["n_queries"] == base["n_users"] and m["n_cold_users"] == 1
    assert 0.0 < m["recall"] == m["user_recall@10"] <= 1.0
    saved = json.loads((tmp_path / "metrics.json").read_text())["metrics"]
    assert saved["user_recall@10"] == m["user_recall@10"]
    # the saved model: weights in the catalogue's popularity order, scores equal to the baseline's scorer
    p = bl.TopKProtocol.build(train, valid, "user_id", "item_id", "click")
    ids, pop = classical.load_items(out.model_dir)
    assert ids.tolist() == p.item_ids.tolist() and pop.tolist() == p.popularity.tolist()
    want = (bl.ease_scorer(p, 50.0) if kind == "ease" else bl.cooccurrence_scorer(p))(None, p.train_matrix)
    got = classical.scores(p.train_matrix, classical.load_weights(out.model_dir))
    np.testing.assert_allclose(got, want, atol=1e-12)


def test_item_knn_keeps_each_items_top_neighbours_with_shrinkage(split):
    _, train, _ = split
    p = bl.TopKProtocol.build(train, train, "user_id", "item_id", "click")
    full = bl.cosine_similarity_matrix(p.full_train_matrix).toarray()
    shrunk = bl.cosine_similarity_matrix(p.full_train_matrix, shrinkage=5.0).toarray()
    assert (shrunk <= full + 1e-15).all() and (shrunk[full > 0] < full[full > 0]).all()  # shrinkage only lowers
    w = classical.fit_weights(p.full_train_matrix, "item_knn", ClassicalConfig(knn_neighbours=3, knn_shrinkage=5.0))
    assert sp.issparse(w) and (np.diff(w.indptr) <= 3).all() and w.diagonal().sum() == 0
    dense = w.toarray()
    for i in range(dense.shape[0]):
        kept = np.flatnonzero(dense[i])
        assert np.allclose(dense[i, kept], shrunk[i, kept])
        if len(kept):  # nothing dropped is larger than what was kept
            assert np.delete(shrunk[i], kept).max(initial=0.0) <= dense[i, kept].min()


def test_keep_top_n_breaks_ties_by_column():
    m = sp.csr_matrix(np.array([[0.0, 2.0, 2.0, 2.0], [1.0, 0.0, 3.0, 0.0]]))
    assert classical.keep_top_n(m, 2).toarray().tolist() == [[0, 2, 2, 0], [1, 0, 3, 0]]
    assert classical.keep_top_n(m, None).nnz == m.nnz


def test_ease_above_its_item_limit_names_the_limit_and_item_knn(split, tmp_path):
    tmp, _, _ = split
    with pytest.raises(classical.CatalogueTooLarge, match=r"ease_max_items=10 .*item_knn"):
        classical.train(tmp / "train.parquet", tmp / "valid.parquet", COLUMNS, _model("ease", ease_max_items=10),
                        tmp_path)


def test_config_classical_types_are_retrieval_served_by_user_id():
    cfg = load_config(None, {"model": {"type": "ease"}})
    assert cfg.model.is_retrieval and cfg.model.is_classical and cfg.family == "retrieval"
    assert cfg.gate_metric == "recall" and cfg.unknown_users == "popular"
    assert load_config(None, {"model": {"type": "item_knn", "classical": {"knn_neighbours": 20}}}).model.classical.knn_neighbours == 20
    two_stage = load_config(None, {"model": {"type": "ease", "retrieval": {"rerank_with": "dlrm"}}})
    assert two_stage.model.retrieval.rerank_with == "dlrm" and two_stage.family == "retrieval"
    with pytest.raises(ValueError, match="unknown_users: model does not apply"):
        load_config(None, {"model": {"type": "item_knn", "retrieval": {"unknown_users": "model"}}})
    with pytest.raises(ValueError, match="tune applies to the deep models"):
        load_config(None, {"model": {"type": "ease"}, "tune": {"enabled": True}})


def test_lineage_fingerprints_the_classical_weights(split, tmp_path):
    tmp, _, _ = split
    out = classical.train(tmp / "train.parquet", tmp / "valid.parquet", COLUMNS, _model("item_knn"), tmp_path)
    before = model_fingerprint(out.model_dir)
    w = classical.load_weights(out.model_dir)
    w.data[0] += 1.0
    classical.save_weights(out.model_dir, w)
    assert model_fingerprint(out.model_dir) != before
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="holds no file"):
        model_fingerprint(tmp_path / "empty")
