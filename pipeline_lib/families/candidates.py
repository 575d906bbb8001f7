"""Candidates compete in a run (``model.candidates`` / ``session.model.candidates``; docs/models.md).

Every candidate is the run's family for its own model config (:func:`candidate_family`), trains on the
run's one ETL output in its own folder (``model/candidates/<name>/``), and is scored on the validation
split with the family's :attr:`~pipeline_lib.families.base.TaskFamily.selection_metric` -- never on a
test split. :func:`pick_winner` takes the best (ties: the first listed); the run then exports, gates,
smoke-tests and serves the winner exactly as a single-model run would. A candidate that fails to train
stays in the leaderboard with its error.

Plain typed functions; the flow (``flows/pipeline.py``) wires them into Prefect tasks and artifacts.
Each row also carries what the user reads: the candidate's figure on the *test* split (the family's
report metric, e.g. auc / recall@k) with its bootstrap confidence interval
(:attr:`CandidateRun.test`, from its :class:`~pipeline_lib.models.evaluation.BaselineReport`) -- reported,
never used for the choice. ``CandidateRun.interval`` is an optional interval of the validation metric
(:meth:`~pipeline_lib.families.base.TaskFamily.selection_interval`, None by default; :func:`set_intervals`).
"""
from __future__ import annotations

import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import pandas as pd

from pipeline_lib import report
from pipeline_lib.config import CandidateSpec, RunConfig, candidate_config, candidate_names
from pipeline_lib.families.base import TaskFamily, Trained
from pipeline_lib.paths import RunPaths

log = logging.getLogger(__name__)

CANDIDATES_DIR = "candidates"   # under the run's model/ folder
LEADERBOARD_PNG = "leaderboard.png"
LATENCY_REPEATS = 5


@dataclass(frozen=True)
class CandidatePaths(RunPaths):
    """The run's folders, with ``model`` and ``ensemble`` inside ``model/candidates/<name>/``."""

    candidate_dir: Path = Path(".")

    @property
    def model(self) -> Path:
        return self.candidate_dir

    @property
    def ensemble(self) -> Path:  # the latency probe's staged version, apart from the run's own
        return self.candidate_dir / "ensemble"


@dataclass
class CandidateRun:
    """One row of the leaderboard: a candidate's training, validation score and costs (or its error)."""

    name: str
    type: str
    family: Optional[TaskFamily] = field(default=None, repr=False)
    trained: Optional[Trained] = field(default=None, repr=False)
    metric: Optional[float] = None                  # validation selection metric
    interval: Optional[tuple[float, float]] = None  # its CI, where a family computes one (default: none)
    test: Optional[dict] = None                     # {metric, value, lo, hi, level} on the test split (reported only)
    train_seconds: Optional[float] = None
    size_bytes: Optional[int] = None                # bytes of its model dir
    latency_ms: Optional[float] = None              # median offline scoring of one request row
    error: Optional[str] = None
    winner: bool = False

    @property
    def ok(self) -> bool:
        return self.error is None and self.metric is not None and not math.isnan(self.metric)


@dataclass
class Competition:
    """The candidates of one run, scored on ``metric`` (validation split), with the winner flagged."""

    metric: str
    runs: list[CandidateRun]

    @property
    def winner(self) -> CandidateRun:
        return next(r for r in self.runs if r.winner)

    def rows(self) -> list[dict]:
        """The leaderboard (summary.json ``leaderboard``): one dict per candidate, in listed order."""
        return [leaderboard_row(r, self.metric) for r in self.runs]


class NoCandidateTrained(RuntimeError):
    """Every candidate failed: the message lists each one's error."""


def candidate_run_config(cfg: RunConfig, spec: CandidateSpec) -> RunConfig:
    """The run config a single-model run of ``spec`` would have (its model config, no candidates)."""
    if cfg.task == "session":
        model = candidate_config(cfg.session.model, spec)
        return cfg.model_copy(update={"session": cfg.session.model_copy(update={"model": model})})
    return cfg.model_copy(update={"model": candidate_config(cfg.model, spec)})


def candidate_families(fam: TaskFamily) -> list[tuple[str, TaskFamily]]:
    """(name, family) of each candidate of ``fam``'s config, in listed order (empty: a single-model run)."""
    specs = fam.cfg.candidates or []
    return [(name, fam.with_config(candidate_run_config(fam.cfg, spec)))
            for name, spec in zip(candidate_names(specs), specs)]


