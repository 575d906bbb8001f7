"""Bootstrap intervals (pipeline_lib.models.intervals): coverage on known distributions, AUC by
resampled recomputation, paired differences, per-unit top-k values."""
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from pipeline_lib.models import intervals


def test_mean_interval_covers_the_true_mean_about_95_percent_of_the_time():
    # Bernoulli(0.3) samples of 200 users: the 95% interval must hold 0.3 in ~95% of 200 seeded trials
    rng = np.random.default_rng(0)
    hits = 0
    for trial in range(200):
        iv = intervals.mean_interval(rng.random(200) < 0.3, n_resamples=400, seed=trial)
        hits += iv.lo <= 0.3 <= iv.hi
        assert iv.lo <= iv.value <= iv.hi and iv.n == 200
    assert 0.89 <= hits / 200 <= 0.99, hits


def test_interval_is_seeded_and_narrows_with_more_units():
    rng = np.random.default_rng(1)
    v = rng.normal(size=2000)
    a, b = intervals.mean_interval(v, seed=5), intervals.mean_interval(v, seed=5)
    assert a == b and a.value == pytest.approx(v.mean())
    small = intervals.mean_interval(v[:100], seed=5)
    assert (small.hi - small.lo) > 3 * (a.hi - a.lo)  # ~sqrt(20) = 4.5x
    # the normal-theory width 2 * 1.96 * sd / sqrt(n), within 15%
    assert (a.hi - a.lo) == pytest.approx(2 * 1.96 * v.std() / np.sqrt(len(v)), rel=0.15)
    assert str(a) == a.text() and a.text().count("[") == 1


def test_auc_units_match_sklearn_with_ties_and_weights():
    rng = np.random.default_rng(2)
    y = rng.random(500) < 0.3
    s = np.round(rng.random(500) + 0.3 * y, 1)  # many ties
    units = intervals.AucUnits(y, s)
    assert intervals.point(units) == pytest.approx(roc_auc_score(y, s), abs=1e-12)
    # integer weights = repeated rows
    w = rng.integers(0, 3, size=500)
    rep = np.repeat(np.arange(500), w)
    assert units.weighted(w[None, :].astype(float))[0] == pytest.approx(roc_auc_score(y[rep], s[rep]), abs=1e-12)
    iv = intervals.auc_interval(y, s, n_resamples=300, seed=0)
    assert iv.lo < iv.value < iv.hi and 0.5 < iv.value < 1


def test_logloss_units_are_sklearns_log_loss():
    from sklearn.metrics import log_loss

    rng = np.random.default_rng(3)
    y, p = rng.random(300) < 0.4, rng.random(300) * 0.98 + 0.01
    assert intervals.point(intervals.logloss_units(y, p)) == pytest.approx(log_loss(y, p), rel=1e-9)


def test_paired_difference_sees_a_small_consistent_gain_that_unpaired_intervals_do_not():
    # two models on the same 400 rows: b = a + a small gain on every row, plus a large shared noise
    rng = np.random.default_rng(4)
    shared = rng.normal(size=400)
    a, b = intervals.MeanUnits(shared + 0.05), intervals.MeanUnits(shared)
    d = intervals.paired_difference(a, b, seed=0)
    assert d.value == pytest.approx(0.05) and d.excludes(0.0) and d.lo > 0.04
    ia, ib = intervals.interval(a, seed=0), intervals.interval(b, seed=0)
    assert ia.lo < ib.hi  # the unpaired intervals overlap
    # the same model against itself: exactly zero; pure noise: the interval spans zero
    assert intervals.paired_difference(a, a, seed=0).value == 0.0
    noise = intervals.paired_difference(intervals.MeanUnits(rng.normal(size=400)),
                                        intervals.MeanUnits(rng.normal(size=400)), seed=0)
    assert not noise.excludes(0.0)
    with pytest.raises(ValueError, match="same units"):
        intervals.paired_difference(a, intervals.MeanUnits(shared[:10]))


def test_paired_auc_difference():
    rng = np.random.default_rng(5)
    y = rng.random(2000) < 0.3
    good, bad = y + rng.normal(scale=0.8, size=2000), y + rng.normal(scale=3.0, size=2000)
    d = intervals.paired_difference(intervals.AucUnits(y, good), intervals.AucUnits(y, bad), n_resamples=300, seed=1)
    assert d.value == pytest.approx(roc_auc_score(y, good) - roc_auc_score(y, bad)) and d.lo > 0


def test_empty_units_and_text():
    iv = intervals.mean_interval(np.array([]))
    assert iv.n == 0 and iv.text() == "n/a [n/a, n/a]" and iv.to_json()["value"] is None


def test_rank_units_and_target_ranks():
    scores = np.array([[0.1, 0.9, 0.5, 0.5], [0.4, 0.3, 0.2, 0.1], [1.0, 1.0, 1.0, 1.0]])
    ranks = intervals.target_ranks(scores, np.array([2, 3, 3]))
    # row 0: 0.9 is ahead and the tie at column 2 wins over column 3; row 2: ties by column
    assert ranks.tolist() == [1, 3, 3]
    u = intervals.rank_units(np.array([0, 1, 5, -1]), k=2)
    assert u["recall@2"].tolist() == [1, 1, 0, 0]
    assert u["mrr@2"].tolist() == [1, 0.5, 0, 0]
    assert u["ndcg@2"][1] == pytest.approx(1 / np.log2(3))
    assert intervals.too_small("test split", 12, 30, "positive labels").startswith("the test split holds only 12")
    assert intervals.too_small("test split", 30, 30, "users") is None
