"""Baselines beside the model (pipeline_lib.models.baselines): hand-computed values on tiny inline data,
plus one synthetic sanity check where taste-aware baselines beat most-popular."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from sklearn.metrics import log_loss, roc_auc_score

from pipeline_lib.models import baselines as bl

# 4 training users x 5 items (A..E):
#      A B C D E
#  u1  1 1 . . .
#  u2  1 . 1 . .
#  u3  1 1 . 1 .
#  u4  . . 1 . 1
# popularity: A 3, B 2, C 2, D 1, E 1 -> catalogue order A, B, C, D, E (ties by id)
TRAIN = pd.DataFrame({"user": ["u1", "u1", "u2", "u2", "u3", "u3", "u3", "u4", "u4"],
                      "item": ["A", "B", "A", "C", "A", "B", "D", "C", "E"]})
# u1 holds out two items; u5 is a cold user; u4's "Z" is not in the catalogue
VALID = pd.DataFrame({"user": ["u1", "u1", "u2", "u3", "u5", "u4"],
                      "item": ["C", "D", "B", "E", "A", "Z"]})


def _protocol(**kw) -> bl.TopKProtocol:
    return bl.TopKProtocol.build(TRAIN, VALID, "user", "item", **kw)


def _topk_ids(p: bl.TopKProtocol, scorer, k: int, batch_size=None) -> dict:
    idx = p.topk(scorer, k, batch_size)
    return {u: [p.item_ids[i] for i in row if i >= 0] for u, row in zip(p.users, idx)}


# --- protocol -------------------------------------------------------------------------------

def test_protocol_users_relevant_seen_and_catalogue():
    p = _protocol()
    assert list(p.item_ids) == ["A", "B", "C", "D", "E"]
    assert list(p.popularity) == [3, 2, 2, 1, 1]
    assert list(p.users) == ["u1", "u2", "u3", "u5"]           # u4's only item is unknown
    assert p.relevant == [{"C", "D"}, {"B"}, {"E"}, {"A"}]
    assert p.seen == [{"A", "B"}, {"A", "C"}, {"A", "B", "D"}, set()]
    assert p.stats["n_cold_users"] == 1
    assert p.stats["n_relevant_unknown_item"] == 1
    assert p.stats["n_users_no_relevant"] == 1


def test_most_popular_exact_ranking_with_seen_exclusion():
    p = _protocol()
    top = _topk_ids(p, bl.popularity_scorer(p), 2)
    assert top == {"u1": ["C", "D"], "u2": ["B", "D"], "u3": ["C", "E"], "u5": ["A", "B"]}
    res = bl.retrieval_baselines(TRAIN, VALID, "user", "item", k=[1, 2])["most_popular"]
    # recall@2: u1 2/min(2,2), u2 1/1, u3 1/1, u5 1/1; ndcg@2: u3 hits at rank 2 -> 1/log2(3)
    assert res["recall@2"] == pytest.approx(1.0)
    assert res["ndcg@2"] == pytest.approx((1 + 1 + 1 / math.log2(3) + 1) / 4)
    # recall@1: u1 1/min(1,2)=1, u2 1, u3 0, u5 1
    assert res["recall@1"] == pytest.approx(0.75)
    assert res["n_users"] == 4


def test_without_seen_exclusion_seen_items_are_recommended_and_stay_relevant():
    train = pd.concat([TRAIN, pd.DataFrame({"user": ["u1"], "item": ["D"]})])   # u1 saw D in train
    p = bl.TopKProtocol.build(train, VALID, "user", "item", exclude_seen=False)
    assert p.relevant[0] == {"C", "D"}
    assert _topk_ids(p, bl.popularity_scorer(p), 2)["u1"] == ["A", "B"]
    q = bl.TopKProtocol.build(train, VALID, "user", "item", exclude_seen=True)
    assert q.relevant[0] == {"C"} and q.stats["n_relevant_seen_dropped"] == 1


def test_cosine_cooccurrence_by_hand():
    p = _protocol()
    sim = bl.cosine_similarity_matrix(p.full_train_matrix).toarray()
    a, b, c, d = 0, 1, 2, 3
    assert sim[a, b] == pytest.approx(2 / math.sqrt(3 * 2))     # co-count 2, counts 3 and 2
    assert sim[b, d] == pytest.approx(1 / math.sqrt(2 * 1))
    assert np.all(np.diag(sim) == 0)
    # u1 trained on A, B: score(D) = cos(A,D) + cos(B,D), score(C) = cos(A,C) + cos(B,C)
    scores = bl.cooccurrence_scorer(p)(np.array([0]), p.train_matrix[[0]])[0]
    assert scores[d] == pytest.approx(1 / math.sqrt(3) + 1 / math.sqrt(2))
    assert scores[c] == pytest.approx(1 / math.sqrt(6))
    assert scores[4] == 0.0
    assert _topk_ids(p, bl.cooccurrence_scorer(p), 2)["u1"] == ["D", "C"]


def test_ease_equals_direct_numpy_formula():
    p = _protocol()
    lam = 0.5
    x = p.full_train_matrix.toarray()
    pm = np.linalg.inv(x.T @ x + lam * np.eye(x.shape[1]))
    expected = np.eye(x.shape[1]) - pm @ np.diag(1.0 / np.diag(pm))
    got = bl.ease_weights(p.full_train_matrix, lam)
    np.testing.assert_allclose(got, expected, atol=1e-12)
    np.testing.assert_allclose(np.diag(got), 0.0, atol=1e-12)
    s = bl.ease_scorer(p, lam)(np.arange(3), p.train_matrix[:3])
    np.testing.assert_allclose(s, p.train_matrix[:3].toarray() @ expected, atol=1e-12)


def test_ease_skipped_above_max_items_with_reason():
    res = bl.retrieval_baselines(TRAIN, VALID, "user", "item", k=2, ease_max_items=4)
    assert "skipped" in res["ease"] and "5 items" in res["ease"]["skipped"]
    assert "recall@2" in res["most_popular"] and "recall@2" in res["item_cooccurrence"]
    assert "recall@2" in bl.retrieval_baselines(TRAIN, VALID, "user", "item", k=2, ease_max_items=5)["ease"]


def test_cold_users_fall_back_to_popularity():
    p = _protocol()
    pop = _topk_ids(p, bl.popularity_scorer(p), 5)["u5"]
    assert pop == ["A", "B", "C", "D", "E"]
    assert _topk_ids(p, bl.cooccurrence_scorer(p), 5)["u5"] == pop
    assert _topk_ids(p, bl.ease_scorer(p, 1.0), 5)["u5"] == pop


# --- metrics ---------------------------------------------------------------------------------

def test_recall_ndcg_hand_checked():
    recs = [["a", "b", "c"], ["x", "y", "z"], ["q", "r", "s"]]
    rel = [{"b", "z"}, {"x"}, {"nope"}]
    m = bl.topk_metrics(recs, rel, k=[1, 3])
    # user 1: hit at rank 2 of 2 relevant; user 2: hit at rank 1; user 3: nothing
    assert m["recall@3"] == pytest.approx((1 / 2 + 1 + 0) / 3)
    assert m["ndcg@3"] == pytest.approx(((1 / math.log2(3)) / (1 + 1 / math.log2(3)) + 1 + 0) / 3)
    assert m["recall@1"] == pytest.approx((0 + 1 + 0) / 3)
    # 2 relevant items, k=1, hit at rank 1: recall = 1 / min(1, 2) = 1
    m1 = bl.topk_metrics([["b"]], [{"b", "z"}], k=1)
    assert m1["recall@1"] == 1.0 and m1["ndcg@1"] == 1.0
    assert m["n_users"] == 3


def test_metrics_duplicates_padding_and_users_without_relevant():
    m = bl.topk_metrics([["b", "b", "z"], [-1, -1, -1], ["a"]], [{"b", "z"}, {"a"}, set()], k=3)
    assert m["n_users"] == 2                       # the user with nothing relevant is skipped
    assert m["recall@3"] == pytest.approx((1.0 + 0.0) / 2)   # repeated "b" counts once


def test_drop_seen_and_evaluate_topk_same_as_internal_protocol():
    p = _protocol()
    over = [["A", "B", "C", "D"], ["A", "B", "C", "D"], ["A", "B", "C", "D"], ["A", "B", "C", "D"]]
    ids = bl.drop_seen(over, p.seen, 2)
    assert ids == [["C", "D"], ["B", "D"], ["C"], ["A", "B"]]
    internal = p.evaluate_scores(bl.popularity_scorer(p), k=2)
    external = p.evaluate_topk(list(_topk_ids(p, bl.popularity_scorer(p), 2).values()), k=2)
    assert internal == external


def test_topk_indices_ties_and_infinities():
    s = np.array([[1.0, 3.0, 3.0, -np.inf, 3.0], [-np.inf, 2.0, np.nan, -np.inf, -np.inf]])
    np.testing.assert_array_equal(bl.topk_indices(s, 3), [[1, 2, 4], [1, -1, -1]])
    np.testing.assert_array_equal(bl.topk_indices(s, 7)[0], [1, 2, 4, 0, -1, -1, -1])


def test_batching_gives_the_same_result():
    rng = np.random.default_rng(3)
    train, valid = _taste_data(rng, n_users=120, n_items=60)
    p = bl.TopKProtocol.build(train, valid, "user", "item")
    for make in (bl.popularity_scorer, bl.cooccurrence_scorer, lambda q: bl.ease_scorer(q, 10.0)):
        scorer = make(p)
        np.testing.assert_array_equal(p.topk(scorer, 10, batch_size=7), p.topk(scorer, 10, batch_size=10_000))
    assert (bl.retrieval_baselines(train, valid, "user", "item", batch_size=1, protocol=p)["ease"]["recall@10"]
            == bl.retrieval_baselines(train, valid, "user", "item", protocol=p)["ease"]["recall@10"])


def test_label_column_selects_positives():
    train = TRAIN.assign(rating=[5, 5, 5, 5, 5, 5, 5, 5, 1])     # u4 rated E 1: not a positive
    valid = VALID.assign(rating=[5, 5, 5, 5, 5, 5])
    p = bl.TopKProtocol.build(train, valid, "user", "item", label="rating", min_label=4)
    assert list(p.popularity) == [3, 2, 2, 1, 0] and list(p.item_ids) == ["A", "B", "C", "D", "E"]
    assert p.seen[0] == {"A", "B"}


# --- ranking ---------------------------------------------------------------------------------

def test_logistic_regression_separable_and_sklearn_auc():
    rng = np.random.default_rng(0)
    n = 400
    cat = rng.choice(["x", "y", "z"], n)
    df = pd.DataFrame({"user": rng.integers(0, 30, n), "item": rng.integers(0, 20, n), "cat": cat,
                       "click": (cat == "x").astype(int)})
    train, valid = df.iloc[:300], df.iloc[300:]
    res = bl.ranking_baselines(train, valid, "click", ["user", "item", "cat"], item_col="item",
                               return_predictions=True)
    lr = res["logistic_regression"]
    assert lr["auc"] > 0.9
    assert lr["auc"] == roc_auc_score(valid["click"], lr["predictions"])
    assert lr["logloss"] == pytest.approx(log_loss(valid["click"], lr["predictions"]))
    again = bl.ranking_baselines(train, valid, "click", ["user", "item", "cat"], item_col="item")
    assert again["logistic_regression"]["auc"] == lr["auc"]                 # deterministic
    capped = bl.ranking_baselines(train, valid, "click", ["user", "item", "cat"], max_rows=100)
    assert capped["logistic_regression"]["n_train"] == 100
    assert "skipped" in capped["item_click_rate"]


def test_logistic_regression_reads_numeric_and_list_columns():
    """etl.history's features reach the baseline: a label driven by a numeric column (with NaNs) and by a
    list column is learned only when they are given; unseen list values and NaNs do not break it."""
    rng = np.random.default_rng(1)
    n = 600
    rate = rng.random(n)
    rate[rng.random(n) < 0.1] = np.nan
    hist = [rng.integers(0, 8, rng.integers(0, 3)) for _ in range(n)]
    click = ((np.nan_to_num(rate, nan=0.5) > 0.5) ^ np.array([3 in h for h in hist])).astype(int)
    df = pd.DataFrame({"user": rng.integers(0, 30, n), "rate": rate, "count": rng.integers(0, 50, n),
                       "hist": hist, "click": click})
    train, valid = df.iloc[:450], df.iloc[450:].copy()
    valid.loc[valid.index[0], "hist"] = np.array([99])  # a value never seen in training
    plain = bl.ranking_baselines(train, valid, "click", ["user"])["logistic_regression"]
    numeric = bl.ranking_baselines(train, valid, "click", ["user"], numeric=["rate", "count"],
                                   log_numeric=["count"])["logistic_regression"]
    both = bl.ranking_baselines(train, valid, "click", ["user"], numeric=["rate", "count"], log_numeric=["count"],
                                lists=["hist"])["logistic_regression"]
    assert plain["auc"] < 0.65 < numeric["auc"] < both["auc"]
    assert both["n_features"] == plain["n_features"] + 2 + 8


def test_item_click_rate_by_hand():
    train = pd.DataFrame({"item": ["a", "a", "a", "a", "b"], "click": [1, 1, 0, 0, 0]})
    valid = pd.DataFrame({"item": ["a", "b", "c"], "click": [1, 0, 0]})
    res = bl.ranking_baselines(train, valid, "click", [], item_col="item", smoothing=1.0,
                               return_predictions=True)
    glob = 2 / 5
    expected = [(2 + glob) / (4 + 1), (0 + glob) / (1 + 1), glob]   # c unseen: the global rate
    np.testing.assert_allclose(res["item_click_rate"]["predictions"], expected)
    assert res["item_click_rate"]["auc"] == 1.0
    assert res["item_click_rate"]["logloss"] == pytest.approx(-(math.log(0.48) + math.log(0.8) + math.log(0.6)) / 3)
    assert "skipped" in res["logistic_regression"]


def test_single_class_validation_gives_nan_auc_with_reason():
    train = pd.DataFrame({"item": ["a", "b", "a", "b"], "click": [1, 0, 1, 0]})
    valid = pd.DataFrame({"item": ["a", "b"], "click": [0, 0]})
    res = bl.ranking_baselines(train, valid, "click", ["item"], item_col="item")
    for r in res.values():
        assert math.isnan(r["auc"]) and "single class" in r["auc_reason"]
        assert math.isfinite(r["logloss"])


# --- lift ------------------------------------------------------------------------------------

def test_lift_sentence_wording():
    base = {"most_popular": {"recall@10": 0.1}, "ease": {"recall@10": 0.1895},
            "big": {"skipped": "catalogue too large"}}
    s = bl.lift_sentence("two_tower", 0.2130, base, "recall@10")
    assert s.startswith("two_tower recall@10 0.2130 is 12.4% above the best baseline (ease 0.1895)")
    assert "big skipped: catalogue too large" in s
    s = bl.lift_sentence("two_tower", 0.1798, base, "recall@10")
    assert "5.1% BELOW the best baseline (ease 0.1895)" in s
    assert "not available (NaN)" in bl.lift_sentence("two_tower", float("nan"), base, "recall@10")
    nan_base = {"ease": {"recall@10": float("nan")}, "big": {"skipped": "x"}}
    assert "no baseline to compare against" in bl.lift_sentence("m", 0.2, nan_base, "recall@10")
    s = bl.lift_sentence("dlrm", 0.45, {"lr": {"logloss": 0.5}, "ctr": {"logloss": 0.6}}, "logloss")
    assert "10.0% lower (better) than the best baseline (lr 0.5000)" in s


# --- synthetic sanity ------------------------------------------------------------------------

def _taste_data(rng, n_users=400, n_items=200, n_groups=8, per_user=15, own=0.85):
    """Every user draws mostly from their own item group; 20% of each user's items held out."""
    group = rng.integers(0, n_groups, n_items)
    pop = 1.0 / np.arange(1, n_items + 1) ** 0.6
    rows = []
    for u in range(n_users):
        g = rng.integers(0, n_groups)
        mine = np.where(group == g)[0]
        w = np.where(group == g, own / pop[mine].sum() * pop, (1 - own) / pop[group != g].sum() * pop)
        items = rng.choice(n_items, size=min(per_user, n_items), replace=False, p=w / w.sum())
        rows += [(u, int(i)) for i in items]
    df = pd.DataFrame(rows, columns=["user", "item"])
    held = rng.random(len(df)) < 0.2
    return df[~held], df[held]


