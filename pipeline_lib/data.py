"""Stage 1 -- raw data: the embedded synthetic interaction-log generator, and raw-data loading.

The synthetic clicks come from a hidden model a recommender can learn:

    logit = affinity[user_segment, item_segment]          (segment x segment taste)
          + <u, v> / sqrt(d)                              (per-user / per-item latent factors)
          + item_bias + user_bias + device_effect - price_effect + offset

Users' country and items' category/tags are noisy views of the hidden segments; item
exposure follows a Zipf law (popularity skew). Everything is drawn from one seeded
``numpy.random.Generator``, so a seed and a size give the same table every time.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from pipeline_lib.config import DataConfig, SyntheticConfig

DEVICES = np.array(["mobile", "desktop", "tablet"], dtype=object)


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

    # --- observable item features ------------------------------------------------------
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

    # --- exposures: users uniform, items Zipf over a random popularity ranking -----------
    n = cfg.n_interactions
    pop_rank = rng.permutation(cfg.n_items)
    weights = 1.0 / np.power(np.arange(1, cfg.n_items + 1), cfg.popularity_skew)
    p_item = weights[pop_rank] / weights.sum()
    u = rng.integers(0, cfg.n_users, n)
    i = rng.choice(cfg.n_items, size=n, p=p_item)
    device_idx = rng.choice(3, size=n, p=[0.6, 0.3, 0.1])
    device_effect = np.array([0.0, 0.3, -0.2])[device_idx]

    price_z = (np.log(item_price) - np.log(item_price).mean()) / np.log(item_price).std()
    logit = (
        affinity[user_seg[u], item_seg[i]]
        + (user_lat[u] * item_lat[i]).sum(axis=1) / np.sqrt(d)
        + item_bias[i]
        + user_bias[u]
        + device_effect
        - 0.3 * price_z[i]
        - 0.8
    )
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


def write_raw(cfg: DataConfig, seed: int, out_dir: Path) -> Path:
    """Materialise the run's raw interaction table as ``out_dir/interactions.parquet``.

    For ``source=synthetic`` the table is generated; for ``source=parquet`` the given file
    (or directory of files) is read and copied, so every run keeps the exact input it used.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "interactions.parquet"
    if cfg.source == "synthetic":
        df = generate_interactions(cfg.synthetic, seed)
    else:
        df = read_table(Path(cfg.path))
    df.to_parquet(out, index=False)
    return out


def read_table(path: Path) -> pd.DataFrame:
    if not path.exists():
        raise FileNotFoundError(f"data file not found: {path}")
    try:
        return pd.read_parquet(path)
    except Exception as exc:  # pyarrow raises several types for unreadable files
        raise ValueError(f"cannot read parquet data at {path}: {exc}") from exc
