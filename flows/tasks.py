"""The pipeline's Prefect tasks, shared by every task family.

Each task is one call to the run's :class:`pipeline_lib.families.TaskFamily` plus the wiring that
belongs to Prefect: retries, caching, logging and artifacts. Domain rules live in the family.
Importing the ``flows`` package (``flows/__init__.py``) first sets up logging and warning filters,
before Prefect, Merlin and TensorFlow are imported.
"""
from __future__ import annotations

import logging
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Optional

from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext, TaskRunContext

from pipeline_lib import quiet, report
from pipeline_lib.errors import DataValidationError
from pipeline_lib.families import TaskFamily, Trained
from pipeline_lib.families import candidates
from pipeline_lib.models import tune as tuning
from pipeline_lib.paths import RunPaths
from pipeline_lib.validate import data as validate

quiet.show_progress()  # per-epoch lines, Triton start-up, ETL steps: console and Prefect UI


class _NoTracebackForBadData(logging.Filter):
    """Bad input data is the user's to fix, not a crash: Prefect logs it without a stack trace."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], DataValidationError):
            record.exc_info, record.exc_text = None, None
        return True


for _name in ("prefect.task_runs", "prefect.flow_runs"):
    logging.getLogger(_name).addFilter(_NoTracebackForBadData())


class _ApiOnlyInsideRuns(logging.Filter):
    """``pipeline_lib`` lines logged outside a flow or task run (tests, benchmarks calling the library
    directly) stay on the console instead of making Prefect's API handler warn about a missing run."""

    def filter(self, record: logging.LogRecord) -> bool:
        if FlowRunContext.get() is None and TaskRunContext.get() is None:
            record.send_to_api = False
        return True


if not any(isinstance(f, _ApiOnlyInsideRuns) for f in logging.getLogger("pipeline_lib").filters):
    logging.getLogger("pipeline_lib").addFilter(_ApiOnlyInsideRuns())


def retry_unless_bad_data(task, task_run, state) -> bool:
    """Retry transient read failures, not data the user has to fix (Prefect puts the exception in state.data)."""
    return not isinstance(getattr(state, "data", None), DataValidationError)


def stage_timer(timings: dict[str, float]) -> Callable[..., Any]:
    """``timed(name, fn, *args)``: call ``fn`` and record its wall seconds under ``name``."""
    def timed(name: str, fn: Callable[..., Any], *args: Any) -> Any:
        t0 = time.perf_counter()
        out = fn(*args)
        timings[name] = round(time.perf_counter() - t0, 2)
        return out

    return timed


@task(name="raw-data", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=retry_unless_bad_data,
      cache_policy=NO_CACHE)
def raw_data(fam: TaskFamily, paths: RunPaths) -> Path:
    return fam.raw_data(paths)


@task(name="validate", cache_policy=NO_CACHE)
def validate_data(fam: TaskFamily, paths: RunPaths, raw_path: Path) -> Path:
    logger = get_run_logger()
    checked = fam.validate(paths, raw_path)
    for w in checked.warnings:
        logger.warning("data warning: %s", w)
    create_markdown_artifact(key="data-drift", markdown=validate.drift_markdown(checked.drift),
                             description="raw-data statistics compared with the previous run")
    if checked.drift["drifted"]:
        logger.warning("data drift against %s:\n  - %s", checked.drift["previous"],
                       "\n  - ".join(f["message"] for f in checked.drift["findings"]))
    return checked.stats


def _etl_cache_key(context, parameters) -> str:
    return parameters["fam"].etl_cache_key(parameters["raw_path"])


@task(name="etl", cache_key_fn=_etl_cache_key, persist_result=True, cache_expiration=timedelta(days=7))
def run_etl(fam: TaskFamily, paths: RunPaths, raw_path: Path) -> Any:
    """Cached for every family: same raw data + same ETL inputs + same code -> the earlier run's output."""
    return fam.etl(paths, raw_path)


def cached_etl(timed: Callable[..., Any], fam: TaskFamily, paths: RunPaths, raw_path: Path) -> Any:
    """The etl task; a cached result whose run folder was deleted is recomputed."""
    etl_out = timed("etl", run_etl, fam, paths, raw_path)
    if not Path(etl_out.workflow_dir).exists():
        etl_out = timed("etl", run_etl.with_options(refresh_cache=True), fam, paths, raw_path)
    return etl_out


@task(name="tune", cache_policy=NO_CACHE)
def run_tune(fam: TaskFamily, paths: RunPaths, etl_out: Any) -> tuning.TuneResult:
    """Optional (tune.enabled): search the model's hyperparameters; training then uses the best."""
    result = fam.tune(paths, etl_out)
    create_table_artifact(key="tune-trials", table=report.compact_table(result.trials),
                          description=f"every tuning trial: validation {result.metric}, state, seconds, params")
    create_markdown_artifact(key="tune-history", markdown=tuning.history_markdown(result),
                             description="hyperparameter search: best trial and optimisation history")
    return result