def test_taste_aware_baselines_beat_most_popular():
    rng = np.random.default_rng(1)
    train, valid = _taste_data(rng)
    assert len(train) + len(valid) >= 5000
    res = bl.retrieval_baselines(train, valid, "user", "item", k=10, ease_lambda=50.0)
    mp = res["most_popular"]["recall@10"]
    assert res["item_cooccurrence"]["recall@10"] > 1.2 * mp
    assert res["ease"]["recall@10"] > 1.2 * mp
    assert res["ease"]["ndcg@10"] > res["most_popular"]["ndcg@10"]
    print({n: round(r["recall@10"], 4) for n, r in res.items()})


@pytest.mark.parametrize("taste_exposure", [1.5, 0.0])
def test_on_the_synthetic_generator_taste_aware_methods_beat_most_popular_only_with_personal_exposure(taste_exposure):
    """The embedded default's generator: exposure follows each user's taste, so EASE and
    co-occurrence beat most-popular per user by far; with exposure by popularity alone
    (``taste_exposure: 0``) they do not, which is what the first case measures."""
    from pipeline_lib.config import SyntheticConfig
    from pipeline_lib.data.synthetic import generate_interactions

    df = generate_interactions(SyntheticConfig(n_users=500, n_items=300, n_interactions=20_000,
                                               taste_exposure=taste_exposure), 0)
    va = np.random.default_rng(0).random(len(df)) < 0.2
    res = bl.retrieval_baselines(df[~va], df[va], "user_id", "item_id", k=10, label="click")
    mp = res["most_popular"]["recall@10"]
    best = max(res["ease"]["recall@10"], res["item_cooccurrence"]["recall@10"])
    if taste_exposure:
        assert best > 1.8 * mp                       # 0.35 vs 0.16 here
    else:
        assert best < 1.1 * mp                       # 0.35 vs 0.36: popularity is all there is


