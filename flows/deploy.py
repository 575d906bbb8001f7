"""Scheduled deployment of the pipeline flow.

Two ways, both standard Prefect 3:

* a Prefect ``Runner`` (this module, what ``flow.serve`` does, plus a longer prefetch): registers the
  deployment with its cron schedule on the Prefect API and executes its runs in this process's
  children -- no work pool needed. Used on a single machine:

      uv run prefect server start                          # API + UI on http://127.0.0.1:4200
      PREFECT_API_URL=http://127.0.0.1:4200/api uv run python -m flows.deploy --cron "0 3 * * *"

* ``prefect.yaml`` + a worker (docker-compose): ``prefect deploy --all`` registers the same flow
  for the ``recsys-gpu`` process work pool that the GPU worker container polls.

Prefetch: a flow-run process spends tens of seconds importing TensorFlow, Merlin and NVTabular
before the flow starts. The runner starts it up to ``prefetch_s`` seconds before the run's scheduled
time; the server holds the run in Pending until that time (Prefect's ``WaitForScheduledTime`` rule),
so the flow begins at its cron slot instead of an import time later. (``flow.serve`` has no such
option and prefetches 10 s.)
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
from typing import Any, Optional

from prefect import Flow
from prefect.runner import Runner

from flows.online import online_evaluation
from flows.pipeline import pipeline

DEFAULT_NAME = "recsys-nightly"
DEFAULT_CRON = "0 3 * * *"
DEFAULT_PREFETCH_S = 120.0  # longer than the flow-run process's start-up on a busy 2-core machine


class _AtCapacityOnce(logging.Filter):
    """The runner's poller logs "N scheduled runs skipped (at capacity)" on every poll while a run is
    going (limit 1): nothing is dropped, the runs wait. Say that once, plainly, per busy spell."""

    def __init__(self) -> None:
        super().__init__()
        self.said = False

    def filter(self, record: logging.LogRecord) -> bool:
        if "scheduled runs skipped (at capacity)" not in record.getMessage():
            return True
        if self.said:
            return False
        self.said = True
        record.msg, record.args = ("a run is in progress (one at a time): later scheduled runs wait for it; "
                                   "none is dropped (said once)"), ()
        return True


class _Runner(Runner):
    """A Runner that stops on SIGTERM (a service manager's stop) as it does on Ctrl-C: it unwinds
    through its own shutdown, which pauses the deployment's schedule, so no "Late" runs pile up
    while nothing executes them. (Prefect's own handler exits without pausing.)"""

    main_task: Optional[asyncio.Task] = None

    def handle_sigterm(self, *args: Any, **kwargs: Any) -> None:
        self._logger.info("SIGTERM received: pausing the schedule and stopping (as on Ctrl-C)")
        if self.main_task is not None:
            self.main_task.get_loop().call_soon_threadsafe(self.main_task.cancel)
        else:  # pragma: no cover - not started through serve()
            super().handle_sigterm(*args, **kwargs)


async def _start(runner: _Runner) -> None:
    runner.main_task = asyncio.current_task()
    await runner.start()


FLOWS: dict[str, tuple[Flow, str]] = {"pipeline": (pipeline, "raw logs -> NVTabular -> Merlin Models -> merlin-systems ensemble -> Triton"),
         "online": (online_evaluation, "impressions + feedback -> per-version online CTR report (docs/online.md)")}


def serve(name: str = DEFAULT_NAME, cron: str = DEFAULT_CRON, config_path: Optional[str] = None,
          overrides: Optional[dict] = None, limit: Optional[int] = 1, prefetch_s: float = DEFAULT_PREFETCH_S,
          which: str = "pipeline") -> None:
    """Register ``name`` (cron-scheduled, with parameters) and run its flow runs until stopped
    (Ctrl-C or SIGTERM; both pause the schedule). ``which``: the pipeline, or the online evaluation."""
    the_flow, description = FLOWS[which]
    logging.getLogger("prefect.runner").addFilter(_AtCapacityOnce())
    runner = _Runner(name=name, limit=limit,  # one pipeline run at a time: runs share the model repository
                     prefetch_seconds=prefetch_s)
    runner.add_flow(
        the_flow,
        name=name,
        cron=cron,
        parameters={"config_path": config_path, "overrides": overrides},
        tags=["recsys"],
        description=description,
    )
    print(f"deployment '{the_flow.name}/{name}' ({cron}, UTC) registered; executing its runs until stopped "
          f"(trigger one now: prefect deployment run '{the_flow.name}/{name}')", flush=True)
    try:
        asyncio.run(_start(runner))
    except (KeyboardInterrupt, asyncio.CancelledError):
        print("stopped; the schedule is paused (resume: prefect deployment schedule resume ... or start this again)",
              flush=True)


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--flow", choices=sorted(FLOWS), default="pipeline",
                   help="pipeline (default) or online: the online evaluation (name it with --name, e.g. recsys-online)")
    p.add_argument("--name", default=DEFAULT_NAME)
    p.add_argument("--cron", default=DEFAULT_CRON, help="cron schedule (UTC), default nightly at 03:00")
    p.add_argument("--config", default=None, help="run config YAML passed to every scheduled run")
    p.add_argument("--overrides-json", default=None, help="config overrides (JSON object) for every run")
    p.add_argument("--prefetch-seconds", type=float, default=DEFAULT_PREFETCH_S,
                   help="start a scheduled run's process up to this many seconds early (its imports); "
                        "the flow itself still begins at the scheduled time")
    a = p.parse_args(argv)
    serve(a.name, a.cron, a.config, json.loads(a.overrides_json) if a.overrides_json else None,
          prefetch_s=a.prefetch_seconds, which=a.flow)


if __name__ == "__main__":
    main()
