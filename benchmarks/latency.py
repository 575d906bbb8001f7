"""Per-call latency of one callable, shared by the benchmarks that time requests one after the other
(top-k serving, user-id requests, ANN search)."""
from __future__ import annotations

import time
from typing import Callable

import numpy as np


def timed(fn: Callable[[], object], n: int, seconds: float) -> dict:
    """``fn`` once to warm up, then up to ``n`` timed calls (fewer once ``seconds`` have passed):
    ``{"requests", "p50_ms", "p99_ms"}``."""
    fn()
    lat, deadline = [], time.perf_counter() + seconds
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        lat.append(time.perf_counter() - t0)
        if t0 > deadline:
            break
    a = np.asarray(lat) * 1000.0
    return {"requests": len(lat), "p50_ms": round(float(np.percentile(a, 50)), 3),
            "p99_ms": round(float(np.percentile(a, 99)), 3)}


def budget(quick: bool = False, requests_cap: int | None = None, seconds_cap: float | None = None) -> tuple:
    """(calls, seconds) per timed point: 100 / 4 s, quick 30 / 2 s, each capped when a cap is given."""
    n, secs = (30, 2.0) if quick else (100, 4.0)
    return (min(n, requests_cap) if requests_cap else n), (seconds_cap or secs)
