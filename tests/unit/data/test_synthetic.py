import pandas as pd

from pipeline_lib.config import SyntheticConfig
from pipeline_lib.data.synthetic import generate_interactions

CFG = SyntheticConfig(n_users=500, n_items=300, n_interactions=20_000)


def test_deterministic_for_a_seed_and_different_across_seeds():
    a, b, c = generate_interactions(CFG, 1), generate_interactions(CFG, 1), generate_interactions(CFG, 2)
    pd.testing.assert_frame_equal(a, b)
    assert not a["click"].equals(c["click"])


def test_size_columns_and_types():
    df = generate_interactions(CFG, 0)
    assert len(df) == CFG.n_interactions
    assert set(df.columns) == {"user_id", "item_id", "timestamp", "user_country", "user_age", "item_category",
                               "item_price", "item_tags", "device", "click"}
    assert set(df["click"].unique()) <= {0, 1}
    assert df["user_id"].between(1, CFG.n_users).all() and df["item_id"].between(1, CFG.n_items).all()
    assert df["item_tags"].map(len).between(1, 4).all()
    assert df["timestamp"].is_monotonic_increasing


def test_item_features_are_consistent_per_item():
    df = generate_interactions(CFG, 0)
    per_item = df.groupby("item_id").agg(cat=("item_category", "nunique"), price=("item_price", "nunique"))
    assert (per_item == 1).all().all()


def test_popularity_skew():
    df = generate_interactions(CFG, 0)
    counts = df["item_id"].value_counts()
    top = counts.head(int(0.1 * CFG.n_items)).sum() / len(df)
    assert top > 0.5, f"top 10% of items get only {top:.2f} of exposures"


def test_click_rate_depends_on_observable_features():
    """The hidden model leaks through features: CTR differs strongly across country x category."""
    df = generate_interactions(SyntheticConfig(n_users=500, n_items=300, n_interactions=100_000), 0)
    ctr = df.groupby(["user_country", "item_category"])["click"].agg(["mean", "size"])
    ctr = ctr[ctr["size"] >= 200]["mean"]
    assert ctr.max() - ctr.min() > 0.3
    assert 0.2 < df["click"].mean() < 0.7


def test_default_size_generates_fast_with_a_sane_click_rate():
    import time

    t0 = time.perf_counter()
    df = generate_interactions(SyntheticConfig(), 0)   # 2,000 users x 1,000 items x 200k rows
    assert time.perf_counter() - t0 < 20               # ~2 s here; generous for a loaded machine
    assert len(df) == 200_000
    assert 0.3 < df["click"].mean() < 0.6


def test_exposure_follows_personal_taste():
    """Users of the same country (a noisy view of their hidden segment) see similar items; with
    ``taste_exposure: 0`` every user sees the same popularity mix."""
    def same_country_overlap(b: float) -> float:
        df = generate_interactions(SyntheticConfig(n_users=500, n_items=300, n_interactions=40_000,
                                                   taste_exposure=b), 0)
        share = pd.crosstab(df["user_country"], df["item_category"], normalize="index")
        spread = share.max(axis=0) - share.min(axis=0)        # per category: how much countries differ
        return float(spread.mean())

    assert same_country_overlap(1.5) > 3 * same_country_overlap(0.0)
