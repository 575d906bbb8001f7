"""Online evaluation: impressions joined with feedback, per served version and per day.

:func:`attribute` explodes each impression record into its first ``k`` shown items and marks an item clicked
when an accepted feedback event names it: by ``request_id`` + item (an event up to the attribution window after
the impression), or by ``user_id`` + item (the latest impression of that user and item at most the window before
the event). :func:`evaluate` then computes, per version (overall and per UTC day):

- ``ctr``: clicked shown items / shown items in the first k (CTR@k), with a bootstrap interval over the
  impression records (:mod:`pipeline_lib.models.intervals`);
- ``hit_rate``: share of impression records with at least one click in the first k, with its interval;
- ``coverage``: distinct items shown / distinct items shown by any version;
- ``novelty``: mean ``-log2`` of the share of all impression records that showed the item.

Versions are compared in the order they were first served: each with the one before it, as the difference of
CTR with a bootstrap interval (the two versions' records resampled independently). A version whose interval is
wholly below zero is a regression, named in the report (``regressions``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np
import pandas as pd

from pipeline_lib.models.intervals import Interval, MeanUnits, interval, percentiles, resample_counts

GROUP = ["request_id", "user_id"]


@dataclass
class RatioUnits:
    """sum(numerator) / sum(denominator) over units (impression records): CTR@k under bootstrap weights."""

    num: np.ndarray
    den: np.ndarray

    @property
    def n(self) -> int:
        return len(self.num)

    def weighted(self, w: np.ndarray) -> np.ndarray:
        den = w @ self.den
        with np.errstate(invalid="ignore", divide="ignore"):
            return np.where(den > 0, (w @ self.num) / np.maximum(den, 1e-300), np.nan)

    def point(self) -> float:
        return float(self.num.sum() / self.den.sum()) if self.den.sum() > 0 else float("nan")


def explode(impressions: pd.DataFrame, k: int) -> pd.DataFrame:
    """One row per shown item in the first ``k``: request_id, user_id, ts, version, item_id, rank."""
    if impressions.empty:
        return pd.DataFrame(columns=["request_id", "user_id", "ts", "version", "item_id", "rank"])
    frame = impressions[["request_id", "user_id", "ts", "version", "item_ids", "ranks"]].copy()
    frame = frame.explode(["item_ids", "ranks"]).dropna(subset=["item_ids"])
    frame = frame.rename(columns={"item_ids": "item_id", "ranks": "rank"})
    frame["rank"] = frame["rank"].astype(int)
    frame["item_id"] = frame["item_id"].astype(str)
    return frame[frame["rank"] <= k].reset_index(drop=True)


def attribute(impressions: pd.DataFrame, feedback: pd.DataFrame, k: int, window_s: float
              ) -> tuple[pd.DataFrame, int]:
    """(shown items with a ``clicked`` flag, feedback events attributed to no impression)."""
    shown = explode(impressions, k)
    shown["clicked"] = False
    if shown.empty or feedback.empty:
        return shown, len(feedback)
    window = pd.Timedelta(seconds=window_s)
    fb = feedback.assign(item_id=feedback["item_id"].astype(str), fb_i=np.arange(len(feedback)))
    shown["shown_i"] = np.arange(len(shown))
    # by request id + item
    by_id = fb[fb["request_id"] != ""].merge(shown[["request_id", "item_id", "ts", "shown_i"]],
                                              on=["request_id", "item_id"], suffixes=("", "_shown"))
    by_id = by_id[(by_id["ts"] - by_id["ts_shown"] <= window) & (by_id["ts"] - by_id["ts_shown"] >= -pd.Timedelta(60, "s"))]
    # by user + item: the latest impression at most the window before the event
    rest = fb[(fb["request_id"] == "") & (fb["user_id"] != "")]
    by_user = rest.merge(shown[["user_id", "item_id", "ts", "shown_i"]], on=["user_id", "item_id"],
                         suffixes=("", "_shown"))
    lag = by_user["ts"] - by_user["ts_shown"]
    by_user = by_user[(lag >= pd.Timedelta(0)) & (lag <= window)]
    by_user = by_user.sort_values("ts_shown").groupby("fb_i").tail(1)
    hits = pd.concat([by_id[["fb_i", "shown_i"]], by_user[["fb_i", "shown_i"]]])
    shown.loc[shown["shown_i"].isin(hits["shown_i"]), "clicked"] = True
    return shown.drop(columns="shown_i"), int(len(fb) - hits["fb_i"].nunique())


def _records(shown: pd.DataFrame) -> pd.DataFrame:
    """Per impression record: version, day, shown items, clicked items."""
    rec = shown.groupby(GROUP + ["version"], sort=False).agg(ts=("ts", "first"), shown=("item_id", "size"),
                                                             clicks=("clicked", "sum")).reset_index()
    rec["day"] = pd.to_datetime(rec["ts"], utc=True).dt.strftime("%Y-%m-%d")
    return rec


def _metrics(rec: pd.DataFrame, items: pd.DataFrame, share: pd.Series, all_items: int, resamples: int,
             level: float, seed: int) -> dict:
    ctr = RatioUnits(rec["clicks"].to_numpy(float), rec["shown"].to_numpy(float))
    hits = (rec["clicks"] > 0).to_numpy(float)
    shown_items = items["item_id"]
    return {
        "impressions": int(len(rec)), "items_shown": int(rec["shown"].sum()), "clicks": int(rec["clicks"].sum()),
        "ctr": _ratio_interval(ctr, resamples, seed, level).to_json(),
        "hit_rate": interval(MeanUnits(hits), resamples, seed, level).to_json(),
        "coverage": float(shown_items.nunique() / all_items) if all_items else None,
        "novelty": float(np.mean(-np.log2(share.reindex(shown_items).to_numpy()))) if len(shown_items) else None,
    }


def _ratio_interval(units: RatioUnits, resamples: int, seed: int, level: float) -> Interval:
    if not units.n or units.den.sum() <= 0:
        return Interval(float("nan"), float("nan"), float("nan"), units.n, level)
    stats = np.concatenate([units.weighted(w) for w in resample_counts(units.n, resamples, seed)])
    return Interval(units.point(), *percentiles(stats, level), units.n, level)


def difference(a: RatioUnits, b: RatioUnits, resamples: int, seed: int, level: float) -> Interval:
    """CTR(a) - CTR(b), both resampled independently (different users and requests)."""
    if not a.n or not b.n:
        return Interval(float("nan"), float("nan"), float("nan"), min(a.n, b.n), level)
    sa = np.concatenate([a.weighted(w) for w in resample_counts(a.n, resamples, seed)])
    sb = np.concatenate([b.weighted(w) for w in resample_counts(b.n, resamples, seed + 1)])
    return Interval(a.point() - b.point(), *percentiles(sa - sb, level), min(a.n, b.n), level)


def evaluate(impressions: pd.DataFrame, feedback: pd.DataFrame, k: int, window_s: float, resamples: int = 1000,
             level: float = 0.95, seed: int = 0) -> dict:
    """The online report (JSON-ready): per version, per version and day, comparisons, regressions."""
    shown, unattributed = attribute(impressions, feedback, k, window_s)
    report: dict = {"k": k, "attribution_window_s": window_s, "level": level, "feedback_events": int(len(feedback)),
                    "unattributed_feedback": unattributed, "versions": [], "daily": [], "comparisons": [],
                    "regressions": []}
    if shown.empty:
        return report
    rec = _records(shown)
    share = shown.groupby("item_id").size() / len(rec)  # an item is shown at most once per record
    all_items = shown["item_id"].nunique()
    order = rec.groupby("version")["ts"].min().sort_values().index.tolist()  # the order versions were served
    units = {}
    for version in order:
        r, items = rec[rec["version"] == version], shown[shown["version"] == version]
        units[version] = RatioUnits(r["clicks"].to_numpy(float), r["shown"].to_numpy(float))
        report["versions"].append({"version": int(version), "first_served": str(r["ts"].min()),
                                   **_metrics(r, items, share, all_items, resamples, level, seed)})
        days = items.assign(day=pd.to_datetime(items["ts"], utc=True).dt.strftime("%Y-%m-%d"))
        for day, rd in r.groupby("day"):
            report["daily"].append({"version": int(version), "day": day,
                                    **_metrics(rd, days[days["day"] == day], share, all_items, resamples, level, seed)})
    for prev, cur in zip(order, order[1:]):
        diff = difference(units[cur], units[prev], resamples, seed, level)
        row = {"version": int(cur), "previous": int(prev), "ctr_difference": diff.to_json(),
               "significant": diff.excludes(0.0)}
        report["comparisons"].append(row)
        if row["significant"] and diff.value < 0:
            report["regressions"].append(row)
    return report


def table_rows(report: dict) -> list[dict]:
    """One row per version for a table artifact."""
    def fmt(i: Optional[dict]) -> str:
        if not i or i.get("value") is None:
            return "n/a"
        return f"{i['value']:.4f} [{i['lo']:.4f}, {i['hi']:.4f}]" if i.get("lo") is not None else f"{i['value']:.4f}"

    diffs = {c["version"]: c for c in report["comparisons"]}
    rows = []
    for v in report["versions"]:
        c = diffs.get(v["version"])
        rows.append({"version": v["version"], "impressions": v["impressions"], "clicks": v["clicks"],
                     f"CTR@{report['k']}": fmt(v["ctr"]), f"hit rate@{report['k']}": fmt(v["hit_rate"]),
                     "coverage": round(v["coverage"], 4) if v["coverage"] is not None else "n/a",
                     "novelty": round(v["novelty"], 3) if v["novelty"] is not None else "n/a",
                     "CTR vs previous": (f"v{c['previous']}: {fmt(c['ctr_difference'])}"
                                         + (" (significant)" if c["significant"] else "")) if c else ""})
    return rows


def plot_ctr(report: dict, png) -> Optional[str]:
    """Per-version CTR@k per day with its interval, as a PNG at ``png`` (None when there is nothing to plot)."""
    if not report["daily"]:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.6))
    daily = pd.DataFrame(report["daily"])
    days = sorted(daily["day"].unique())
    for i, (version, d) in enumerate(daily.groupby("version")):
        x = np.array([days.index(day) for day in d["day"]]) + (i - 0.5) * 0.08
        value = np.array([c["value"] if c["value"] is not None else np.nan for c in d["ctr"]], dtype=float)
        lo = np.array([c["lo"] if c["lo"] is not None else np.nan for c in d["ctr"]], dtype=float)
        hi = np.array([c["hi"] if c["hi"] is not None else np.nan for c in d["ctr"]], dtype=float)
        ax.errorbar(x, value, yerr=[np.nan_to_num(value - lo), np.nan_to_num(hi - value)], marker="o", capsize=4,
                    label=f"v{version}")
    ax.set_xticks(range(len(days)), days)
    ax.set_xlim(-0.5, len(days) - 0.5)
    ax.set_ylabel(f"CTR@{report['k']}")
    ax.set_title(f"online CTR@{report['k']} per version ({int(report['level'] * 100)}% intervals)")
    ax.legend()
    fig.tight_layout()
    fig.savefig(png, dpi=90)
    plt.close(fig)
    return str(png)


def markdown(report: dict, image: str = "") -> str:
    """The report as markdown (a table, the regressions, the rollback) with the plot embedded."""
    rows = table_rows(report)
    head = list(rows[0]) if rows else []
    lines = [f"# online evaluation (CTR@{report['k']}, attribution window {report['attribution_window_s']:.0f} s)", ""]
    if rows:
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(str(r[h]) for h in head) + " |" for r in rows]
    else:
        lines.append("no impressions yet")
    lines += ["", f"feedback events: {report['feedback_events']}, attributed to no impression: "
              f"{report['unattributed_feedback']}", ""]
    for r in report["regressions"]:
        d = r["ctr_difference"]
        lines.append(f"**regression: version {r['version']} has a lower online CTR than version {r['previous']}** "
                     f"({d['value']:.4f} [{d['lo']:.4f}, {d['hi']:.4f}])")
    if report.get("rollback"):
        lines.append(f"**rolled back**: {report['rollback']}")
    if image:
        lines += ["", image]
    return "\n".join(lines)
