"""A small user simulator that proves the loop: users with hidden tastes query the live Triton, click, give feedback.

Each simulated user has a hidden taste: one item category (drawn at random, so a model trained on the original
log does not know it). A request carries the user and ``candidates`` random items with their features from
the log (the full-feature request of a ranking model; a top-k model gets the user's row); the served answer is
shown best first and the user clicks the item at rank ``r`` with probability

    p = (base + lift * [item category == taste]) / r ** position_decay

(a position bias: lower ranks are seen less). Every click becomes a feedback event naming the request id the
served answer returned. Nothing here imports a server: the caller passes a connected
:class:`~pipeline_lib.serving.client.RecsysClient`.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np
import pandas as pd

from pipeline_lib.config import FeatureSide, RunConfig


@dataclass
class ClickModel:
    base: float = 0.02
    lift: float = 0.5
    position_decay: float = 0.7
    taste_column: str = "item_category"

    def probability(self, match: np.ndarray, ranks: np.ndarray) -> np.ndarray:
        p = (self.base + self.lift * match.astype(float)) / np.power(ranks.astype(float), self.position_decay)
        return np.clip(p, 0.0, 1.0)


@dataclass
class Population:
    """Users (their newest log row's user-side columns), items (newest row's item-side columns), hidden tastes."""

    users: pd.DataFrame
    items: pd.DataFrame
    taste: dict
    user_col: str
    item_col: str


def population(log: pd.DataFrame, cfg: RunConfig, n_users: int, seed: int, taste_column: str = "item_category"
               ) -> Population:
    c = cfg.columns
    rng = np.random.default_rng(seed)
    item_side = [f.name for f in c.features if f.side == FeatureSide.item and f.name in log.columns]
    user_side = [col for col in c.serving_columns if col not in item_side and col != c.item_id and col in log.columns]
    order = log.sort_values(c.timestamp) if c.timestamp and c.timestamp in log.columns else log
    users = order.drop_duplicates(c.user_id, keep="last")[user_side]
    users = users.sample(min(n_users, len(users)), random_state=seed).reset_index(drop=True)
    items = order.drop_duplicates(c.item_id, keep="last")[[c.item_id] + item_side].reset_index(drop=True)
    categories = items[taste_column].unique()
    taste = {u: rng.choice(categories) for u in users[c.user_id]}
    return Population(users, items, taste, c.user_id, c.item_id)


@dataclass
class TrafficResult:
    requests: int = 0
    shown: int = 0
    clicks: int = 0
    failed: int = 0
    feedback: list[dict] = field(default_factory=list)
    versions: dict[str, int] = field(default_factory=dict)

    @property
    def ctr(self) -> float:
        return self.clicks / self.shown if self.shown else float("nan")


def run_traffic(client: Any, pop: Population, requests: int, k: int, candidates: int, seed: int,
                clicks: Optional[ClickModel] = None) -> TrafficResult:
    """Send ``requests`` requests (a random user each), show the first ``k``, draw clicks; feedback by request id."""
    model = clicks or ClickModel()
    rng = np.random.default_rng(seed)
    out = TrafficResult()
    topk = client.is_topk
    for _ in range(requests):
        user = pop.users.iloc[int(rng.integers(len(pop.users)))]
        try:
            ids, version = _answer(client, pop, user, candidates, k, rng, topk)
        except Exception:  # noqa: BLE001 - a failed request is counted, the traffic goes on
            out.failed += 1
            continue
        out.requests += 1
        out.versions[version] = out.versions.get(version, 0) + 1
        cats = pop.items.set_index(pop.items[pop.item_col].astype(str))[model.taste_column]
        shown = [str(i) for i in ids[:k]]
        match = np.array([cats.get(i) == pop.taste[user[pop.user_col]] for i in shown])
        p = model.probability(match, np.arange(1, len(shown) + 1))
        clicked = rng.random(len(shown)) < p
        out.shown += len(shown)
        out.clicks += int(clicked.sum())
        now = pd.Timestamp.now(tz="UTC").isoformat()
        for item in np.array(shown)[clicked]:
            out.feedback.append({"request_id": client.last_request_id or "", "user_id": str(user[pop.user_col]),
                                 "item_id": item, "event": "click", "ts": now})
    return out


def _answer(client: Any, pop: Population, user: pd.Series, candidates: int, k: int, rng, topk: bool
            ) -> tuple[list, str]:
    if topk:
        ids, _ = client.recommend(pd.DataFrame([user]), k=None)
        return list(ids[0]), ""  # a top-k answer carries no version here; the impression log has it
    pick = pop.items.iloc[rng.choice(len(pop.items), min(candidates, len(pop.items)), replace=False)]
    rows = pick.assign(**{c: [user[c]] * len(pick) for c in pop.users.columns}).reset_index(drop=True)
    scores, version = client.infer(rows)
    order = np.argsort(-np.asarray(scores), kind="stable")
    return list(rows[pop.item_col].to_numpy()[order]), version
