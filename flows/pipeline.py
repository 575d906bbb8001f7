"""The pipeline DAG: raw -> validated -> transformed + schema -> model -> ensemble -> served.

One flow for every task family (ranking, retrieval / two-stage, session): the run's config picks
the family (``pipeline_lib.families.get_family``), the shared tasks (``flows.tasks``) call it, and
this module adds the wiring: stage timings, artifacts and the run summary. It runs without a
Prefect server: Prefect 3 starts a temporary local API on first use (ephemeral mode).

    uv run python -m flows.pipeline                     # embedded default
    uv run recsys run --config configs/small.yaml       # same flow through the CLI
"""
from __future__ import annotations

from flows import tasks  # the flows package set up logging and warning filters before any of these imports

import json
from pathlib import Path
from typing import Any, Optional

import pandas as pd
from prefect import flow, get_run_logger
from prefect.states import Completed, State
from prefect.artifacts import create_markdown_artifact, create_table_artifact

from pipeline_lib import report
from pipeline_lib.config import RunConfig, load_config
from pipeline_lib.families import TaskFamily, get_family
from pipeline_lib.families.candidates import Competition
from pipeline_lib.features.stage import check_store
from pipeline_lib.paths import RunPaths, new_run
from pipeline_lib.release.gate import GateDecision


@flow(name="recsys-pipeline", log_prints=True)
def pipeline(config_path: Optional[str] = None, overrides: Optional[dict[str, Any]] = None) -> State:
    """Run every stage for one config. The run ends in a Completed state named for the outcome
    ("Promoted" / "Refused", so the Prefect UI tells them apart) whose data is the summary (metrics,
    gate, timings, served predictions): calling ``pipeline(...)`` returns that summary dict. The run is
    tagged ``task:<family>``, ``model:<type>`` and ``outcome:<promoted|refused|inconclusive>`` (inconclusive: not promoted, the served version kept)."""
    cfg = load_config(config_path, overrides)
    check_store(cfg)  # a Redis online store that does not answer: refused before anything runs
    fam, paths = get_family(cfg), new_run(cfg)
    print(f"run folder: {paths.root}")
    create_markdown_artifact(key="effective-config", description="the validated config of this run",
                             markdown=report.config_markdown(cfg.model_dump(mode="json"), paths.root / "config.yaml"))
    timings: dict[str, float] = {}
    timed = tasks.stage_timer(timings)

    raw_path = timed("raw-data", tasks.raw_data, fam, paths)
    timed("validate", tasks.validate_data, fam, paths, raw_path)
    etl_out = tasks.cached_etl(timed, fam, paths, raw_path)
    fam, tuned = tasks.maybe_tune(timed, fam, paths, etl_out)
    comp = None
    if fam.cfg.candidates:  # model.candidates: the best on validation goes on as a single-model run would
        fam, trained, comp = tasks.compete(timed, fam, paths, etl_out)
    else:
        trained = timed("train", tasks.train, fam, paths, etl_out)
    if fam.has_ranker:
        trained.ranker = timed("train-ranker", tasks.train_ranker, fam, paths, etl_out)
    learning_curve_artifact(fam.learning_curves(trained) + (candidate_curves(comp) if comp else []))
    exp = timed("export", tasks.export, fam, paths, etl_out, trained)
    decision = timed("gate", tasks.gate, fam, paths, etl_out, exp, trained)

    split = fam.split_report(etl_out)
    summary = {"run_dir": str(paths.root), "etl_device": etl_out.device, "etl_path": etl_out.etl_path,
               "etl_from": str(etl_out.workflow_dir.parent),
               **fam.summary_fields(trained, exp), "baselines": trained.baselines.baselines,
               "baseline_intervals": report.baseline_interval_texts(trained.baselines.intervals),
               "lift": trained.baselines.lift, "split": {k: v for k, v in split.items() if k != "warnings"},
               "warnings": split["warnings"] + list(trained.baselines.warnings),
               "gate": gate_fields(decision), "stage_seconds": timings,
               **({"tune": tuned.summary()} if tuned else {}),
               **({"selection_metric": comp.metric, "leaderboard": comp.rows()} if comp else {})}
    rows, description = fam.metrics_table(trained)
    create_table_artifact(key="metrics", table=rows, description=description)
    requests, serve_args = fam.smoke_rows(etl_out, cfg.serving.smoke_rows), report.cli_args(config_path, overrides)
    if not decision.promote:
        out = refused(fam, paths, summary, decision, query_info(cfg, paths, requests, serve_args))
        kept = "inconclusive" if decision.outcome == "inconclusive" else "refused"
        tag_run(fam, kept)
        return Completed(name=kept.capitalize(), data=out, message=f"{kept} at the gate: {decision.reason}"[:500])

    result = timed("serving-smoke-test", tasks.smoke, fam, paths, etl_out, exp)
    version, served_dir, info = timed("publish", tasks.publish, fam, paths, raw_path, etl_out, trained, exp)
    event = timed("promote", tasks.promote, fam, version)
    feature_store = timed("features", tasks.features, fam, version, event["previous"])
    summary.update({"model_version": version, "served_dir": str(served_dir), "served_version": event["version"],
                    "previous_version": event["previous"], "pruned_versions": event["pruned"],
                    "data_fingerprint": info["data"]["fingerprint"], **fam.served_fields(result),
                    "live_server": event["live_server"], "feature_store": feature_store,
                    "query": query_info(cfg, paths, requests, serve_args)})
    served = fam.served_report(result, requests, summary)
    create_table_artifact(key="served-predictions", table=served.artifact, description=served.description)
    finish(paths, summary, fam.title)
    create_markdown_artifact(key="promotion", markdown=_promotion_md(event, info, decision, cfg.export.model_name,
                                                                      fam.title),
                             description="gate decision, served version and lineage")
    where = (f"published and serving {served_dir} (the Triton at {event['live_server']} switched to it)"
             if event["live_server"] else f"published {served_dir}; served at the next `recsys serve`")
    print(f"{served.console}; {where}")
    tag_run(fam, "promoted")
    return Completed(name="Promoted", data=summary | {"predictions": served.table},
                     message=f"promoted {cfg.export.model_name} v{event['version']} ({model_type(fam.cfg)})")


