"""Baselines that every run reports beside its model, on the same train/validation split.

Plain functions over raw pandas DataFrames (numpy, scipy, pandas, scikit-learn only; no
TensorFlow, NVTabular or Prefect). The caller names the columns.

Ranking (``ranking_baselines``), scored with ``sklearn.metrics.roc_auc_score`` / ``log_loss``:

- ``logistic_regression``: ``OneHotEncoder(handle_unknown="ignore")`` on the id + categorical
  columns -> ``LogisticRegression(solver="liblinear")`` (deterministic, ``random_state=0``);
- ``item_click_rate``: the item's training click rate, smoothed toward the global rate
  ``(clicks + a * global) / (impressions + a)``; unseen items get the global rate.

Retrieval (``retrieval_baselines``), scored with the standard top-k protocol (``TopKProtocol``):

- the catalogue is every item that occurs in the training frame; its internal order is training
  popularity (descending; ties by item id), and **every tie in a score is broken by that order**;
- for each validation user with held-out positives, the whole catalogue is scored, the items the
  user interacted with (as positives) in training are excluded (``exclude_seen=True``), the top k
  are taken, and per user:

  - ``recall@k = hits / min(k, n_relevant)`` (the normalisation of EASE / Mult-VAE; a user with
    more relevant items than k can still reach 1.0),
  - ``ndcg@k = DCG / IDCG`` with binary gains, ``DCG = sum 1 / log2(rank + 1)`` (rank from 1) and
    the ideal DCG over ``min(k, n_relevant)`` hits;

  both averaged over users (every evaluated user weighs the same);
- relevant items are the user's validation positives that are in the catalogue and, when seen
  items are excluded, not among the user's training positives (those can never be recommended);
  users left with no relevant item are not evaluated (counted in ``n_users_no_relevant``);
- baselines: ``most_popular`` (number of training users per item), ``item_cooccurrence`` (item-item
  cosine similarity on the binary user x item matrix, zero diagonal; a user's score for an item is
  the sum of its similarities to the user's training items), ``ease`` (Steck 2019, closed form
  ``B = I - P diag(1/diag(P))``, ``P = (X^T X + lambda I)^-1``; skipped with a logged reason when
  the catalogue exceeds ``ease_max_items``: it holds dense n_items x n_items float64 matrices);
- cold users (no training positives) score zero everywhere under co-occurrence and EASE, so the
  popularity tie-break ranks their catalogue exactly as ``most_popular`` does: they fall back to
  popularity. The same tie-break fills the tail of warm users whose non-zero scores are too few.
- scores are computed for ``batch_size`` users at a time (a dense batch x catalogue block, never
  the whole users x items matrix).

A neural model goes through the same protocol with ``TopKProtocol.evaluate_scores`` (a scoring
function over the catalogue) or ``TopKProtocol.evaluate_topk`` / ``topk_metrics`` (its own top-k
item ids; ``drop_seen`` removes seen items from an over-fetched list).

Session baselines (most popular, last-item transitions) live in ``pipeline_lib.models.session``.

``lift_sentence`` states a model's lift over the best baseline in plain words.
"""
from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field, replace
from typing import Any, Callable, Collection, Hashable, Mapping, Optional, Sequence, Union

import numpy as np
import pandas as pd
import scipy.sparse as sp
from scipy.linalg import lapack
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss, roc_auc_score
from sklearn.preprocessing import OneHotEncoder

log = logging.getLogger(__name__)

Ks = Union[int, Sequence[int]]

DEFAULT_EASE_LAMBDA = 200.0
# EASE holds ~3 dense n_items^2 float64 matrices at its peak: 10,000 items ~ 2.4 GB.
DEFAULT_EASE_MAX_ITEMS = 10_000
# Elements of one dense batch x catalogue score block (float64: 32 MB); batch_size=None derives from it.
DEFAULT_BLOCK_ELEMENTS = 4_000_000


# ---------------------------------------------------------------------------------------------
# shared
# ---------------------------------------------------------------------------------------------

def positives(df: pd.DataFrame, label: Optional[str] = None, min_label: Optional[float] = None) -> pd.DataFrame:
    """Rows that count as positive interactions: all rows when ``label`` is None, else
    ``label >= min_label`` when ``min_label`` is given, else ``label > 0``."""
    if label is None:
        return df
    v = df[label]
    return df[v >= min_label] if min_label is not None else df[v > 0]


def _ks(k: Ks) -> list[int]:
    ks = [int(k)] if np.isscalar(k) else sorted({int(x) for x in k})  # type: ignore[arg-type, union-attr]
    if not ks or min(ks) < 1:
        raise ValueError(f"k must be >= 1, got {k!r}")
    return ks


