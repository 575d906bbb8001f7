"""The online evaluation flow: feedback drop -> impressions joined with feedback -> per-version online metrics.

    uv run recsys online-eval --config configs/small.yaml          # once
    uv run python -m flows.deploy --flow online --cron "15 * * * *"  # scheduled, like the pipeline

It ingests the files dropped in the feedback inbox (:mod:`pipeline_lib.online.feedback`), evaluates
(:mod:`pipeline_lib.online.evaluation`), writes ``<online.reports_path>/online-<stamp>.json`` (and
``latest.json``) with the plot beside it, and creates a table artifact (``online-evaluation``) and a markdown
artifact with the per-version CTR plot (``online-ctr``). When the served version is a regression against the
one before it, the report names it; with ``online.auto_rollback`` the served model is rolled back and the
report says so.
"""
from __future__ import annotations

import flows  # noqa: F401 - Prefect defaults and warning filters before Prefect is imported

import json
import time
from pathlib import Path
from typing import Any, Optional

from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from pipeline_lib import report as run_report
from pipeline_lib.config import RunConfig, load_config
from pipeline_lib.online import evaluation, feedback, impressions, settings


@task(name="ingest-feedback")
def ingest_feedback(cfg: RunConfig) -> list[str]:
    return [r.line() for r in feedback.drain_inbox(settings.feedback_dir(cfg))]


@task(name="online-evaluate")
def evaluate(cfg: RunConfig) -> dict:
    imps = impressions.read_impressions(settings.impressions_dir(cfg))
    fb = feedback.read_accepted(settings.feedback_dir(cfg))
    return evaluation.evaluate(imps, fb, cfg.online.k, cfg.online.attribution_window_s,
                               cfg.evaluation.bootstrap_resamples, cfg.evaluation.confidence, cfg.seed)


@task(name="online-rollback")
def maybe_roll_back(cfg: RunConfig, result: dict) -> Optional[str]:
    """The served version regressed against the one before it: roll back (``online.auto_rollback``), or only say so."""
    from pipeline_lib.serving import repository
    from pipeline_lib.serving.server import live_server

    repo, model = cfg.export.model_repository, cfg.export.model_name
    served = repository.served_version(repo, model)
    bad = [r for r in result["regressions"] if r["version"] == served]
    if not bad:
        return None
    if not cfg.online.auto_rollback:
        return f"not rolled back (online.auto_rollback is off): version {served} is still served"
    from pipeline_lib.features.stage import check_restorable, restore
    from pipeline_lib.features.store import FeatureStoreError

    try:  # as `recsys rollback`: the feature store must be able to follow (user-id requests)
        check_restorable(repo, model, repository.rollback_target(repo, model))
    except FeatureStoreError as exc:
        return f"not rolled back: {exc}"
    live = live_server(cfg.serving) if cfg.serving.notify_live_server else None
    event = repository.rollback(repo, model, live)
    restore(repo, model, event["version"])  # the rolled-back version's feature snapshot (None: no store in use)
    where = f"the Triton at {event['live_server']} switched" if event.get("live_server") else "served at the next start"
    return f"rolled back from version {served} to version {event['version']} ({where})"


@flow(name="recsys-online-evaluation", log_prints=True)
def online_evaluation(config_path: Optional[str] = None, overrides: Optional[dict[str, Any]] = None) -> dict:
    """Ingest dropped feedback, evaluate every served version online, report (artifacts + JSON), optionally roll back."""
    cfg = load_config(config_path, overrides)
    log = get_run_logger()
    for line in ingest_feedback(cfg):
        log.info("feedback %s", line)
    result = evaluate(cfg)
    result["rollback"] = maybe_roll_back(cfg, result)
    for r in result["regressions"]:
        log.warning("online regression: version %s below version %s (CTR difference %s)", r["version"],
                    r["previous"], r["ctr_difference"])
    out = settings.reports_dir(cfg)
    out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
    png = evaluation.plot_ctr(result, out / f"online-{stamp}.png")
    result["plot"] = png
    text = json.dumps(result, indent=2, default=str)
    (out / f"online-{stamp}.json").write_text(text)
    (out / "latest.json").write_text(text)
    rows = evaluation.table_rows(result)
    create_table_artifact(key="online-evaluation", table=rows or [{"versions": "no impressions yet"}],
                          description=f"online CTR@{cfg.online.k} per served version ({out / f'online-{stamp}.json'})")
    image = run_report.image_markdown(Path(png), "online CTR per version", f"`{png}`") if png else ""
    create_markdown_artifact(key="online-ctr", markdown=evaluation.markdown(result, image),
                             description="per-version online CTR over time with intervals")
    print(f"online report: {out / f'online-{stamp}.json'}")
    return result


if __name__ == "__main__":
    online_evaluation()