def candidate_paths(paths: RunPaths, name: str) -> CandidatePaths:
    return CandidatePaths(paths.root, paths.model / CANDIDATES_DIR / name)


def model_type(fam: TaskFamily) -> str:
    cfg = fam.cfg
    return cfg.session.model.type if cfg.task == "session" else cfg.model.type


def train_candidate(name: str, fam: TaskFamily, paths: RunPaths, etl_out: Any,
                    clock: Callable[[], float] = time.perf_counter) -> CandidateRun:
    """Train one candidate in its own folder and score it on validation; an exception becomes the row's error."""
    run = CandidateRun(name, model_type(fam), fam)
    cpaths = candidate_paths(paths, name)
    t0 = clock()
    try:
        run.trained = fam.train(cpaths, etl_out)
        run.train_seconds = round(clock() - t0, 2)
        run.metric = float(fam.selection_score(run.trained))
        run.interval = fam.selection_interval(run.trained, etl_out)
        run.test = test_figure(run.trained)
    except Exception as exc:  # reported in the leaderboard; the run goes on with the others
        log.warning("candidate %s (%s) failed: %s: %s", name, run.type, type(exc).__name__, exc)
        run.error, run.trained = f"{type(exc).__name__}: {exc}", None
        return run
    run.size_bytes = dir_bytes(Path(run.trained.model.model_dir))
    run.latency_ms = measure_latency(fam, cpaths, etl_out, run.trained, clock)
    return run


def test_figure(trained: Trained) -> Optional[dict]:
    """The candidate's report metric on the test split with its bootstrap interval (None without one)."""
    b = trained.baselines
    iv = ((getattr(b, "intervals", None) or {}).get("model") or {}).get(getattr(b, "metric", None))
    if not iv or iv.get("value") is None:
        return None
    return {"metric": b.metric, "value": iv["value"], "lo": iv.get("lo"), "hi": iv.get("hi"), "level": iv.get("level")}


def dir_bytes(path: Path) -> int:
    """Bytes on disk of the files under ``path`` (a file: its size; missing: 0)."""
    if path.is_file():
        return path.stat().st_size
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) if path.exists() else 0


def measure_latency(fam: TaskFamily, paths: RunPaths, etl_out: Any, trained: Trained,
                    clock: Callable[[], float] = time.perf_counter, repeats: int = LATENCY_REPEATS) -> Optional[float]:
    """Median milliseconds of the candidate's offline scoring of one request row (after one warm-up call);
    None when the family has no probe or the probe fails (logged: latency is informative, not a gate)."""
    try:
        probe = fam.latency_probe(paths, etl_out, trained)
        if probe is None:
            return None
        row = fam.smoke_rows(etl_out, 1)
        probe(row)
        times = []
        for _ in range(repeats):
            t0 = clock()
            probe(row)
            times.append(clock() - t0)
        return round(1000 * statistics.median(times), 3)
    except Exception as exc:
        log.warning("latency of %s not measured: %s: %s", model_type(fam), type(exc).__name__, exc)
        return None


def pick_winner(runs: list[CandidateRun]) -> int:
    """Index of the best validation metric (higher is better); ties: the first listed. NoCandidateTrained
    when none has a metric."""
    scored = [(i, r.metric) for i, r in enumerate(runs) if r.ok]
    if not scored:
        raise NoCandidateTrained("no candidate trained: " + "; ".join(f"{r.name}: {r.error}" for r in runs))
    best = max(float(m) for _, m in scored if m is not None)
    return next(i for i, m in scored if m == best)


def decide(metric: str, runs: list[CandidateRun]) -> Competition:
    """Flag the winner among ``runs`` (see :func:`pick_winner`)."""
    win = pick_winner(runs)
    for i, r in enumerate(runs):
        r.winner = i == win
    return Competition(metric, runs)


def set_intervals(comp: Competition, intervals: dict[str, Optional[tuple[float, float]]]) -> Competition:
    """Attach each candidate's 95% CI by name (the protocol's bootstrap); the winner stays the point estimate's."""
    for r in comp.runs:
        r.interval = intervals.get(r.name, r.interval)
    return comp


