"""Classical top-k versions (ease, item_knn; and the autoencoders, served the same way): what the exported
recommender answers equals the training-time protocol user for user; seen items and exclude_item_ids are never
returned; unknown users get the most popular items; a row with fewer than k returnable items is padded. Served over Triton in tests/integration/test_classical.py."""
import json

import numpy as np
import pandas as pd
import pytest

from pipeline_lib.config import AutoencoderConfig, ClassicalConfig, ModelConfig, RetrievalConfig
from pipeline_lib.export import classical as export
from pipeline_lib.export.recommenders import open_recommender
from pipeline_lib.export.topk import EXCLUDE_INPUT, TOPK_DIR, TopKRecommender, TopKSettings
from pipeline_lib.models import baselines as bl
from pipeline_lib.models import classical
from pipeline_lib.release.gate import score_topk_version

from tests.unit.models.test_classical import COLUMNS, interactions

STRING_IDS = np.array([f"sku-{i:03d}" for i in range(40)], dtype=object)


def _version(tmp, kind: str, item_ids=None, k: int = 10, **cfg):
    df = interactions(seed=3, item_ids=item_ids)
    train, valid = df.iloc[:700], df.iloc[700:]
    train.to_parquet(tmp / "train.parquet")
    valid.to_parquet(tmp / "valid.parquet")
    model = ModelConfig(type=kind, classical=ClassicalConfig(**cfg), retrieval=RetrievalConfig(k=k),
                        autoencoder=AutoencoderConfig(hidden_dim=16, batch_size=16, epochs=4))  # mult_dae / mult_vae
    out = classical.train(tmp / "train.parquet", tmp / "valid.parquet", COLUMNS, model, tmp / "model")
    settings = TopKSettings(COLUMNS, k=k, exclude_seen=True)
    exp = export.export_classical(out.model_dir, tmp / "train.parquet", valid.head(16), settings, tmp / "staging",
                                  "recsys")
    return out, exp, train, valid


@pytest.fixture(scope="module")
def ease(tmp_path_factory):
    return _version(tmp_path_factory.mktemp("ease"), "ease")


@pytest.mark.parametrize("kind,ids", [("ease", None), ("item_knn", STRING_IDS), ("mult_vae", STRING_IDS)])
def test_served_recommender_reproduces_the_training_metric(tmp_path, monkeypatch, ease, kind, ids):
    out, exp, train, valid = ease if kind == "ease" else _version(tmp_path, kind, ids)
    p = bl.TopKProtocol.build(train, valid, "user_id", "item_id", "click")
    rec = open_recommender(exp.version_dir / TOPK_DIR)  # a fresh load of the staged version, by its kind
    assert isinstance(rec, export.ClassicalRecommender) and rec.request_columns == ["user_id"]
    got, scores = rec.recommend(pd.DataFrame({"user_id": p.users}))
    assert got.shape == (len(p.users), 10) and np.isfinite(scores).all()
    assert all((np.diff(row) <= 0).all() for row in scores)  # best first
    res = p.evaluate_topk(got.tolist(), 10)
    monkeypatch.setattr(export, "DEFAULT_BLOCK_ELEMENTS", 3 * len(rec.item_ids))  # 3 users per block: same answer
    blocks = rec.recommend(pd.DataFrame({"user_id": p.users}))
    np.testing.assert_array_equal(blocks[0], got)
    np.testing.assert_array_equal(blocks[1], scores)
    assert res["recall@10"] == out.metrics["user_recall@10"] and res["ndcg@10"] == out.metrics["user_ndcg@10"]
    seen = p.seen
    assert all(not (set(row) & s) for row, s in zip(got.tolist(), seen))  # seen items never come back
    spec = json.loads((exp.version_dir / TOPK_DIR / "spec.json").read_text())
    assert spec["kind"] == "classical" and spec["fast_transform"]["enabled"] is False
    assert (exp.version_dir / TOPK_DIR / classical.MLP_WEIGHTS).is_file() == (kind == "mult_vae")
    assert exp.parity["rows"] == 16 and exp.parity["max_abs_score_diff"] == 0.0
    config = (exp.config_path).read_text()
    assert "exclude_item_ids__values" in config and "user_id" in config


