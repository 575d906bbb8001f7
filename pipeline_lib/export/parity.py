"""The one served/exported-vs-offline check of every family.

Ranking versions answer one score per row; top-k versions (retrieval, two-stage, session) answer
``(item ids, scores)``: the ids must be equal (same order), the scores within ``atol``. An item that
a top-k answer leaves out (``-inf``, e.g. a session with fewer than k items left) matches ``-inf``.
"""
from __future__ import annotations

from typing import Union

import numpy as np


class ParityError(AssertionError):
    """Exported, in-process or served answers differ from the offline (training-time) path."""


Answer = Union[np.ndarray, tuple[np.ndarray, np.ndarray]]


def score_diff(scores: np.ndarray, want: np.ndarray) -> float:
    """Largest |score - offline|; ``-inf`` on both sides counts as equal; ``inf`` for other shapes."""
    scores, want = np.asarray(scores), np.asarray(want)
    if scores.shape != want.shape:
        return float("inf")
    both_inf = np.isneginf(scores) & np.isneginf(want)
    d = np.abs(np.where(both_inf, 0.0, scores.astype(np.float64) - np.where(both_inf, 0.0, want)))
    return float(np.max(d)) if d.size else 0.0


def check_parity(name: str, got: Answer, want: Answer, atol: float) -> float:
    """Raise :class:`ParityError` unless ``got`` equals ``want`` (ids exactly, scores within ``atol``);
    returns the largest score difference. ``name`` says which path was checked (in the message)."""
    if isinstance(want, tuple):
        (ids, got), (want_ids, want) = got, want
        if ids.shape != want_ids.shape:
            raise ParityError(f"{name}: top-k shape {ids.shape} != offline {want_ids.shape}")
        bad = np.nonzero((ids != want_ids).any(axis=1))[0] if ids.ndim == 2 else np.nonzero(ids != want_ids)[0]
        if len(bad):
            i = bad[0]
            raise ParityError(f"{name}: top-k item ids differ from offline in {len(bad)} row(s); row {i}: "
                              f"{np.asarray(ids[i]).tolist()} vs {np.asarray(want_ids[i]).tolist()}")
    got, want = np.asarray(got), np.asarray(want)
    if got.shape != want.shape:
        raise ParityError(f"{name}: shape {got.shape} != offline {want.shape}")
    diff = score_diff(got, want)
    if not diff <= atol:
        raise ParityError(f"{name}: max |{name.split(' (')[0].split()[-1]} - offline| = {diff:.3g} > {atol}")
    return diff
