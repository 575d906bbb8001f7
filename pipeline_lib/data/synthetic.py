"""Stage 1 -- raw data: the embedded synthetic interaction-log generator (``data.source: synthetic``).

The log comes from a hidden model a recommender can learn. Each user has a taste for each item,

    taste(u, i) = affinity[user_segment, item_segment]     (segment x segment taste)
                + <u, v> / sqrt(d)                          (per-user / per-item latent factors)

and it drives both what a user sees and what they click:

    exposure:  p(item | user) ~ popularity(item)^a * exp(b * taste(u, item))
               (popularity: Zipf over a random item order, a = ``popularity_skew``,
               b = ``taste_exposure``; each user is drawn uniformly per interaction)
    click:     logit = taste(u, i) + item_bias + user_bias + device_effect - price_effect
                       + ``click_offset``

so popularity stays skewed (the top 10% of items get most exposures) while which items a user
interacts with is personal: a model that learns the user's taste beats recommending the most
popular items (with ``taste_exposure: 0`` exposure is popularity alone and it hardly can).
With the defaults about 45% of the exposures are clicks. Users' country and items'
category/tags are noisy views of the hidden segments. Everything is drawn from one seeded
``numpy.random.Generator``, so a seed and a size give the same table every time.
"""
from __future__ import annotations

from typing import Callable, Optional

import numpy as np
import pandas as pd

from pipeline_lib.config import SyntheticConfig

DEVICES = np.array(["mobile", "desktop", "tablet"], dtype=object)


def sample_per_user(logits_of: Callable[[np.ndarray], np.ndarray], n_users: int, n_items: int,
                    users: np.ndarray, r: np.ndarray, block_elements: int = 4_000_000) -> np.ndarray:
    """One item per entry of ``users``, drawn from ``softmax(logits_of(rows)[user])`` by inverse CDF
    with the uniform numbers ``r``. A block of users at a time (never the whole users x items
    matrix): their CDFs laid end to end (row j spans (j, j + 1]), one ``searchsorted`` per block."""
    out = np.empty(len(users), dtype=np.int64)
    step = max(1, block_elements // n_items)
    for start in range(0, n_users, step):
        rows = np.arange(start, min(start + step, n_users))
        sel = np.nonzero((users >= start) & (users < rows[-1] + 1))[0]
        if not len(sel):
            continue
        logits = logits_of(rows)
        w = np.exp(logits - logits.max(axis=1, keepdims=True))
        cdf = np.cumsum(w, axis=1)
        cdf /= cdf[:, -1:]
        flat = (cdf + np.arange(len(rows))[:, None]).ravel()
        local = users[sel] - start
        pos = np.searchsorted(flat, local + r[sel], side="right")
        out[sel] = np.minimum(pos - local * n_items, n_items - 1)
    return out


def _item_features(cfg: SyntheticConfig, item_seg: np.ndarray, rng: np.random.Generator
                   ) -> tuple[np.ndarray, np.ndarray, list[list[int]]]:
    """Observable item features, noisy views of the hidden segment: category, price, tags."""
    S = cfg.n_segments
    item_category = np.where(rng.random(cfg.n_items) < 0.8, item_seg, rng.integers(0, S, cfg.n_items))
    item_price = np.round(np.exp(rng.normal(3.0 + 0.15 * (item_seg % 4), 0.6, cfg.n_items)), 2)
    tags_per_seg = max(1, cfg.n_tags // S)
    item_tags = []
    for i in range(cfg.n_items):
        k = int(rng.integers(1, 5))
        seg_tags = item_seg[i] * tags_per_seg + rng.integers(0, tags_per_seg, k)
        rand_tags = rng.integers(0, cfg.n_tags, k)
        chosen = np.where(rng.random(k) < 0.7, seg_tags % cfg.n_tags, rand_tags)
        item_tags.append(sorted(set(int(t) for t in chosen)))
    return item_category, item_price, item_tags


def generate_interactions(cfg: SyntheticConfig, seed: int) -> pd.DataFrame:
    """Return one denormalised interaction log (user + item + context features, label)."""
    rng = np.random.default_rng(seed)
    S, d = cfg.n_segments, cfg.latent_dim

    # --- hidden structure -------------------------------------------------------------
    affinity = rng.normal(0.0, 1.3, size=(S, S))
    user_seg = rng.integers(0, S, cfg.n_users)
    item_seg = rng.integers(0, S, cfg.n_items)
    user_lat = rng.normal(0.0, 1.0, size=(cfg.n_users, d))
    item_lat = rng.normal(0.0, 1.0, size=(cfg.n_items, d))
    user_bias = rng.normal(0.0, 0.4, cfg.n_users)
    item_bias = rng.normal(0.0, 0.6, cfg.n_items)

    # --- observable user features (noisy views of the segment) -------------------------
    noisy_u = np.where(rng.random(cfg.n_users) < 0.8, user_seg, rng.integers(0, S, cfg.n_users))
    user_country = np.array([f"C{k:02d}" for k in noisy_u], dtype=object)
    user_age = np.clip(rng.normal(25 + 4 * (user_seg % 5), 8.0), 16, 80).round()

    item_category, item_price, item_tags = _item_features(cfg, item_seg, rng)

    # --- exposures: each user sees items by popularity AND by personal taste ------------------
    n = cfg.n_interactions

    def taste(uu: np.ndarray, ii: Optional[np.ndarray] = None) -> np.ndarray:
        """taste(u, i) per pair, or (ii None) of users ``uu`` x every item."""
        if ii is None:
            return affinity[user_seg[uu]][:, item_seg] + user_lat[uu] @ item_lat.T / np.sqrt(d)
        return affinity[user_seg[uu], item_seg[ii]] + (user_lat[uu] * item_lat[ii]).sum(axis=1) / np.sqrt(d)

    pop_rank = rng.permutation(cfg.n_items)
    log_pop = -cfg.popularity_skew * np.log(np.arange(1, cfg.n_items + 1))[pop_rank]
    u = rng.integers(0, cfg.n_users, n)
    i = sample_per_user(lambda rows: log_pop[None, :] + cfg.taste_exposure * taste(rows), cfg.n_users,
                        cfg.n_items, u, rng.random(n))
    device_idx = rng.choice(3, size=n, p=[0.6, 0.3, 0.1])
    device_effect = np.array([0.0, 0.3, -0.2])[device_idx]

    price_z = (np.log(item_price) - np.log(item_price).mean()) / np.log(item_price).std()
    logit = taste(u, i) + item_bias[i] + user_bias[u] + device_effect - 0.3 * price_z[i] + cfg.click_offset
    click = (rng.random(n) < 1.0 / (1.0 + np.exp(-logit))).astype(np.int64)
    t0 = 1_700_000_000
    timestamp = np.sort(rng.integers(t0, t0 + cfg.days * 86_400, n))

    return pd.DataFrame(
        {
            "user_id": u.astype(np.int64) + 1,
            "item_id": i.astype(np.int64) + 1,
            "timestamp": timestamp.astype(np.int64),
            "user_country": user_country[u],
            "user_age": user_age[u].astype(np.float64),
            "item_category": item_category[i].astype(np.int64),
            "item_price": item_price[i].astype(np.float64),
            "item_tags": [item_tags[k] for k in i],
            "device": DEVICES[device_idx],
            "click": click,
        }
    )