def test_history_joins_the_users_rows_and_popularity_but_not_the_fit_or_the_catalogue():
    """The test split's protocol: the validation positives (``history``) are the users' history too --
    scored from, excluded, counted in the popularity -- while the catalogue and the matrix models fit on
    stay the training split's; a history item outside the catalogue is ignored, a user known only from
    the history is no longer cold."""
    history = pd.DataFrame({"user": ["u1", "u5", "u5", "u4"], "item": ["C", "B", "Z", "D"]})
    test = pd.DataFrame({"user": ["u1", "u1", "u5", "u4"], "item": ["C", "E", "A", "A"]})
    plain = bl.TopKProtocol.build(TRAIN, test, "user", "item")
    p = bl.TopKProtocol.build(TRAIN, test, "user", "item", history=history)
    assert sorted(p.item_ids) == sorted(plain.item_ids) == ["A", "B", "C", "D", "E"]   # no "Z"
    assert (p.full_train_matrix != plain.full_train_matrix).nnz == 0                  # the fit: train only
    assert dict(zip(p.item_ids, p.popularity)) == {"A": 3, "B": 3, "C": 3, "D": 2, "E": 1}
    assert list(p.users) == ["u1", "u5", "u4"]
    assert p.seen == [{"A", "B", "C"}, {"B"}, {"C", "D", "E"}]   # u1's C (history) is seen: no longer relevant
    assert p.relevant == [{"E"}, {"A"}, {"A"}] and plain.relevant[0] == {"C", "E"}
    assert p.stats["n_cold_users"] == 0 and plain.stats["n_cold_users"] == 1 and p.stats["history"] == "train + validation"
    # a history-aware scorer reads the history rows: item-item co-occurrence fitted on train scores u5 from B
    top = _topk_ids(p, bl.cooccurrence_scorer(p), 1)
    assert top["u5"] == ["A"]