def test_exclusions_unknown_users_and_short_rows(ease):
    _, exp, train, _ = ease
    rec = exp.recommender
    pop = rec.item_ids[:10].tolist()  # the catalogue is in popularity order
    ids, scores = rec.recommend(pd.DataFrame({"user_id": [12345, 12345]}))
    assert ids[0].tolist() == pop and scores[0].tolist() == rec.popularity[:10].astype(np.float32).tolist()
    ids, _ = rec.recommend(pd.DataFrame({"user_id": [12345], EXCLUDE_INPUT: [[pop[0], pop[3], 99999]]}))
    assert ids[0].tolist() == [i for i in rec.item_ids[:12].tolist() if i not in (pop[0], pop[3])]
    user = int(train.loc[train.click > 0, "user_id"].iloc[0])
    plain, _ = rec.recommend(pd.DataFrame({"user_id": [user]}))
    ids, _ = rec.recommend(pd.DataFrame({"user_id": [user], EXCLUDE_INPUT: [[int(plain[0, 0])]]}))
    assert ids[0, :9].tolist() == plain[0, 1:].tolist()
    # everything but 3 items excluded: 3 items, then padding at -inf -- no excluded id is returned
    keep = set(rec.item_ids[[5, 7, 9]].tolist())
    seen = set(rec.item_ids[rec.history([user])[0].indices].tolist())
    excl = [i for i in rec.item_ids.tolist() if i not in keep]
    ids, scores = rec.recommend(pd.DataFrame({"user_id": [12345, user], EXCLUDE_INPUT: [excl, excl]}))
    assert set(ids[0, :3].tolist()) == keep and ids[0, 3:].tolist() == [-1] * 7 and np.isneginf(scores[0, 3:]).all()
    assert set(ids[1].tolist()) - {-1} == keep - seen and (ids[1] == -1).sum() == 10 - len(keep - seen)


def test_gate_scores_a_classical_version_through_its_recommender(ease):
    _, exp, _, valid = ease
    m = score_topk_version(exp.version_dir, valid, "click")
    assert m == score_topk_version(exp.version_dir, valid, "click", rec=exp.recommender)
    assert 0.0 < m["recall"] <= 1.0 and m["n_queries"] == int((valid.click == 1).sum())


def test_two_stage_reranks_the_classical_candidates_with_the_ranking_model(trained, tmp_path):
    """ease proposes 30 candidates per row, the run's DLRM (same ETL output) re-scores them, the 10 best come back;
    in-process (NVTabular) equals the ranking pipeline's offline path (checked at export, and here)."""
    from pipeline_lib.export import ranking as ranking_export

    cfg = trained.cfg
    model = ModelConfig(type="ease", retrieval=RetrievalConfig(rerank_with="dlrm", candidates=30))
    out = classical.train(trained.split.train, trained.split.valid, cfg.columns, model, tmp_path / "ease")
    settings = TopKSettings(cfg.columns, k=10, ranker_dir=trained.model.model_dir, candidates=30)
    valid = pd.read_parquet(trained.split.valid)
    exp = export.export_classical(out.model_dir, trained.split.train, valid.head(8), settings, tmp_path / "staging",
                                  "recsys", workflow_dir=trained.etl.workflow_dir)
    rec = exp.recommender
    assert rec.request_columns[0] == "user_id" and set(rec.request_columns) == set(cfg.columns.serving_columns) - {
        "item_id", "item_category", "item_price", "item_tags"}
    rows = valid.iloc[20:24][rec.request_columns].reset_index(drop=True)
    ids, scores = rec.recommend(rows)
    cands, _ = rec.retrieve(rows)
    frame = TopKRecommender.rank_frame(rec, rows, cands)
    rank = ranking_export.offline_scores(rec.workflow_with_label, rec.dir / "ranker", frame[rec.ranker_columns],
                                         "click").reshape(cands.shape)
    for i in range(len(rows)):
        best = sorted(zip(rank[i], cands[i]), key=lambda t: -t[0])[:10]
        assert ids[i].tolist() == [c for _, c in best]
        np.testing.assert_allclose(scores[i], [s for s, _ in best], atol=1e-5)
    off = rec.offline(rows)
    np.testing.assert_array_equal(off[0], ids)


