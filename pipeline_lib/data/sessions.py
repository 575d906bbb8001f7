"""Stage 1 -- raw data for ``task: session``: the synthetic event-log generator and reading the user's event files.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline_lib.config import DataConfig, SessionConfig, SessionSyntheticConfig, TableConfig
from pipeline_lib.data.sources import dates_to_epoch_seconds, read_table
from pipeline_lib.errors import DataValidationError, Problem

# --- the synthetic default ---------------------------------------------------------------------


@dataclass
class _Catalogue:
    """The synthetic catalogue's structure: each item's successors and their weights, the items of
    each category with their in-category probabilities, and the global popularity."""

    succ: np.ndarray
    succ_w: np.ndarray
    by_cat: list
    p_cat: list
    p_global: np.ndarray


def _next_item(rng: np.random.Generator, r: float, cur: int, c: int, visited: set, cat: _Catalogue,
               cfg: SessionSyntheticConfig) -> int:
    """One move of a session (successor, intent or popular item), never to an item the session
    already holds: people rarely click the same item twice in a row of browsing, and the default
    protocol (``session.exclude_seen``) never recommends it. Gives up after a few draws (tiny
    catalogues) and then allows a revisit."""
    succ, succ_w, by_cat, p_cat, p_global = cat.succ, cat.succ_w, cat.by_cat, cat.p_cat, cat.p_global
    for _ in range(8):
        if r < cfg.p_successor:
            w = np.where(np.isin(succ[cur], list(visited)), 0.0, succ_w[cur])
            if w.sum() > 0:
                return int(succ[cur, rng.choice(len(w), p=w / w.sum())])
            r = cfg.p_successor  # every successor seen: an intent move instead
        if r < cfg.p_successor + cfg.p_intent:
            nxt = int(rng.choice(by_cat[c], p=p_cat[c]))
        else:
            nxt = int(rng.choice(len(p_global), p=p_global))
        if nxt not in visited:
            return nxt
    return nxt


def generate_sessions(cfg: SessionSyntheticConfig, seed: int) -> pd.DataFrame:
    """An event log with learnable sequential structure.

    Items belong to categories (Zipf popularity within a category). Every item has a few
    *successors* (mostly in its own category) with Dirichlet weights. A session draws an intent
    category, starts on an item of it, and then moves: with ``p_successor`` to a successor of the
    current item (a Markov transition), with ``p_intent`` to an item of the session's intent
    category (a session-level dependency a last-item model cannot see), otherwise to a globally
    popular item (noise), never to an item the session already holds (:func:`_next_item`). Lengths are geometric (mean ``mean_length``) clipped to
    ``[min_length, max_length]``; gaps between events are log-normal seconds.
    """
    rng = np.random.default_rng(seed)
    n, C = cfg.n_items, cfg.n_categories
    category = rng.integers(0, C, n)
    pop = 1.0 / np.power(np.arange(1, n + 1), cfg.popularity_skew)
    pop = pop[rng.permutation(n)]
    p_global = pop / pop.sum()
    by_cat = [np.flatnonzero(category == c) for c in range(C)]
    by_cat = [idx if len(idx) else rng.integers(0, n, 1) for idx in by_cat]
    p_cat = [pop[idx] / pop[idx].sum() for idx in by_cat]
    cat_weight = np.array([pop[idx].sum() for idx in by_cat])
    cat_weight /= cat_weight.sum()

    S = cfg.successors
    succ = np.empty((n, S), dtype=np.int64)
    for i in range(n):
        own = by_cat[category[i]]
        k_own = S - 1 if S > 1 else S
        succ[i, :k_own] = rng.choice(own, size=k_own, p=p_cat[category[i]])
        succ[i, k_own:] = rng.integers(0, n, S - k_own)
    succ_w = rng.dirichlet(np.full(S, 0.6), size=n)

    lengths = np.clip(rng.geometric(1.0 / max(cfg.mean_length, 1.0), cfg.n_sessions), cfg.min_length, cfg.max_length)
    intents = rng.choice(C, size=cfg.n_sessions, p=cat_weight)
    starts = np.sort(rng.uniform(0, cfg.days * 86400.0, cfg.n_sessions))
    total = int(lengths.sum())
    items = np.empty(total, dtype=np.int64)
    sess = np.repeat(np.arange(cfg.n_sessions, dtype=np.int64), lengths)
    u = rng.random(total)
    catalogue = _Catalogue(succ, succ_w, by_cat, p_cat, p_global)
    pos = 0
    for s in range(cfg.n_sessions):
        c = intents[s]
        cur = rng.choice(by_cat[c], p=p_cat[c])
        items[pos] = cur
        visited = {int(cur)}
        for j in range(1, lengths[s]):
            cur = _next_item(rng, u[pos + j], cur, c, visited, catalogue, cfg)
            visited.add(int(cur))
            items[pos + j] = cur
        pos += lengths[s]
    gaps = np.exp(rng.normal(3.5, 1.0, total))  # seconds
    first = np.r_[0, np.cumsum(lengths)[:-1]]
    gaps[first] = 0.0
    t = np.cumsum(gaps)
    t = t - np.repeat(t[first], lengths) + np.repeat(starts, lengths)
    df = pd.DataFrame({
        "session_id": sess + 1,
        "item_id": items + 1,  # raw ids start at 1
        "item_category": category[items] + 1,
        "timestamp": t.astype(np.int64) + 1_700_000_000,
    })
    # an event log arrives in time order, sessions interleaved
    return df.sort_values(["timestamp", "session_id"], kind="stable").reset_index(drop=True)


# --- raw stage ---------------------------------------------------------------------------------


def write_raw_events(data: DataConfig, session: SessionConfig, seed: int, out_dir: Path) -> Path:
    """Materialise the event log as ``out_dir/interactions.parquet`` (synthetic or the user's file).

    ``data.source: parquet`` reads ``data.path``; ``files`` reads ``data.interactions`` (CSV or
    parquet, with ``rename:``) and left-joins an optional ``data.items`` table on the item id.
    Only the session columns (``session.columns``) are kept from each file; the others (an unnamed
    index column, anything unused) are ignored and listed in the load report. A used column
    present in both files (other than the item id) is an error naming both.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    out = out_dir / "interactions.parquet"
    cols = session.columns
    report: dict = {"source": data.source, "files": {}, "column_sources": {}, "unmatched": []}
    if data.source == "synthetic":
        df = generate_sessions(session.synthetic, seed)
        df = df.rename(columns={"session_id": cols.session_id, "item_id": cols.item_id, "timestamp": cols.timestamp})
        if cols.item_features != ["item_category"]:
            df = df.drop(columns=["item_category"])
    elif data.source in ("parquet", "files"):
        keep = cols.raw_columns
        spec = TableConfig(path=data.path, format="parquet") if data.source == "parquet" else data.interactions
        assert spec is not None  # RunConfig requires data.interactions for source 'files'
        inter = read_table("interactions", spec, keep)
        tables = [inter]
        df = inter.df
        report["files"]["interactions"] = spec.path
        report["column_sources"] = {str(c): spec.path for c in df.columns}
        if data.source == "files" and data.items is not None:
            items = read_table("items", data.items, keep)
            tables.append(items)
            report["files"]["items"] = data.items.path
            key = cols.item_id
            problems = [Problem(t.file, key, f"join key missing from the {t.role} table", example=t.all_columns[:10])
                        for t in tables if key not in t.df.columns]
            problems += [Problem(data.items.path, c, f"column also present in {spec.path}; rename it (rename:)")
                         for c in items.df.columns if c != key and c in df.columns]
            if problems:
                raise DataValidationError(problems)
            df = df.merge(items.df.drop_duplicates(key), on=key, how="left")
            report["column_sources"].update({str(c): data.items.path for c in items.df.columns if c != key})
        ignored = {t.file: list(t.ignored) for t in tables if t.ignored}
        if ignored:
            report["ignored_columns"] = ignored
        if cols.timestamp in df.columns and df[cols.timestamp].dtype == object:
            df[cols.timestamp] = dates_to_epoch_seconds(df[cols.timestamp])
    else:
        raise ValueError(f"task: session reads data.source synthetic, parquet or files, not '{data.source}'")
    df.to_parquet(out, index=False)
    (out_dir / "load_report.json").write_text(json.dumps(report, indent=2, default=str))
    return out