# ---------------------------------------------------------------------------------------------
# ranking
# ---------------------------------------------------------------------------------------------

def _binary_metrics(y: np.ndarray, p: np.ndarray) -> dict:
    out: dict = {"logloss": float(log_loss(y, p, labels=[0, 1]))}
    if len(np.unique(y)) < 2:
        out["auc"] = float("nan")
        out["auc_reason"] = f"validation labels hold a single class ({int(y[0]) if len(y) else 'none'}): AUC undefined"
    else:
        out["auc"] = float(roc_auc_score(y, p))
    return out


def item_click_rate(train: pd.DataFrame, item_col: str, y_train: np.ndarray, smoothing: float = 10.0
                    ) -> tuple[pd.Series, float]:
    """Smoothed training click rate per item, ``(clicks + a * global) / (n + a)`` with
    ``a = smoothing``, and the global rate (what unseen items get)."""
    y = pd.Series(np.asarray(y_train, dtype=np.float64), index=train.index)
    glob = float(y.mean()) if len(y) else 0.0
    g = y.groupby(train[item_col].to_numpy(), sort=True)
    rate = (g.sum() + smoothing * glob) / (g.count() + smoothing)
    return rate, glob


@dataclass
class RankingBaselineOptions:
    """``item_col``: the item column for the item click rate (skipped with a reason when None).
    ``min_label``: the label is binarised like ``positives`` (``> 0``, or ``>= min_label``). The
    logistic regression (inverse regularisation ``C``) trains on at most ``max_rows`` training rows
    (a seeded random sample; None: all); ``smoothing``: the click rate's ``a``."""

    item_col: Optional[str] = None
    min_label: Optional[float] = None
    max_rows: Optional[int] = 1_000_000
    C: float = 1.0
    smoothing: float = 10.0
    seed: int = 0
    return_predictions: bool = False
    numeric: Sequence[str] = ()  # continuous columns of the logistic regression (median-filled, standardised)
    log_numeric: Sequence[str] = ()  # of those, the ones taken as log(1 + x) first (counts, durations)
    lists: Sequence[str] = ()  # list columns of the logistic regression, multi-hot encoded


def ranking_baselines(train: pd.DataFrame, valid: pd.DataFrame, label: str, categorical: Sequence[str],
                      options: Optional[RankingBaselineOptions] = None, **overrides) -> dict[str, dict]:
    """AUC and log loss on ``valid`` of two ranking baselines fitted on ``train``.

    ``categorical``: the id and categorical columns one-hot encoded for the logistic regression
    (unknown validation values encode as all zeros). ``options`` (:class:`RankingBaselineOptions`;
    each field also settable by keyword). Each result holds ``auc`` (NaN with ``auc_reason`` when
    the validation set has a single class), ``logloss``, ``n_train``, ``n_valid``, ``seconds`` (and
    ``predictions`` on ``valid`` with ``return_predictions``); a baseline that cannot run is
    ``{"skipped": reason}``.
    """
    o = replace(options or RankingBaselineOptions(), **overrides)
    y_va = _binarise(valid, label, o.min_label)
    out = {"logistic_regression": _logistic_regression(train, valid, label, list(categorical), o, y_va),
           "item_click_rate": _click_rate_baseline(train, valid, label, o, y_va)}
    for name, r in out.items():
        if "skipped" in r:
            log.info("ranking baseline %s skipped: %s", name, r["skipped"])
    return out


def _binarise(df: pd.DataFrame, label: str, min_label: Optional[float]) -> np.ndarray:
    v = df[label].to_numpy()
    return (v >= min_label if min_label is not None else v > 0).astype(np.int64)


def _logistic_regression(train: pd.DataFrame, valid: pd.DataFrame, label: str, cols: list[str],
                         o: RankingBaselineOptions, y_va: np.ndarray) -> dict:
    t0 = time.perf_counter()
    fit = train
    if o.max_rows is not None and len(train) > o.max_rows:
        fit = train.sample(n=o.max_rows, random_state=o.seed)
    y_fit = _binarise(fit, label, o.min_label)
    if not cols:
        return {"skipped": "no id or categorical columns given"}
    if len(np.unique(y_fit)) < 2:
        return {"skipped": "training labels hold a single class"}
    encode = _lr_encoder(fit, cols, o)
    x_fit = encode(fit)
    lr = LogisticRegression(solver="liblinear", C=o.C, max_iter=200, random_state=o.seed)
    lr.fit(x_fit, y_fit)
    p = lr.predict_proba(encode(valid))[:, 1]
    out = {**_binary_metrics(y_va, p), "n_train": int(len(fit)), "n_valid": int(len(valid)),
           "n_features": int(x_fit.shape[1]), "seconds": time.perf_counter() - t0}
    return {**out, "predictions": p} if o.return_predictions else out