def model_type(cfg: RunConfig) -> str:
    return cfg.session.model.type if cfg.task == "session" else cfg.model.type


def tag_run(fam: TaskFamily, outcome: str) -> None:
    """Add family, model type and outcome tags to this flow run (the runs list can filter on them)."""
    from prefect.client.orchestration import get_client
    from prefect.runtime import flow_run

    new = [f"task:{fam.name}", f"model:{model_type(fam.cfg)}", f"outcome:{outcome}"]
    try:
        with get_client(sync_client=True) as client:
            run = client.read_flow_run(flow_run.id)
            client.update_flow_run(flow_run.id, tags=sorted(set(run.tags) | set(new)))
    except Exception as exc:  # noqa: BLE001 - tags are a convenience; the run's outcome stands
        get_run_logger().warning("could not tag the flow run %s: %s", new, exc)


def candidate_curves(comp: Competition) -> list[tuple[str, Optional[Path]]]:
    """The learning curves of the candidates that lost (the winner's are the family's)."""
    return [(f"candidate {r.name}", r.trained.model.metrics_path) for r in comp.runs if r.trained and not r.winner]


def gate_fields(d: GateDecision) -> dict:
    return {"outcome": d.outcome, "promote": d.promote, "metric": d.metric, "candidate": d.candidate,
            "candidate_interval": d.candidate_interval, "served": d.served, "served_version": d.served_version,
            "served_difference": d.served_difference,
            "baseline_difference": (d.baseline_check or {}).get("difference"), "n_rows": d.n_rows,
            "split": "test", "reason": d.reason}


def refused(fam: TaskFamily, paths: RunPaths, summary: dict, decision: GateDecision, query: dict) -> dict:
    """The end of a run whose candidate the gate refused: nothing is served anew."""
    summary.update(model_version=None, served_version=decision.served_version, query=query)
    finish(paths, summary, fam.title)
    create_markdown_artifact(key="promotion", markdown=_refused_md(decision), description="promotion gate")
    kept = f"version {decision.served_version} keeps serving" if decision.served_version else "nothing is served"
    print(f"candidate {'refused' if decision.outcome == 'refused' else 'not promoted (inconclusive)'} by the gate; "
          f"{kept}")
    return summary | {"predictions": None}


