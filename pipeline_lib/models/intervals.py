"""Confidence intervals of reported metrics: a seeded, vectorised percentile bootstrap over the
metric's natural unit (docs/evaluation.md).

A metric is held as *units*: what one resample reweights. Two kinds cover every figure the
project reports:

- :class:`MeanUnits` -- a metric that is the mean of per-unit values: per-user recall/NDCG
  (units = users), per-session hit / NDCG / reciprocal rank (units = sessions), per-query top-k
  metrics (units = queries), per-row log loss (units = rows);
- :class:`AucUnits` -- ROC AUC of labelled scores (units = rows; recomputed on every resample,
  ties counted as half).

A resample draws n units with replacement (multinomial counts, one row of a ``[B, n]`` matrix),
so every statistic is a weighted one and ``B`` resamples are computed at once. The same count
matrix applied to two unit sets of the same units gives a *paired* bootstrap of their difference
(:func:`paired_difference`): the candidate and the served version (or a baseline) scored on the same
rows / users / sessions.

    iv = interval(MeanUnits(per_user_recall), n_resamples=1000, seed=42)   # Interval(value, lo, hi, n)
    d = paired_difference(AucUnits(y, s_new), AucUnits(y, s_old), seed=42)  # new - old
    str(iv)  # '0.8120 [0.8010, 0.8230]'
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Iterator, Optional, Protocol, Union

import numpy as np

DEFAULT_RESAMPLES = 1000
DEFAULT_LEVEL = 0.95
_BLOCK_ELEMENTS = 4_000_000  # resamples x units per block (memory ~32 MB of float64)


@dataclass(frozen=True)
class Interval:
    """A point value (on all units) and the bootstrap percentile interval ``[lo, hi]`` at ``level``."""

    value: float
    lo: float
    hi: float
    n: int
    level: float = DEFAULT_LEVEL

    def __str__(self) -> str:
        return self.text()

    def text(self, digits: int = 4) -> str:
        """``0.8120 [0.8010, 0.8230]`` (``n/a`` where undefined)."""
        def f(v: float) -> str:
            return "n/a" if v is None or not math.isfinite(v) else f"{v:.{digits}f}"
        return f"{f(self.value)} [{f(self.lo)}, {f(self.hi)}]"

    def excludes(self, x: float = 0.0) -> bool:
        """Is ``x`` outside the interval (a difference clear of it)?"""
        return bool(math.isfinite(self.lo) and math.isfinite(self.hi) and (self.lo > x or self.hi < x))

    def to_json(self) -> dict:
        def clean(v: float) -> Optional[float]:
            return float(v) if v is not None and math.isfinite(v) else None
        return {"value": clean(self.value), "lo": clean(self.lo), "hi": clean(self.hi), "n": int(self.n),
                "level": self.level}


class Units(Protocol):
    """Per-unit data of one metric: ``n`` units and the metric under unit weights ``[B, n]`` -> ``[B]``."""

    n: int

    def weighted(self, w: np.ndarray) -> np.ndarray: ...


class MeanUnits:
    """A metric that is the mean of one value per unit (NaN values are dropped first)."""

    def __init__(self, values: np.ndarray):
        v = np.asarray(values, dtype=np.float64).reshape(-1)
        self.values = v[np.isfinite(v)]
        self.n = len(self.values)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, MeanUnits) and np.array_equal(self.values, other.values)

    def __repr__(self) -> str:
        return f"MeanUnits(n={self.n})"

    def weighted(self, w: np.ndarray) -> np.ndarray:
        tot = w.sum(axis=1, dtype=np.float64)
        with np.errstate(invalid="ignore", divide="ignore"):
            return (w @ self.values.astype(w.dtype)).astype(np.float64) / tot


class AucUnits:
    """ROC AUC of ``scores`` against binary ``labels`` (rows as units; ties count one half)."""

    def __init__(self, labels: np.ndarray, scores: np.ndarray):
        y = np.asarray(labels).reshape(-1) > 0
        s = np.asarray(scores, dtype=np.float64).reshape(-1)
        if len(y) != len(s):
            raise ValueError(f"{len(y)} labels for {len(s)} scores")
        order = np.argsort(s, kind="stable")
        self.order, self.pos = order, y[order]
        ss = s[order]
        self.starts = np.flatnonzero(np.r_[True, ss[1:] != ss[:-1]]) if len(ss) else np.zeros(0, dtype=np.int64)
        self.n = len(y)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, AucUnits) and np.array_equal(self.order, other.order)
                and np.array_equal(self.pos, other.pos) and np.array_equal(self.starts, other.starts))

    def __repr__(self) -> str:
        return f"AucUnits(n={self.n})"

    def weighted(self, w: np.ndarray) -> np.ndarray:
        if not self.n:
            return np.full(len(w), np.nan)
        w = w[:, self.order]
        wp = np.add.reduceat(w * self.pos, self.starts, axis=1).astype(np.float64)  # positive weight per tie group
        wn = np.add.reduceat(w, self.starts, axis=1).astype(np.float64) - wp      # negative weight per tie group
        below = np.cumsum(wn, axis=1) - wn                                        # negatives scored lower
        num = (wp * (below + 0.5 * wn)).sum(axis=1)
        with np.errstate(invalid="ignore", divide="ignore"):
            return num / (wp.sum(axis=1) * wn.sum(axis=1))


AnyUnits = Union[MeanUnits, AucUnits]


def logloss_units(labels: np.ndarray, probabilities: np.ndarray, eps: float = 1e-15) -> MeanUnits:
    """Per-row log loss (sklearn's clipping) as mean units."""
    y = np.asarray(labels, dtype=np.float64).reshape(-1) > 0
    p = np.clip(np.asarray(probabilities, dtype=np.float64).reshape(-1), eps, 1 - eps)
    return MeanUnits(-np.where(y, np.log(p), np.log1p(-p)))


def point(units: AnyUnits) -> float:
    """The metric on all units (weight one each)."""
    if not units.n:
        return float("nan")
    return float(units.weighted(np.ones((1, units.n)))[0])


def resample_counts(n: int, n_resamples: int, seed: int) -> Iterator[np.ndarray]:
    """Blocks of multinomial resample counts ``[b, n]`` (float64), ``n_resamples`` rows in all, seeded."""
    rng = np.random.default_rng(seed)
    block = max(1, min(n_resamples, _BLOCK_ELEMENTS // max(n, 1)))
    done = 0
    while done < n_resamples:
        b = min(block, n_resamples - done)
        idx = rng.integers(0, n, size=(b, n)) + (np.arange(b) * n)[:, None]
        # float32 counts (exact below 2**24 per unit): half the memory traffic of the weighted sums
        yield np.bincount(idx.ravel(), minlength=b * n).reshape(b, n).astype(np.float32)
        done += b


def percentiles(stats: np.ndarray, level: float) -> tuple[float, float]:
    """The central ``level`` interval of bootstrap statistics (non-finite ones left out; NaNs when none)."""
    stats = stats[np.isfinite(stats)]
    if not len(stats):
        return float("nan"), float("nan")
    a = (1 - level) / 2 * 100
    lo, hi = np.percentile(stats, [a, 100 - a])
    return float(lo), float(hi)


def interval(units: AnyUnits, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
             level: float = DEFAULT_LEVEL) -> Interval:
    """The metric's point value and its bootstrap percentile interval over the units."""
    if not units.n:
        return Interval(float("nan"), float("nan"), float("nan"), 0, level)
    stats = np.concatenate([units.weighted(w) for w in resample_counts(units.n, n_resamples, seed)])
    return Interval(point(units), *percentiles(stats, level), units.n, level)


def paired_difference(a: AnyUnits, b: AnyUnits, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                      level: float = DEFAULT_LEVEL) -> Interval:
    """``metric(a) - metric(b)`` and its paired bootstrap interval: both resampled with the same counts,
    so ``a`` and ``b`` must hold the same units in the same order."""
    if a.n != b.n:
        raise ValueError(f"a paired difference needs the same units: {a.n} against {b.n}")
    if not a.n:
        return Interval(float("nan"), float("nan"), float("nan"), 0, level)
    stats = np.concatenate([a.weighted(w) - b.weighted(w) for w in resample_counts(a.n, n_resamples, seed)])
    return Interval(point(a) - point(b), *percentiles(stats, level), a.n, level)


def mean_interval(values: np.ndarray, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                  level: float = DEFAULT_LEVEL) -> Interval:
    """Shorthand: :func:`interval` of :class:`MeanUnits` (per-unit values -> mean, lo, hi)."""
    return interval(MeanUnits(values), n_resamples, seed, level)


def auc_interval(labels: np.ndarray, scores: np.ndarray, n_resamples: int = DEFAULT_RESAMPLES, seed: int = 0,
                 level: float = DEFAULT_LEVEL) -> Interval:
    """Shorthand: :func:`interval` of :class:`AucUnits`."""
    return interval(AucUnits(labels, scores), n_resamples, seed, level)


# -- per-unit values of the project's top-k metrics ----------------------------------------------


def rank_units(ranks: np.ndarray, k: int) -> dict[str, np.ndarray]:
    """Per-unit recall / NDCG / MRR @k for one relevant item per unit at 0-based ``ranks`` (``>= k``
    or negative: missed): hit, ``1 / log2(rank + 2)`` and ``1 / (rank + 1)`` within the top k."""
    r = np.asarray(ranks, dtype=np.float64).reshape(-1)
    hit = (r >= 0) & (r < k)
    rr = np.where(hit, r, 0.0)
    return {f"recall@{k}": hit.astype(np.float64), f"ndcg@{k}": np.where(hit, 1.0 / np.log2(rr + 2), 0.0),
            f"mrr@{k}": np.where(hit, 1.0 / (rr + 1), 0.0), f"precision@{k}": hit / float(k)}


def target_ranks(scores: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """0-based rank of each row's target column in its score row (score descending, ties by column
    ascending, as :func:`pipeline_lib.models.baselines.topk_indices` orders them); -1 for a target
    outside the row (``< 0`` or ``>= n_columns``)."""
    s = np.asarray(scores)
    t = np.asarray(targets, dtype=np.int64).reshape(-1)
    ok = (t >= 0) & (t < s.shape[1])
    out = np.full(len(t), -1, dtype=np.int64)
    if ok.any():
        rows = np.flatnonzero(ok)
        ts = s[rows, t[rows]][:, None]
        cols = np.arange(s.shape[1])[None, :]
        out[rows] = ((s[rows] > ts) | ((s[rows] == ts) & (cols < t[rows][:, None]))).sum(axis=1)
    return out


def too_small(what: str, n: int, minimum: int, unit: str) -> Optional[str]:
    """A warning sentence when ``n`` ``unit`` are fewer than ``minimum`` (else None)."""
    if n >= minimum:
        return None
    return (f"the {what} holds only {n} {unit} (fewer than {minimum}, evaluation.min_"
            f"{'positives' if unit.startswith('positive') else 'units'}): its figures are too noisy to mean much")
