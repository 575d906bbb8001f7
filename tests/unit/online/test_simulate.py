"""The user simulator's click model and population (its traffic against a live Triton: tests/integration/test_promotion.py)."""
import numpy as np

from pipeline_lib.config import SyntheticConfig, load_config
from pipeline_lib.data.synthetic import generate_interactions
from pipeline_lib.online import simulate


def test_clicks_follow_the_taste_and_fall_with_the_rank():
    m = simulate.ClickModel(base=0.02, lift=0.4, position_decay=1.0)
    p = m.probability(np.array([True, True, False]), np.array([1, 2, 1]))
    np.testing.assert_allclose(p, [0.42, 0.21, 0.02])


def test_the_population_has_a_hidden_taste_per_user_and_features_from_the_log():
    cfg = load_config(None, {})
    log = generate_interactions(SyntheticConfig(n_users=40, n_items=30, n_interactions=500), 0)
    pop = simulate.population(log, cfg, 20, seed=1)
    assert len(pop.users) == 20 and set(pop.taste) == set(pop.users.user_id)
    assert set(pop.taste.values()) <= set(log.item_category) and 'item_id' not in pop.users.columns
    assert list(pop.items.columns) == ['item_id', 'item_category', 'item_price', 'item_tags']