def maybe_tune(timed: Callable[..., Any], fam: TaskFamily, paths: RunPaths,
               etl_out: Any) -> tuple[TaskFamily, Optional[tuning.TuneResult]]:
    """With tune.enabled: the tune task, and the family every later stage uses (the best trial's model)."""
    if not fam.tunable:
        return fam, None
    tuned = timed("tune", run_tune, fam, paths, etl_out)
    return fam.with_model(tuned.best_model), tuned


@task(name="train", cache_policy=NO_CACHE)
def train(fam: TaskFamily, paths: RunPaths, etl_out: Any) -> Trained:
    """Train, then score the family's baselines on the same split (``model.metrics["baselines"]``, ``["lift"]``)."""
    trained = fam.train(paths, etl_out)
    print(f"baselines: {trained.baselines.lift}")
    return trained


@task(name="train-candidate", cache_policy=NO_CACHE)
def train_candidate(name: str, fam: TaskFamily, paths: RunPaths, etl_out: Any) -> candidates.CandidateRun:
    """One candidate in model/candidates/<name>/, scored on validation; a failure is its leaderboard row."""
    return candidates.train_candidate(name, fam, paths, etl_out)


def compete(timed: Callable[..., Any], fam: TaskFamily, paths: RunPaths,
            etl_out: Any) -> tuple[TaskFamily, Trained, candidates.Competition]:
    """model.candidates: train each (task run ``train-<name>``), keep the best on validation; returns the
    winner's family and training (every later stage uses them) and the leaderboard."""
    runs = [timed(f"train-{name}", train_candidate.with_options(task_run_name=f"train-{name}"),
                  name, cand, paths, etl_out) for name, cand in candidates.candidate_families(fam)]
    comp = candidates.decide(fam.selection_metric, runs)
    print(candidates.leaderboard_text(comp))
    create_table_artifact(key="leaderboard", table=candidates.leaderboard_table(comp),
                          description=f"candidates of this run: validation {comp.metric}, training seconds, size, "
                          "offline latency of one request row; the winner is exported")
    png = candidates.plot_leaderboard(comp, paths.model / candidates.LEADERBOARD_PNG)
    create_markdown_artifact(key="leaderboard-plot", markdown=candidates.leaderboard_markdown(comp, png),
                             description=f"validation {comp.metric} of every candidate")
    winner = comp.winner
    assert winner.family is not None and winner.trained is not None, "decide() picks a candidate that trained"
    print(f"baselines: {winner.trained.baselines.lift}")
    return winner.family, winner.trained, comp


@task(name="train-ranker", cache_policy=NO_CACHE)
def train_ranker(fam: TaskFamily, paths: RunPaths, etl_out: Any) -> Any:
    return fam.train_ranker(paths, etl_out)


@task(name="export", cache_policy=NO_CACHE)
def export(fam: TaskFamily, paths: RunPaths, etl_out: Any, trained: Trained) -> Any:
    # staged as version 1 of the run's own repository; publish assigns the live version number
    return fam.export(paths, etl_out, trained)


@task(name="gate", cache_policy=NO_CACHE)
def gate(fam: TaskFamily, paths: RunPaths, etl_out: Any, exp: Any, trained: Trained) -> Any:
    decision = fam.gate(paths, etl_out, exp, trained.baselines)
    word = {"promoted": "PROMOTE", "refused": "REFUSED"}.get(decision.outcome, "INCONCLUSIVE")
    action = "promote" if decision.promote else "keep the served version"
    print(f"promotion gate (test split): {word} ({action}): {decision.reason}")
    return decision


@task(name="serving-smoke-test", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def smoke(fam: TaskFamily, paths: RunPaths, etl_out: Any, exp: Any) -> Any:
    return fam.smoke(paths, etl_out, exp)


@task(name="publish", cache_policy=NO_CACHE)
def publish(fam: TaskFamily, paths: RunPaths, raw_path: Path, etl_out: Any, trained: Trained,
            exp: Any) -> tuple[int, Path, dict]:
    return fam.publish(paths, raw_path, etl_out, trained, exp)


@task(name="promote", retries=2, retry_delay_seconds=[5, 20], cache_policy=NO_CACHE)
def promote(fam: TaskFamily, version: int) -> dict:
    """Serve the new version; a Triton started by `recsys serve` (explicit mode) switches without restart."""
    return fam.promote(version)


@task(name="features", cache_policy=NO_CACHE)  # no retry: a failure serves the previous version again
def features(fam: TaskFamily, version: int, previous: Optional[int]) -> Optional[dict]:
    """The promoted version's user features, recent items and item features into the feature store."""
    return fam.features(version, previous)