def leaderboard_row(r: CandidateRun, metric: str) -> dict:
    lo, hi = r.interval if r.interval else (None, None)
    t = r.test or {}
    return {"candidate": r.name, "type": r.type, "metric": metric, "value": r.metric, "ci_low": lo, "ci_high": hi,
            "test_metric": t.get("metric"), "test_value": t.get("value"), "test_ci_low": t.get("lo"),
            "test_ci_high": t.get("hi"), "train_seconds": r.train_seconds, "size_bytes": r.size_bytes, "latency_ms": r.latency_ms,
            "winner": r.winner, "error": r.error}


def leaderboard_table(comp: Competition) -> list[dict]:
    """The Prefect table artifact: figures rounded to 4 significant digits, the CI as ``[low, high]``."""
    out = []
    for row in comp.rows():
        test = (f"{row['test_metric']} {report.num(row['test_value'])} [{report.num(row['test_ci_low'])}, "
                f"{report.num(row['test_ci_high'])}]" if row["test_value"] is not None else "")
        out.append({"candidate": row["candidate"] + (" (winner)" if row["winner"] else ""), "type": row["type"],
                    f"validation {comp.metric} (choice)": report.num(row["value"]) if row["value"] is not None else "",
                    "test [95% CI] (reported)": test, "train s": row["train_seconds"], "size MB": _mb(row["size_bytes"]),
                    "latency ms": row["latency_ms"], "error": row["error"] or ""})
    return out


def _mb(n: Optional[int]) -> Optional[float]:
    return None if n is None else round(n / 1e6, 3)


def leaderboard_text(comp: Competition) -> str:
    """The console block printed at the end of training."""
    table = pd.DataFrame(leaderboard_table(comp)).to_string(index=False)
    w = comp.winner
    return f"candidates (validation {comp.metric}; the best is exported):\n{table}\nwinner: {w.name} ({w.type})"


def plot_leaderboard(comp: Competition, path: Path) -> Optional[Path]:
    """A bar chart of the validation metric per candidate (error bars where a CI exists; the winner
    highlighted) saved as ``path``; None when no candidate has a metric."""
    rows = [r for r in comp.runs if r.ok]
    if not rows:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    values = [float(r.metric or 0.0) for r in rows]
    err = [[(v - r.interval[0]) if r.interval else 0 for v, r in zip(values, rows)],
           [(r.interval[1] - v) if r.interval else 0 for v, r in zip(values, rows)]]
    fig, ax = plt.subplots(figsize=(max(4, 1.2 * len(rows) + 2), 3.5))
    ax.bar([r.name for r in rows], values, color=["tab:green" if r.winner else "tab:gray" for r in rows],
           yerr=err if any(r.interval for r in rows) else None, capsize=4)
    for i, v in enumerate(values):
        ax.annotate(f"{v:.4g}", (i, v), ha="center", va="bottom", fontsize=8)
    tested = [(i, r.test) for i, r in enumerate(rows) if r.test and r.test.get("lo") is not None]
    if tested:  # the test figure with its bootstrap interval (reported, not used for the choice)
        t_vals = [float(t["value"]) for _, t in tested]
        ax.errorbar([i + 0.25 for i, _ in tested], t_vals, fmt="o", color="black", capsize=3,
                    yerr=[[v - float(t["lo"]) for v, (_, t) in zip(t_vals, tested)],
                          [float(t["hi"]) - v for v, (_, t) in zip(t_vals, tested)]],
                    label=f"test {tested[0][1]['metric']} (95% CI)")
        ax.legend(fontsize=7, loc="lower right")
    ax.set_ylabel(f"validation {comp.metric} (bars)")
    ax.set_title(f"candidates: winner {comp.winner.name}")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def leaderboard_markdown(comp: Competition, png: Optional[Path]) -> str:
    """The leaderboard artifact: the table and the chart (embedded as a data URI, like the learning curve)."""
    table = leaderboard_table(comp)
    lines = ["# candidates", "", f"validation {comp.metric}; the winner (**{comp.winner.name}**) is exported, "
             "gated and served", "", "| " + " | ".join(table[0]) + " |", "|" + "---|" * len(table[0])]
    lines += ["| " + " | ".join("" if v is None else str(v) for v in row.values()) + " |" for row in table]
    if png is not None and png.exists():
        lines += ["", report.image_markdown(png, "leaderboard")]
    return "\n".join(lines)
