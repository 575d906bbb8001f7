"""Scheduled deployment of the pipeline flow.

Two ways, both standard Prefect 3:

* ``flow.serve`` (this module): registers the deployment with its cron schedule on the Prefect API
  and executes its runs in this process -- no work pool needed. Used on a single machine:

      uv run prefect server start                          # API + UI on http://127.0.0.1:4200
      PREFECT_API_URL=http://127.0.0.1:4200/api uv run python -m flows.deploy --cron "0 3 * * *"

* ``prefect.yaml`` + a worker (docker-compose): ``prefect deploy --all`` registers the same flow
  for the ``recsys-gpu`` process work pool that the GPU worker container polls.
"""
from __future__ import annotations

import argparse
import json
from typing import Optional

from flows.pipeline import pipeline

DEFAULT_NAME = "recsys-nightly"
DEFAULT_CRON = "0 3 * * *"


def serve(name: str = DEFAULT_NAME, cron: str = DEFAULT_CRON, config_path: Optional[str] = None,
          overrides: Optional[dict] = None, limit: Optional[int] = 1) -> None:
    """Register ``name`` (cron-scheduled, with parameters) and run its flow runs until stopped."""
    pipeline.serve(
        name=name,
        cron=cron,
        parameters={"config_path": config_path, "overrides": overrides},
        tags=["recsys"],
        description="raw logs -> NVTabular -> Merlin Models -> merlin-systems ensemble -> Triton",
        limit=limit,  # one pipeline run at a time: runs share the model repository
    )


def main(argv: Optional[list[str]] = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--name", default=DEFAULT_NAME)
    p.add_argument("--cron", default=DEFAULT_CRON, help="cron schedule (UTC), default nightly at 03:00")
    p.add_argument("--config", default=None, help="run config YAML passed to every scheduled run")
    p.add_argument("--overrides-json", default=None, help="config overrides (JSON object) for every run")
    a = p.parse_args(argv)
    serve(a.name, a.cron, a.config, json.loads(a.overrides_json) if a.overrides_json else None)


if __name__ == "__main__":
    main()
