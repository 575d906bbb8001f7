"""Prefect wiring of the pipeline (``flows.pipeline``, ``flows.deploy``).

Importing this package sets the defaults that make a first run on a fresh machine work, before
Prefect is imported anywhere (Prefect reads its settings once, at import). Each is only a default:
a variable the user set wins.

* ``PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS`` = 600: without ``PREFECT_API_URL`` Prefect
  starts a temporary API server on first use, and with an empty Prefect home that server first
  creates and migrates its SQLite database. On a 2-core machine, or a busy one, this takes longer
  than Prefect's 20 s default and the run failed with "Timed out while attempting to connect to
  ephemeral Prefect API server". The wait ends as soon as the server answers.
* ``PREFECT_RESULTS_LOCAL_STORAGE_PATH`` = ``$PREFECT_HOME/storage`` when ``PREFECT_HOME`` is set:
  Prefect 3.7 documents that default but resolves it to ``~/.prefect/storage`` whatever
  ``PREFECT_HOME`` says, so a "fresh" home silently reused persisted task results (the ETL cache)
  of earlier runs.
* ``PREFECT_SERVER_ANALYTICS_ENABLED`` = false: no telemetry writes racing the temporary database.
* ``PREFECT_LOGGING_EXTRA_LOGGERS`` = ``pipeline_lib``: the library's progress lines reach Prefect's logs.
* ``PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW`` = ignore: those lines logged outside a flow run stay on
  the console without a warning each.

It also installs :mod:`pipeline_lib.quiet`'s filters (known-harmless library warnings and log lines
off) before Prefect, Merlin and TensorFlow are imported, so ``flows.tasks`` and ``flows.pipeline``
need no code above their imports.

Where Prefect's state lives: ``PREFECT_HOME`` (default ``~/.prefect``): the SQLite database of
the temporary server (flow runs, logs, artifacts) and ``storage/`` (cached task results). To use
a real Prefect server and its UI instead, start one (``prefect server start``) and set
``PREFECT_API_URL=http://127.0.0.1:4200/api``: runs then report there, and no temporary server
is started (docs/operations.md).
"""
from __future__ import annotations

import os
from pathlib import Path

from pipeline_lib import quiet

EPHEMERAL_STARTUP_TIMEOUT_S = 600


def prefect_defaults(environ: "os._Environ[str] | dict[str, str]" = os.environ) -> None:
    """Set this project's Prefect defaults in ``environ`` (never overriding a value that is set)."""
    environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(EPHEMERAL_STARTUP_TIMEOUT_S))
    environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "pipeline_lib")
    # a library line logged outside a flow run (tests, benchmarks, the CLI's own checks) stays on the
    # console: Prefect's API handler otherwise warns on each (a UserWarning, an error under -W error)
    environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    home = environ.get("PREFECT_HOME")
    storage_set = any(k in environ for k in ("PREFECT_RESULTS_LOCAL_STORAGE_PATH", "PREFECT_LOCAL_STORAGE_PATH"))
    if home and not storage_set:
        environ["PREFECT_RESULTS_LOCAL_STORAGE_PATH"] = str(Path(home).expanduser() / "storage")


prefect_defaults()
quiet.install()  # before Prefect, Merlin and TensorFlow are imported (by flows.tasks, flows.pipeline)