def _lr_encoder(fit: pd.DataFrame, cols: list[str], o: RankingBaselineOptions) -> Callable[[pd.DataFrame], sp.csr_matrix]:
    """The logistic regression's design matrix, fitted on ``fit``: one-hot ``cols`` (unknown values: all
    zeros), ``o.numeric`` median-filled and standardised (``o.log_numeric``: log(1 + x) first), ``o.lists``
    multi-hot over the training values."""
    enc = OneHotEncoder(handle_unknown="ignore", dtype=np.float64).fit(fit[cols].astype(str))
    numeric = [c for c in o.numeric if c in fit.columns]

    def num(df: pd.DataFrame, c: str) -> np.ndarray:
        v = pd.to_numeric(df[c], errors="coerce").to_numpy(dtype=np.float64)
        return np.log1p(np.maximum(v, 0.0)) if c in o.log_numeric else v

    stats = {}
    for c in numeric:
        v = num(fit, c)
        med = float(np.nanmedian(v)) if np.isfinite(v).any() else 0.0
        v = np.where(np.isfinite(v), v, med)
        stats[c] = (med, float(v.mean()), float(v.std()) or 1.0)
    vocab = {c: {x: i for i, x in enumerate(sorted({x for row in fit[c] if row is not None for x in row}))}
             for c in o.lists if c in fit.columns}

    def encode(df: pd.DataFrame) -> sp.csr_matrix:
        parts = [enc.transform(df[cols].astype(str))]
        for c, (med, mean, std) in stats.items():
            v = num(df, c)
            parts.append(sp.csr_matrix(((np.where(np.isfinite(v), v, med) - mean) / std).reshape(-1, 1)))
        for c, index in vocab.items():
            rows, idx = [], []
            for r, values in enumerate(df[c]):
                hits = [index[x] for x in (values if values is not None else ()) if x in index]
                rows += [r] * len(hits)
                idx += hits
            m = sp.csr_matrix((np.ones(len(idx)), (rows, idx)), shape=(len(df), max(len(index), 1)))
            m.data = np.minimum(m.data, 1.0)  # a repeated value counts once
            # each row's values share a weight of 1 (the mean, as the models' list embeddings are averaged)
            m = sp.diags(1.0 / np.maximum(np.asarray(m.sum(axis=1)).ravel(), 1.0)) @ m
            parts.append(m.tocsr())
        return sp.hstack(parts, format="csr")
    return encode


def _click_rate_baseline(train: pd.DataFrame, valid: pd.DataFrame, label: str, o: RankingBaselineOptions,
                         y_va: np.ndarray) -> dict:
    t0 = time.perf_counter()
    if o.item_col is None:
        return {"skipped": "no item column given"}
    rate, glob = item_click_rate(train, o.item_col, _binarise(train, label, o.min_label), o.smoothing)
    p = valid[o.item_col].map(rate).fillna(glob).to_numpy(dtype=np.float64)
    out = {**_binary_metrics(y_va, p), "n_train": int(len(train)), "n_valid": int(len(valid)),
           "seconds": time.perf_counter() - t0}
    return {**out, "predictions": p} if o.return_predictions else out


# ---------------------------------------------------------------------------------------------
# top-k protocol
# ---------------------------------------------------------------------------------------------

def topk_unit_values(topk_item_ids: Sequence[Sequence[Hashable]], relevant: Sequence[Collection[Hashable]],
                     k: Ks = 10) -> dict[str, np.ndarray]:
    """Per-user ``recall@k`` / ``ndcg@k`` arrays (one value per user with a relevant item, in order;
    users with none are skipped), the values :func:`topk_metrics` averages: the units of their
    confidence intervals (:mod:`pipeline_lib.models.intervals`)."""
    ks = _ks(k)
    if len(topk_item_ids) != len(relevant):
        raise ValueError(f"{len(topk_item_ids)} top-k lists for {len(relevant)} users")
    kmax = ks[-1]
    disc = 1.0 / np.log2(np.arange(2, kmax + 2))
    ideal = np.cumsum(disc)
    rec: dict[int, list[float]] = {kk: [] for kk in ks}
    ndcg: dict[int, list[float]] = {kk: [] for kk in ks}
    for recs, rel in zip(topk_item_ids, relevant):
        rel = rel if isinstance(rel, (set, frozenset)) else set(rel)
        if not rel:
            continue
        hit = np.zeros(kmax)
        found: set = set()
        for r, item in enumerate(list(recs)[:kmax]):
            if item in rel and item not in found:
                hit[r] = 1.0
                found.add(item)
        for kk in ks:
            m = min(kk, len(rel))
            rec[kk].append(hit[:kk].sum() / m)
            ndcg[kk].append(float(hit[:kk] @ disc[:kk]) / ideal[m - 1])
    out: dict[str, np.ndarray] = {}
    for kk in ks:
        out[f"recall@{kk}"] = np.asarray(rec[kk], dtype=np.float64)
        out[f"ndcg@{kk}"] = np.asarray(ndcg[kk], dtype=np.float64)
    return out