def test_a_version_with_the_validation_split_as_history_answers_like_the_test_protocol(tmp_path):
    """Three-way split: the exported version knows its users by train + validation (``raw_history``):
    its answers for the test users equal the test protocol's (weights fitted on train, the users' rows and
    seen items = train + validation), and a validation item never comes back to its user."""
    from pipeline_lib.models.evaluation import classical_model_scorer

    df = interactions(seed=5)
    train, valid, test = df.iloc[:600], df.iloc[600:750], df.iloc[750:]
    for name, part in (("train", train), ("valid", valid), ("test", test)):
        part.to_parquet(tmp_path / f"{name}.parquet")
    model = ModelConfig(type="ease", retrieval=RetrievalConfig(k=10))
    out = classical.train(tmp_path / "train.parquet", tmp_path / "valid.parquet", COLUMNS, model, tmp_path / "model")
    exp = export.export_classical(out.model_dir, tmp_path / "train.parquet", valid.head(8),
                                  TopKSettings(COLUMNS, k=10, exclude_seen=True), tmp_path / "staging", "recsys",
                                  raw_history=tmp_path / "valid.parquet")
    p = bl.TopKProtocol.build(train, test, "user_id", "item_id", "click", history=valid)
    got, _ = exp.recommender.recommend(pd.DataFrame({"user_id": p.users}))
    want = p.topk(classical_model_scorer(out.model_dir, p), 10)
    assert got.tolist() == [[p.item_ids[i] for i in row] for row in want]
    later = valid[valid.click > 0].groupby("user_id")["item_id"].apply(set)
    assert any(u in later.index for u in p.users)
    assert all(not (set(row) & later.get(u, set())) for u, row in zip(p.users, got.tolist()))
    plain = export.export_classical(out.model_dir, tmp_path / "train.parquet", valid.head(8),
                                    TopKSettings(COLUMNS, k=10, exclude_seen=True), tmp_path / "staging2", "recsys")
    assert plain.recommender.recommend(pd.DataFrame({"user_id": p.users}))[0].tolist() != got.tolist()


def test_user_id_version_keeps_a_snapshot_of_the_users_train_and_validation_positives(tmp_path):
    """``features``: the version's snapshot holds each user's train + validation positives (``history_item_ids``);
    sent as the request's history (what the store gives a user-id request), they give the answer seen.npz gives;
    an empty history is an unknown user (most popular); the history is also what is excluded."""
    from pipeline_lib.features import snapshot
    from pipeline_lib.features.classical import write_classical_snapshot

    df = interactions(seed=5)
    train, valid = df.iloc[:600], df.iloc[600:750]
    train.to_parquet(tmp_path / "train.parquet")
    valid.to_parquet(tmp_path / "valid.parquet")
    out = classical.train(tmp_path / "train.parquet", tmp_path / "valid.parquet", COLUMNS,
                          ModelConfig(type="ease", retrieval=RetrievalConfig(k=10)), tmp_path / "model")
    exp = export.export_classical(out.model_dir, tmp_path / "train.parquet", valid.head(8),
                                  TopKSettings(COLUMNS, k=10), tmp_path / "staging", "recsys",
                                  raw_history=tmp_path / "valid.parquet", features=True)
    write_classical_snapshot(exp, tmp_path / "train.parquet", tmp_path / "valid.parquet", COLUMNS)
    rec, art = exp.recommender, exp.version_dir / TOPK_DIR
    assert rec.request_columns == ["user_id"] and rec.lookup_columns == ["user_id", export.HISTORY_INPUT]
    assert exp.parity["rows"] == 8 and exp.parity["max_abs_score_diff"] == 0.0
    config = exp.config_path.read_text()
    assert "history_item_ids__values" in config and "cold_start" in config
    snap = snapshot.Snapshot.load(snapshot.snapshot_dir(art))
    both = pd.concat([train, valid])
    assert snap.user_columns == [export.HISTORY_INPUT] and snap.n_users == both["user_id"].nunique()
    users = snapshot.stored_users(art, snap.n_users)
    rows = snapshot.offline_rows(art, users + [10**6])
    positives = both[both.click > 0].groupby("user_id")["item_id"].apply(set)
    assert all(set(h) == positives.get(u, set()) for u, h in zip(rows["user_id"], rows[export.HISTORY_INPUT]))
    assert rows[export.HISTORY_INPUT].iloc[-1] == []  # the cold-start row
    from_store = rec.recommend(rows)
    from_seen = rec.offline(rows[["user_id"]])
    np.testing.assert_array_equal(from_store[0], from_seen[0])
    np.testing.assert_array_equal(from_store[1], from_seen[1])
    # another user's history scores like that user, and that history is excluded
    other = rows.iloc[[0]].assign(user_id=[10**6 + 1])
    np.testing.assert_array_equal(rec.recommend(other)[0], from_seen[0][:1])
    plain = export.export_classical(out.model_dir, tmp_path / "train.parquet", valid.head(8),
                                    TopKSettings(COLUMNS, k=10), tmp_path / "staging2", "recsys")
    with pytest.raises(ValueError, match="exported without features"):
        write_classical_snapshot(plain, tmp_path / "train.parquet", None, COLUMNS)