def learning_curve_artifact(curves: list[tuple[str, Optional[Path]]]) -> None:
    """The learning-curve PNG(s) written beside metrics.json, embedded in a markdown artifact."""
    pngs = [(title, Path(p).parent / "learning_curve.png") for title, p in curves if p is not None]
    if any(png.exists() for _, png in pngs):
        create_markdown_artifact(key="learning-curve", markdown=report.learning_curve_markdown(pngs),
                                 description="loss and validation metric per epoch")


def query_info(cfg: RunConfig, paths: RunPaths, rows: pd.DataFrame, serve_args: list[str]) -> dict:
    """Endpoints and ready-to-paste commands for the served model; the curl body (one raw row of
    this run, typed from the served config.pbtxt) is saved as serving/request.json."""
    s, name = cfg.serving, cfg.export.model_name
    body = request_file = None
    served_config = Path(cfg.export.model_repository) / name / "config.pbtxt"
    try:
        if not served_config.exists():  # a refused first run: nothing published to take the input types from
            return report.query_commands(name, s.host, s.http_port, s.grpc_port, serve_args, None, None)
        body = report.request_body(served_config, rows.iloc[0].to_dict())
        request_file = paths.serving / "request.json"
        request_file.parent.mkdir(parents=True, exist_ok=True)
        request_file.write_text(json.dumps(body, indent=1))
    except Exception as exc:  # the commands below still hold; only the curl example is missing
        get_run_logger().warning("no curl example: %s", exc)
    out = report.query_commands(name, s.host, s.http_port, s.grpc_port, serve_args, request_file, body)
    if "cold_start" in served_config.read_text() and cfg.columns.user_id in rows.columns:  # user-id requests
        url = f"{s.host}:{s.http_port}/v2/models/{name}/infer"
        item = cfg.columns.item_id
        ranking = '"item_ids"' not in served_config.read_text()  # a ranking version: user id + item ids in
        pair = (item, rows.iloc[0][item]) if ranking and item in rows.columns else None
        out |= report.user_id_commands(served_config, url, cfg.columns.user_id, rows.iloc[0][cfg.columns.user_id],
                                       serve_args, pair)
    return out


def finish(paths: RunPaths, summary: dict, title: str) -> None:
    """summary.json (every figure, full precision) and the run-summary artifact (rounded, with how to query)."""
    (paths.root / "summary.json").write_text(pd.Series(summary).to_json(indent=2))
    create_markdown_artifact(key="run-summary", markdown=report.run_summary_markdown(summary, title),
                             description=f"{title}: served model, endpoints and how to query them")


def _refused_md(d: GateDecision) -> str:
    kept = f"version **{d.served_version}** keeps serving" if d.served_version else "nothing is served"
    served = f"served {report.num(d.served)}" if d.served is not None else "nothing served to compare"
    return "\n".join([
        "# promotion", "",
        f"- decision: **{d.outcome}**, not promoted; {kept}",
        f"- {d.reason}",
        f"- {d.metric}: candidate {report.num(d.candidate)}, {served} on {d.n_rows} test rows",
    ])


def _promotion_md(event: dict, info: dict, d: GateDecision, model_name: str = "", title: str = "") -> str:
    return "\n".join([
        "# promotion", "",
        f"- model: **{model_name}** ({title})" if model_name else f"- model: {title}",
        f"- decision: **{event['action']}** version **{event['version']}** (previously served: {event['previous']})",
        f"- gate ({d.outcome}, test split): {d.reason}",
        f"- live server switched: {event['live_server'] or 'none running (served at next start)'}",
        f"- pruned versions: {event['pruned'] or 'none'}",
        f"- data fingerprint: `{info['data']['fingerprint']}`",
        f"- config fingerprint: `{info['config_fingerprint']}`",
        f"- workflow: `{info['workflow']['path']}` (`{info['workflow']['fingerprint']}`)",
        f"- model: `{info['model']['path']}` (`{info['model']['fingerprint']}`)",
        f"- code version: `{info['code_version']}`",
    ])


if __name__ == "__main__":
    pipeline()