def topk_metrics(topk_item_ids: Sequence[Sequence[Hashable]], relevant: Sequence[Collection[Hashable]],
                 k: Ks = 10, units: bool = False) -> dict:
    """Recall@k and NDCG@k averaged over users (one list of recommended ids, best first, and one
    collection of relevant ids per user; ``k`` an int or several).

    ``recall@k = hits / min(k, n_relevant)``; ``ndcg@k`` with binary gains and ideal DCG over
    ``min(k, n_relevant)`` hits. Lists shorter than k are scored as they are; a repeated id counts
    once (at its first rank); ids equal to -1 (padding) never hit. Users with no relevant item
    are skipped (``n_users`` counts the others). ``units``: also the per-user values under
    ``"units"`` (:func:`topk_unit_values`).
    """
    values = topk_unit_values(topk_item_ids, relevant, k)
    n = len(next(iter(values.values()))) if values else 0
    out: dict = {"n_users": n}
    for key, v in values.items():
        out[key] = float(np.mean(v)) if n else float("nan")
    if units:
        out["units"] = values
    return out


def drop_seen(topk_item_ids: Sequence[Sequence[Hashable]], seen: Sequence[Collection[Hashable]], k: int
              ) -> list[list]:
    """Remove each user's seen items from an over-fetched recommendation list (e.g. from an ANN
    index asked for ``k + len(seen)`` items) and cut it to k."""
    out = []
    for recs, s in zip(topk_item_ids, seen):
        s = s if isinstance(s, (set, frozenset)) else set(s)
        out.append([i for i in recs if i not in s][:k])
    return out


def mask_rows(scores: np.ndarray, exclude: Optional[Sequence[np.ndarray]], value: float) -> np.ndarray:
    """Set, in place, each row's excluded column indices (``exclude[i]`` for row i) to ``value``;
    returns ``scores``. The one masking of seen / requested items for retrieval and session top-k."""
    if exclude is not None:
        lens = np.array([len(e) for e in exclude], dtype=np.int64)
        if lens.sum():
            scores[np.repeat(np.arange(len(exclude)), lens), np.concatenate(exclude).astype(np.int64)] = value
    return scores


def topk_indices(scores: np.ndarray, k: int) -> np.ndarray:
    """Top-k column indices per row, best first, ties to the lower column; -inf/NaN never
    selected (padded with -1 when a row has fewer than k finite scores)."""
    s = np.asarray(scores, dtype=np.float64)
    if np.isnan(s).any():
        s = np.where(np.isnan(s), -np.inf, s)
    b, n = s.shape
    out = np.full((b, k), -1, dtype=np.int64)
    if min(k, n) == 0 or b == 0:
        return out
    cols = top_columns(s, k)
    cols[np.take_along_axis(s, cols, axis=1) == -np.inf] = -1
    out[:, :cols.shape[1]] = cols
    return out


def top_columns(scores: np.ndarray, k: int) -> np.ndarray:
    """The one top-k selection: the ``min(k, columns)`` best column indices per row of a float matrix, best
    first, ties to the lower column (``np.argsort(-scores, kind="stable")[:, :k]``), NaN as -inf. A
    partition instead of a sort: linear in the columns (a 1M-item catalogue: ~10x faster per row)."""
    b, n = scores.shape
    ke = min(k, n)
    if ke == 0 or b == 0:
        return np.zeros((b, ke), dtype=np.int64)
    s = np.where(np.isnan(scores), -np.inf, scores) if np.isnan(scores).any() else scores
    v = np.partition(s, n - ke, axis=1)[:, n - ke]           # the k-th largest score per row
    gt = s > v[:, None]
    eq = s == v[:, None]
    need = ke - gt.sum(axis=1)                                # how many of the boundary ties to take
    sel = gt | eq
    tied = np.nonzero(eq.sum(axis=1) > need)[0]               # rows with more boundary ties than slots:
    if len(tied):                                             # keep the lowest columns among them
        e = eq[tied]
        sel[tied] = gt[tied] | (e & (np.cumsum(e, axis=1, dtype=np.int32) <= need[tied, None]))
    cols = np.nonzero(sel)[1].reshape(b, ke)
    vals = np.take_along_axis(s, cols, axis=1)
    order = np.lexsort((cols, -vals), axis=1)                 # score desc, then column asc
    return np.take_along_axis(cols, order, axis=1).astype(np.int64, copy=False)


@dataclass
class TopKProtocol:
    """The evaluation users, their relevant and seen items, and the training matrix, over one
    catalogue. Build it with ``TopKProtocol.build``; item indices refer to ``item_ids``."""

    item_ids: np.ndarray                 # catalogue, index -> raw item id (popularity order)
    popularity: np.ndarray               # training users per catalogue item
    users: np.ndarray                    # raw ids of the evaluated users
    train_matrix: sp.csr_matrix          # binary, one row per evaluated user (zero row: cold user)
    relevant_idx: list[np.ndarray]       # catalogue indices of each evaluated user's relevant items
    exclude_seen: bool = True
    full_train_matrix: sp.csr_matrix = field(default=None, repr=False)  # every training user x catalogue
    stats: dict = field(default_factory=dict)

    @classmethod
    def build(cls, train: pd.DataFrame, valid: pd.DataFrame, user_col: str, item_col: str,
              label: Optional[str] = None, min_label: Optional[float] = None,
              exclude_seen: bool = True, history: Optional[pd.DataFrame] = None) -> "TopKProtocol":
        """Catalogue = items of ``train``; interactions = positive rows (see ``positives``).

        ``history``: later interactions that are the users' history too (the test split's protocol: the
        validation split). The users' rows (the scorers' input, the seen items excluded, cold users) and
        the popularity are then train + ``history`` (items of the catalogue only); the catalogue and the
        matrix models fit on (``full_train_matrix``) stay the training split's."""
        tr = positives(train, label, min_label)
        va = positives(valid, label, min_label)
        tr_pairs = tr[[user_col, item_col]].drop_duplicates()
        catalogue = pd.unique(train[item_col])
        hist_pairs = tr_pairs
        if history is not None:
            extra = positives(history, label, min_label)[[user_col, item_col]]
            extra = extra[extra[item_col].isin(catalogue)]
            hist_pairs = pd.concat([tr_pairs, extra], ignore_index=True).drop_duplicates()
        item_ids, popularity = _popularity_order(catalogue, hist_pairs[item_col])
        item_index = pd.Index(item_ids)

        train_users = pd.Index(pd.unique(tr_pairs[user_col]))
        full = sp.csr_matrix(
            (np.ones(len(tr_pairs)), (train_users.get_indexer(tr_pairs[user_col]), item_index.get_indexer(tr_pairs[item_col]))),
            shape=(len(train_users), len(item_ids)))
        hist_users, hist = train_users, full
        if history is not None:
            hist_users = pd.Index(pd.unique(hist_pairs[user_col]))
            hist = sp.csr_matrix(
                (np.ones(len(hist_pairs)), (hist_users.get_indexer(hist_pairs[user_col]),
                                            item_index.get_indexer(hist_pairs[item_col]))),
                shape=(len(hist_users), len(item_ids)))

        va_pairs = va[[user_col, item_col]].dropna().drop_duplicates()
        n_valid_pairs = len(va_pairs)
        col = item_index.get_indexer(va_pairs[item_col])
        known = col >= 0
        va_pairs = va_pairs[known].assign(_col=col[known])
        va_pairs = va_pairs.assign(_row=hist_users.get_indexer(va_pairs[user_col]))
        n_seen_dropped = 0
        if exclude_seen:
            warm = va_pairs["_row"].to_numpy() >= 0
            seen = np.zeros(len(va_pairs), dtype=bool)
            if warm.any():
                seen[warm] = np.asarray(hist[va_pairs["_row"].to_numpy()[warm], va_pairs["_col"].to_numpy()[warm]]).ravel() > 0
            n_seen_dropped = int(seen.sum())
            va_pairs = va_pairs[~seen]
        # evaluated users in order of first appearance in the validation frame
        codes, users = pd.factorize(va_pairs[user_col], sort=False)
        users = np.asarray(users)
        by_user = np.argsort(codes, kind="stable")
        cols_sorted = va_pairs["_col"].to_numpy()[by_user]
        bounds: Any = np.cumsum(np.bincount(codes, minlength=len(users)))[:-1] if len(users) else []
        relevant_idx = [np.sort(c) for c in np.split(cols_sorted, bounds)] if len(users) else []
        m, cold = _user_rows(hist, hist_users, users)
        stats: dict[str, Any] = {
            "n_items": int(len(item_ids)), "n_train_users": int(len(train_users)), "n_users": int(len(users)),
            "n_cold_users": int(cold.sum()),
            "n_users_no_relevant": int(va[user_col].nunique() - len(users)),
            "n_relevant": int(sum(len(r) for r in relevant_idx)),
            "n_relevant_unknown_item": int((~known).sum()), "n_relevant_seen_dropped": n_seen_dropped,
            "n_valid_pairs": int(n_valid_pairs),
        }
        if history is not None:
            stats["history"] = "train + validation"
        return cls(item_ids, popularity, users, sp.csr_matrix(m, dtype=np.float64), relevant_idx, exclude_seen,
                   full, stats)

    # -- views in raw ids, for models that produce their own top-k -----------------------------
    @property
    def relevant(self) -> list[set]:
        """Each evaluated user's relevant raw item ids."""
        return [set(self.item_ids[r].tolist()) for r in self.relevant_idx]

    @property
    def seen(self) -> list[set]:
        """Each evaluated user's training-positive raw item ids (empty for cold users)."""
        m = self.train_matrix
        return [set(self.item_ids[m.indices[m.indptr[i]:m.indptr[i + 1]]].tolist()) for i in range(m.shape[0])]

    def evaluate_topk(self, topk_item_ids: Sequence[Sequence[Hashable]], k: Ks = 10) -> dict:
        """Recall@k / NDCG@k of raw-id top-k lists, one per ``self.users`` entry in that order.
        Seen items must already be excluded (``drop_seen``) when ``exclude_seen`` is set."""
        return topk_metrics(topk_item_ids, self.relevant, k)

    def _batch_size(self, batch_size: Optional[int]) -> int:
        if batch_size is not None:
            return max(1, int(batch_size))
        return max(1, DEFAULT_BLOCK_ELEMENTS // max(1, len(self.item_ids)))

    def topk(self, score_batch: Callable[[np.ndarray, sp.csr_matrix], np.ndarray], k: int,
             batch_size: Optional[int] = None) -> np.ndarray:
        """Top-k catalogue indices [n_users, k] (-1 padded). ``score_batch(rows, X_rows)`` gets the
        positions of a batch of evaluated users and their binary training rows and returns dense
        scores [batch, n_items] over the catalogue (``item_ids`` order)."""
        n = len(self.users)
        bs = self._batch_size(batch_size)
        out = np.full((n, k), -1, dtype=np.int64)
        for start in range(0, n, bs):
            rows = np.arange(start, min(start + bs, n))
            xb = self.train_matrix[rows]
            s = np.array(score_batch(rows, xb), dtype=np.float64)  # a copy: the caller's array stays intact
            if s.shape != (len(rows), len(self.item_ids)):
                raise ValueError(f"scores of shape {s.shape}, expected {(len(rows), len(self.item_ids))}")
            if self.exclude_seen:
                r, c = xb.nonzero()
                s[r, c] = -np.inf
            out[rows] = topk_indices(s, k)
        return out

    def evaluate_scores(self, score_batch: Callable[[np.ndarray, sp.csr_matrix], np.ndarray], k: Ks = 10,
                        batch_size: Optional[int] = None, units: bool = False) -> dict:
        """Recall@k / NDCG@k of a scoring function (see ``topk``) under this protocol (``units``: the
        per-user values too, under ``"units"``, in ``users`` order)."""
        ks = _ks(k)
        idx = self.topk(score_batch, ks[-1], batch_size)
        return topk_metrics(idx, self.relevant_idx_sets(), ks, units=units)  # type: ignore[arg-type]  # rows of ids

    def relevant_idx_sets(self) -> list[set]:
        return [set(r.tolist()) for r in self.relevant_idx]


# ---------------------------------------------------------------------------------------------
# retrieval baselines (score functions over the catalogue)
# ---------------------------------------------------------------------------------------------

def _popularity_order(catalogue: np.ndarray, train_items: pd.Series) -> tuple[np.ndarray, np.ndarray]:
    """The catalogue in popularity order (training users per item, descending; ties by item id)
    and those counts (``train_items``: the item of each distinct training user-item pair)."""
    pop = train_items.value_counts().reindex(catalogue, fill_value=0)
    order = pd.DataFrame({"item": catalogue, "pop": pop.to_numpy()})
    try:
        order = order.sort_values(["pop", "item"], ascending=[False, True], kind="mergesort")
    except TypeError:  # ids of mixed, unorderable types: keep first appearance among ties
        order = order.sort_values("pop", ascending=False, kind="mergesort")
    return order["item"].to_numpy(), order["pop"].to_numpy(dtype=np.int64)


def _user_rows(full: sp.csr_matrix, train_users: pd.Index, users: np.ndarray) -> tuple[sp.csr_matrix, np.ndarray]:
    """The training rows of ``users`` (a zero row for a user without training positives) and which are cold."""
    rows = train_users.get_indexer(users) if len(users) else np.array([], dtype=np.int64)
    cold = rows < 0
    m = full[np.where(cold, 0, rows)] if len(users) else sp.csr_matrix((0, full.shape[1]))
    if cold.any():
        m = sp.diags((~cold).astype(np.float64)) @ m
        m.eliminate_zeros()
    return m, cold


def popularity_scorer(p: TopKProtocol) -> Callable:
    pop = p.popularity.astype(np.float64)
    return lambda rows, xb: np.broadcast_to(pop, (len(rows), len(pop)))


def cosine_similarity_matrix(x: sp.spmatrix, shrinkage: float = 0.0) -> sp.csr_matrix:
    """Item-item cosine similarity of a binary user x item matrix, zero diagonal (sparse). ``shrinkage``
    > 0: ``co_ij / (sqrt(co_ii co_jj) + shrinkage)`` (the item_knn model; pairs of few users count less)."""
    x = sp.csr_matrix(x, dtype=np.float64)
    x.data[:] = 1.0
    co = (x.T @ x).tocsr()
    norm = np.sqrt(np.asarray(co.diagonal()))
    if shrinkage > 0:
        s = co.tocoo()
        s.data = s.data / (norm[s.row] * norm[s.col] + shrinkage)
        s = s.tocsr()
        s.setdiag(0.0)
        s.eliminate_zeros()
        return s
    inv = np.divide(1.0, norm, out=np.zeros_like(norm), where=norm > 0)
    s = (sp.diags(inv) @ co @ sp.diags(inv)).tocsr()
    s.setdiag(0.0)
    s.eliminate_zeros()
    return s


def cooccurrence_scorer(p: TopKProtocol) -> Callable:
    sim = cosine_similarity_matrix(p.full_train_matrix)
    if sim.nnz > 0.2 * sim.shape[0] * sim.shape[1] and sim.shape[0] <= 20_000:
        sim = sim.toarray()  # dense enough: sparse @ dense is faster

    def score(rows: np.ndarray, xb: sp.csr_matrix) -> np.ndarray:
        s = xb @ sim
        return s.toarray() if sp.issparse(s) else np.asarray(s)
    return score


def ease_weights(x: sp.spmatrix, lam: float = DEFAULT_EASE_LAMBDA) -> np.ndarray:
    """EASE item-item weights: ``B = I - P diag(1/diag(P))``, ``P = (X^T X + lam I)^-1`` (zero diagonal).

    ``X^T X + lam I`` is symmetric positive definite: inverted in place through its Cholesky
    factor (LAPACK potrf/potri), so the peak is about two dense n_items^2 float64 matrices."""
    x = sp.csr_matrix(x, dtype=np.float64)
    g = np.asfortranarray((x.T @ x).toarray())
    g[np.diag_indices_from(g)] += lam
    c, info = lapack.dpotrf(g, lower=False, clean=False, overwrite_a=True)
    if info != 0:
        raise np.linalg.LinAlgError(f"Cholesky of X^T X + lambda I failed (info={info}); lambda={lam}")
    p, info = lapack.dpotri(c, lower=False, overwrite_c=True)
    if info != 0:
        raise np.linalg.LinAlgError(f"inverse from the Cholesky factor failed (info={info})")
    del g, c
    n = p.shape[0]
    step = 1024
    for i in range(0, n, step):  # potri fills the upper triangle: mirror it, one block of columns at a time
        j = min(i + step, n)
        blk = p[i:j, i:j]
        blk[:] = np.triu(blk) + np.triu(blk, 1).T
        p[j:, i:j] = p[i:j, j:].T
    d = -np.diag(p).copy()
    p /= d[None, :]               # B_ij = -P_ij / P_jj off the diagonal
    p[np.diag_indices_from(p)] = 0.0
    return p


def ease_scorer(p: TopKProtocol, lam: float = DEFAULT_EASE_LAMBDA) -> Callable:
    b = ease_weights(p.full_train_matrix, lam)
    return lambda rows, xb: np.asarray(xb @ b)


@dataclass
class RetrievalBaselineOptions:
    """The protocol's (when none is passed): ``exclude_seen``, ``label``/``min_label`` (see
    ``positives``); ``ease_lambda``; EASE is skipped above ``ease_max_items`` catalogue items;
    ``batch_size`` users scored at a time (None: from the catalogue size)."""

    exclude_seen: bool = True
    label: Optional[str] = None
    min_label: Optional[float] = None
    ease_lambda: float = DEFAULT_EASE_LAMBDA
    ease_max_items: int = DEFAULT_EASE_MAX_ITEMS
    batch_size: Optional[int] = None
    units: bool = False  # per-user values under "units" (confidence intervals)


def retrieval_baselines(train: pd.DataFrame, valid: pd.DataFrame, user_col: str, item_col: str, k: Ks = 10,
                        protocol: Optional[TopKProtocol] = None, options: Optional[RetrievalBaselineOptions] = None,
                        **overrides) -> dict[str, dict]:
    """most_popular, item_cooccurrence and ease under the top-k protocol (module docstring).

    Each result: ``recall@k``, ``ndcg@k`` (for every k given), ``n_users``, ``n_items``,
    ``seconds``; EASE above ``ease_max_items`` catalogue items is ``{"skipped": reason}``.
    Pass ``protocol`` (from ``TopKProtocol.build``) to reuse one already built. ``options``
    (:class:`RetrievalBaselineOptions`; each field also settable by keyword).
    """
    o = replace(options or RetrievalBaselineOptions(), **overrides)
    p = protocol or TopKProtocol.build(train, valid, user_col, item_col, o.label, o.min_label, o.exclude_seen)
    n_items = len(p.item_ids)
    out: dict[str, dict] = {}
    makers: dict[str, Callable[[], Callable]] = {
        "most_popular": lambda: popularity_scorer(p),
        "item_cooccurrence": lambda: cooccurrence_scorer(p),
        "ease": lambda: ease_scorer(p, o.ease_lambda),
    }
    for name, make in makers.items():
        if name == "ease" and n_items > o.ease_max_items:
            reason = (f"catalogue of {n_items} items exceeds ease_max_items={o.ease_max_items} "
                      f"(EASE inverts a dense {n_items} x {n_items} matrix)")
            log.info("retrieval baseline ease skipped: %s", reason)
            out[name] = {"skipped": reason}
            continue
        t0 = time.perf_counter()
        res = p.evaluate_scores(make(), k, o.batch_size, units=o.units)
        out[name] = {**res, "n_items": n_items, "seconds": time.perf_counter() - t0}
    return out


# ---------------------------------------------------------------------------------------------
# lift in words
# ---------------------------------------------------------------------------------------------

def finite(v) -> bool:
    """A real, finite number (not None, NaN, inf, a bool or text)."""
    try:
        return v is not None and not isinstance(v, bool) and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def best_baseline(baselines: Mapping[str, Mapping], metric: str,
                  higher_is_better: bool) -> tuple[dict[str, float], Optional[str], Optional[float]]:
    """The baselines with a finite ``metric`` value (``{name: value}``; skipped ones left out), the
    best of them and its value ((None, None) when there is none)."""
    usable = {n: float(r[metric]) for n, r in baselines.items() if isinstance(r, Mapping) and finite(r.get(metric))}
    if not usable:
        return usable, None, None
    best = (max if higher_is_better else min)(usable, key=usable.__getitem__)
    return usable, best, usable[best]


def lift_sentence(model_name: str, model_value: float, baselines: Mapping[str, Mapping], metric: str,
                  higher_is_better: Optional[bool] = None) -> str:
    """One plain-words sentence: the model's ``metric`` against the best baseline that has it.

    ``higher_is_better`` defaults to False for metrics with "loss" in their name. Skipped
    baselines and NaN values are named in the sentence, never compared.
    """
    hib = ("loss" not in metric.lower()) if higher_is_better is None else higher_is_better
    usable, best, bv = best_baseline(baselines, metric, hib)
    left_out = []
    for n, r in baselines.items():
        if n in usable:
            continue
        if isinstance(r, Mapping) and "skipped" in r:
            left_out.append(f"{n} skipped: {r['skipped']}")
        else:
            left_out.append(f"{n} has no {metric} value")
    tail = f" ({'; '.join(left_out)})" if left_out else ""
    head = f"{model_name} {metric}"
    if not finite(model_value):
        return f"{head} is not available (NaN), so no lift over the baselines can be stated{tail}."
    mv = float(model_value)
    if not usable:
        return f"{head} {mv:.4f} has no baseline to compare against{tail}."
    assert bv is not None  # best_baseline gives a value whenever a baseline is usable
    ref = f"the best baseline ({best} {bv:.4f})"
    if mv == bv:
        return f"{head} {mv:.4f} is equal to {ref}{tail}."
    better = mv > bv if hib else mv < bv
    if bv == 0:
        return (f"{head} {mv:.4f} is {'above' if mv > bv else 'BELOW'} {ref}; "
                f"no percentage, the baseline is zero{tail}.")
    pct = abs(mv - bv) / abs(bv) * 100.0
    if hib:
        word = "above" if better else "BELOW"
    else:
        word = "lower (better) than" if better else "HIGHER (worse) than"
    return f"{head} {mv:.4f} is {pct:.1f}% {word} {ref}{tail}."
