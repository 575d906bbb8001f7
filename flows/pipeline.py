"""The pipeline DAG: raw -> validated -> transformed + schema -> model -> ensemble -> served.

Each task is a thin wrapper over one ``pipeline_lib`` function; this module holds only the
wiring (retries, logging, artifacts). It runs without a Prefect server: Prefect 3 starts a
temporary local API on first use (ephemeral mode).

    uv run python -m flows.pipeline                     # embedded default
    uv run recsys run --config configs/small.yaml       # same flow through the CLI
"""
from __future__ import annotations

import os

os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", "pipeline_lib")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")  # no telemetry writes racing the ephemeral DB

from pipeline_lib import quiet  # noqa: E402  (before Prefect, Merlin and TensorFlow are imported)

quiet.install()
quiet.show_progress()  # per-epoch lines, Triton start-up, ETL steps: console and Prefect UI

import json
import logging
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional

import pandas as pd
from prefect import flow, get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE
from prefect.context import FlowRunContext, TaskRunContext

from pipeline_lib import report
from pipeline_lib.data import sources as data
from pipeline_lib.etl import workflow as etl
from pipeline_lib.models import evaluation
from pipeline_lib.export import ranking as export
from pipeline_lib.release import gate
from pipeline_lib.release import lineage
from pipeline_lib.serving import repository
from pipeline_lib.models import retrieval
from pipeline_lib.serving import server as serving
from pipeline_lib.release import smoke
from pipeline_lib.export import topk
from pipeline_lib.models import ranking as train
from pipeline_lib.models import tune
from pipeline_lib.validate import data as validate
from pipeline_lib.config import RunConfig, load_config
from pipeline_lib.paths import RunPaths, new_run


class _NoTracebackForBadData(logging.Filter):
    """Bad input data is the user's to fix, not a crash: Prefect logs it without a stack trace."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.exc_info and isinstance(record.exc_info[1], validate.DataValidationError):
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


def _retry_unless_bad_data(task, task_run, state) -> bool:
    """Retry transient read failures, not data the user has to fix (Prefect puts the exception in state.data)."""
    return not isinstance(getattr(state, "data", None), validate.DataValidationError)


@task(name="raw-data", retries=2, retry_delay_seconds=[2, 10], retry_condition_fn=_retry_unless_bad_data,
      cache_policy=NO_CACHE)
def raw_data(cfg: RunConfig, paths: RunPaths) -> Path:
    return data.write_raw(cfg.data, cfg.seed, paths.raw, cfg.columns)


@task(name="validate", cache_policy=NO_CACHE)
def validate_data(cfg: RunConfig, paths: RunPaths, raw_path: Path) -> Path:
    logger = get_run_logger()
    report = validate.validate_raw(raw_path, cfg.columns, cfg.validation)
    for w in report.warnings:
        logger.warning("data warning: %s", w)
    paths.validated.mkdir(parents=True, exist_ok=True)
    stats = report.save(paths.validated / "stats.json")
    drift = validate.drift_report(stats, cfg.runs_dir, paths.root, cfg.validation.drift, paths.validated / "drift.json")
    create_markdown_artifact(key="data-drift", markdown=validate.drift_markdown(drift),
                             description="raw-data statistics compared with the previous run")
    if drift["drifted"]:
        logger.warning("data drift against %s:\n  - %s", drift["previous"],
                       "\n  - ".join(f["message"] for f in drift["findings"]))
    return stats


def _etl_cache_key(context, parameters) -> str:
    """Same raw data (content hash) + same ETL-relevant config + same code -> reuse the ETL output."""
    cfg: RunConfig = parameters["cfg"]
    return "etl-" + lineage.config_fingerprint({
        "data": lineage.file_fingerprint(parameters["raw_path"]),
        # where the ETL runs (etl.dask) does not change its output: not part of the key
        "config": cfg.model_dump(mode="json", include={"seed", "columns", "split", "etl"}, exclude={"etl": {"dask"}}),
        "history": _history_length(cfg),
        "code": lineage.code_version(),
    })


def _history_length(cfg: RunConfig) -> int:
    """YouTube DNN reads the user's recent positive items: the ETL adds that list feature."""
    return cfg.model.retrieval.history_length if cfg.model.type == "youtube_dnn" else 0


@task(name="etl", cache_key_fn=_etl_cache_key, persist_result=True, cache_expiration=timedelta(days=7))
def run_etl(cfg: RunConfig, paths: RunPaths, raw_path: Path) -> etl.EtlOutput:
    hist = _history_length(cfg)
    split = etl.split_raw(raw_path, cfg.split, cfg.columns, cfg.seed, paths.split, history_length=hist)
    return etl.fit_transform(cfg.columns, cfg.etl, split, paths.transformed, history=bool(hist))


@task(name="tune", cache_policy=NO_CACHE)
def run_tune(cfg: RunConfig, paths: RunPaths, etl_out: etl.EtlOutput) -> tune.TuneResult:
    """Optional (tune.enabled): search the model's hyperparameters; training then uses the best."""
    result = tune.run_study(cfg, etl_out, paths.root / "tune")
    create_table_artifact(key="tune-trials", table=report.compact_table(result.trials),
                          description=f"every tuning trial: validation {result.metric}, state, seconds, params")
    create_markdown_artifact(key="tune-history", markdown=tune.history_markdown(result),
                             description="hyperparameter search: best trial and optimisation history")
    return result


def maybe_tune(cfg: RunConfig, paths: RunPaths, etl_out: etl.EtlOutput,
               timed) -> tuple[RunConfig, Optional[tune.TuneResult]]:
    """With tune.enabled: the tune task, and the config every later stage uses (the best trial's model)."""
    if not cfg.tune.enabled:
        return cfg, None
    tuned = timed("tune", run_tune, cfg, paths, etl_out)
    return cfg.model_copy(update={"model": tuned.best_model}), tuned


@task(name="train", cache_policy=NO_CACHE)
def run_train(cfg: RunConfig, paths: RunPaths, etl_out: etl.EtlOutput):
    """Train, then score the family's baselines on the same split (``model.metrics["baselines"]``, ``["lift"]``)."""
    if cfg.model.is_retrieval:
        model = retrieval.train(etl_out.workflow_dir, etl_out.train_dir, etl_out.split.train, etl_out.split.valid,
                                cfg.columns, cfg.model, cfg.seed, paths.model)
    else:
        model = train.train(etl_out.train_dir, etl_out.valid_dir, cfg.model, cfg.columns.label, cfg.seed, paths.model)
    return model, _baselines(cfg, etl_out, model)


def _baselines(cfg: RunConfig, etl_out, model) -> evaluation.BaselineReport:
    """The one library call for every family; the lift sentence goes to the run's log."""
    comparison = evaluation.compare_with_baselines(cfg, etl_out.split.train, etl_out.split.valid, model,
                                               etl_out.workflow_dir)
    print(f"baselines: {comparison.lift}")
    return comparison


@task(name="train-ranker", cache_policy=NO_CACHE)
def run_train_ranker(cfg: RunConfig, paths: RunPaths, etl_out: etl.EtlOutput) -> train.TrainOutput:
    """Two-stage: the ranking model that re-scores the retrieved candidates (same ETL output)."""
    ranker_cfg = cfg.model.model_copy(update={"type": cfg.model.retrieval.rerank_with})
    return train.train(etl_out.train_dir, etl_out.valid_dir, ranker_cfg, cfg.columns.label, cfg.seed,
                       paths.model / "ranker")


def _request_columns(cfg: RunConfig) -> list[str]:
    hist = [etl.history_column(cfg.columns)] if _history_length(cfg) else []
    return cfg.columns.serving_columns + hist


def _valid_sample(cfg: RunConfig, etl_out: etl.EtlOutput, n: int) -> pd.DataFrame:
    df = pd.read_parquet(etl_out.split.valid).head(n)
    return df[_request_columns(cfg)].reset_index(drop=True)


@task(name="export", cache_policy=NO_CACHE)
def run_export(cfg: RunConfig, paths: RunPaths, etl_out: etl.EtlOutput, model, ranker=None):
    # staged as version 1 of the run's own repository; publish assigns the live version number
    if cfg.model.is_retrieval:
        r = cfg.model.retrieval
        return topk.export_topk(
            etl_out.workflow_dir, model.model_dir, etl_out.split.train,
            _valid_sample(cfg, etl_out, cfg.export.parity_rows), cfg.columns, r.k, paths.ensemble,
            cfg.export.model_name, 1, ranker_dir=ranker.model_dir if ranker else None, candidates=r.candidates,
            atol=cfg.export.parity_atol, run_info={"run_dir": str(paths.root), "metrics": model.metrics},
            max_request_rows=cfg.export.max_request_rows, exclude_seen=r.exclude_seen, ann_config=r.ann,
            unknown_users=cfg.unknown_users,
        )
    return export.export_ensemble(
        etl_out.workflow_dir, model.model_dir, _valid_sample(cfg, etl_out, cfg.export.parity_rows),
        cfg.columns.label, paths.ensemble, cfg.export.model_name, 1, cfg.export.parity_atol,
        run_info={"run_dir": str(paths.root), "metrics": model.metrics},
        max_request_rows=cfg.export.max_request_rows, fast_transform=cfg.export.fast_transform,
        dynamic_batching=cfg.serving.dynamic_batching,
    )


@task(name="serving-smoke-test", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def run_smoke(cfg: RunConfig, paths: RunPaths, etl_out: etl.EtlOutput, exp):
    import nvtabular as nvt

    rows = _valid_sample(cfg, etl_out, cfg.serving.smoke_rows)
    if cfg.model.is_retrieval:
        rec = topk.TopKRecommender(exp.version_dir / topk.TOPK_DIR)
        rows = rows[rec.request_columns]
        return smoke.smoke_test_topk(exp.staged_repository, exp.model_name, rows, rec.offline(rows),
                                     cfg.serving.smoke_atol, paths.serving, cfg.serving.startup_timeout_s)
    offline = export.offline_scores(nvt.Workflow.load(str(etl_out.workflow_dir)), exp.version_dir / "ensemble" / "model",
                                    rows, cfg.columns.label)
    return smoke.smoke_test(exp.staged_repository, exp.model_name, rows, offline, cfg.serving.smoke_atol,
                            paths.serving, cfg.serving.startup_timeout_s)


@task(name="publish", cache_policy=NO_CACHE)
def run_publish(cfg: RunConfig, paths: RunPaths, raw_path: Path, etl_out: etl.EtlOutput,
                model, exp) -> tuple[int, Path, dict]:
    info = lineage.build_lineage(paths.root, raw_path, cfg.model_dump(mode="json"), etl_out.workflow_dir,
                                 model.model_dir, model.metrics)
    version, path = repository.publish(exp.version_dir, exp.config_path, cfg.export.model_repository,
                                       exp.model_name, info)
    return version, path, info


@task(name="promote", retries=2, retry_delay_seconds=[5, 20], cache_policy=NO_CACHE)
def run_promote(cfg: RunConfig, version: int) -> dict:
    """Serve the new version; a Triton started by `recsys serve` (explicit mode) switches without restart."""
    live = serving.live_server(cfg.serving) if cfg.serving.notify_live_server else None
    event = repository.promote(cfg.export.model_repository, cfg.export.model_name, version, live,
                               cfg.serving.instance_count)
    event["pruned"] = repository.prune(cfg.export.model_repository, cfg.export.model_name, cfg.export.keep_versions)
    return event


@task(name="gate", cache_policy=NO_CACHE)
def run_gate(cfg: RunConfig, paths: RunPaths, etl_out: etl.EtlOutput, exp,
             baselines: Optional[evaluation.BaselineReport] = None) -> gate.GateDecision:
    repo, name = cfg.export.model_repository, cfg.export.model_name
    served = repository.served_version(repo, name)
    served_dir = Path(repo) / name / str(served) if served else None
    raw = pd.read_parquet(etl_out.split.valid).head(cfg.gate.max_rows)
    if not cfg.gate.enabled:
        decision = gate.GateDecision(True, cfg.gate_metric, float("nan"), None, served, cfg.gate.tolerance, 0,
                                     "gate disabled (gate.enabled: false)")
    else:
        decision = gate.decide(exp.version_dir, served_dir, served, raw, cfg.columns.label, cfg.gate_metric,
                               cfg.gate.tolerance, topk=cfg.model.is_retrieval,
                               **gate.baseline_args(cfg.gate, baselines))
    decision.save(paths.root / "gate.json")
    print(f"promotion gate: {'PROMOTE' if decision.promote else 'KEEP SERVED VERSION'}: {decision.reason}")
    return decision


def stage_timer(timings: dict[str, float]):
    """``timed(name, fn, *args)``: call ``fn`` and record its wall seconds under ``name``."""
    def timed(name, fn, *args):
        t0 = time.perf_counter()
        out = fn(*args)
        timings[name] = round(time.perf_counter() - t0, 2)
        return out

    return timed


@flow(name="recsys-pipeline", log_prints=True)
def pipeline(config_path: Optional[str] = None, overrides: Optional[dict[str, Any]] = None) -> dict:
    """Run every stage for one config; returns a summary (metrics, gate, timings, served predictions)."""
    cfg = load_config(config_path, overrides)
    paths = new_run(cfg)
    print(f"run folder: {paths.root}")
    create_markdown_artifact(key="effective-config", description="the validated config of this run",
                             markdown=report.config_markdown(cfg.model_dump(mode="json"), paths.root / "config.yaml"))
    serve_args = report.cli_args(config_path, overrides)
    if cfg.task == "session":  # next-item prediction: the same stages in flows/session_pipeline.py
        from flows.session_pipeline import run_session

        return run_session(cfg, paths, serve_args)
    timings: dict[str, float] = {}
    timed = stage_timer(timings)

    raw_path = timed("raw-data", raw_data, cfg, paths)
    timed("validate", validate_data, cfg, paths, raw_path)
    etl_out = timed("etl", run_etl, cfg, paths, raw_path)
    if not etl_out.workflow_dir.exists():  # cached result whose run folder was deleted: recompute
        etl_out = timed("etl", run_etl.with_options(refresh_cache=True), cfg, paths, raw_path)
    cfg, tuned = maybe_tune(cfg, paths, etl_out, timed)
    model, baselines = timed("train", run_train, cfg, paths, etl_out)
    ranker = timed("train-ranker", run_train_ranker, cfg, paths, etl_out) if cfg.model.retrieval.rerank_with else None
    learning_curve_artifact([(cfg.model.type, model.metrics_path),
                             *([(f"re-ranker {cfg.model.retrieval.rerank_with}", ranker.metrics_path)] if ranker else [])])
    exp = timed("export", run_export, cfg, paths, etl_out, model, ranker)
    decision = timed("gate", run_gate, cfg, paths, etl_out, exp, baselines)

    summary = {
        "run_dir": str(paths.root),
        "etl_device": etl_out.device,
        "etl_from": str(etl_out.workflow_dir.parent),
        "model": cfg.model.type,
        "metrics": _headline_metrics(cfg, model, ranker),
        "baselines": baselines.baselines,
        "lift": baselines.lift,
        "gate": {"promote": decision.promote, "metric": decision.metric, "candidate": decision.candidate,
                 "served": decision.served, "served_version": decision.served_version, "reason": decision.reason},
        "stage_seconds": timings,
        **({"tune": tuned.summary()} if tuned else {}),
    }
    if cfg.model.is_retrieval:  # exact or FAISS top-k, and the index's recall measured at export (docs/ann.md)
        summary["ann"] = exp.parity.get("ann")
    create_table_artifact(key="metrics", table=report.metric_rows(summary["metrics"]) + baseline_rows(baselines),
                          description="validation metrics of this run's model and its baselines (4 significant digits)")
    rows = _valid_sample(cfg, etl_out, cfg.serving.smoke_rows)
    if not decision.promote:
        summary.update(model_version=None, served_version=decision.served_version,
                       query=query_info(cfg, paths, rows, serve_args))
        finish(paths, summary, "recsys pipeline run")
        create_markdown_artifact(key="promotion", markdown=_refused_md(decision), description="promotion gate")
        print(f"candidate refused by the gate; "
              f"{f'version {decision.served_version} keeps serving' if decision.served_version else 'nothing is served'}")
        return summary | {"predictions": None}

    result = timed("serving-smoke-test", run_smoke, cfg, paths, etl_out, exp)
    version, served_dir, info = timed("publish", run_publish, cfg, paths, raw_path, etl_out, model, exp)
    event = timed("promote", run_promote, cfg, version)

    table = result.table(rows)
    summary.update({
        "model_version": version,
        "served_dir": str(served_dir),
        "served_version": event["version"],
        "previous_version": event["previous"],
        "pruned_versions": event["pruned"],
        "data_fingerprint": info["data"]["fingerprint"],
        "max_abs_diff_served_vs_offline": result.max_abs_diff,
        "live_server": event["live_server"],
        "query": query_info(cfg, paths, rows, serve_args),
    })
    create_table_artifact(
        key="served-predictions", table=report.compact_table(table, merge=SCORE),
        description="Raw rows sent to Triton; score: served over HTTP, over gRPC and computed offline (one figure "
                    "where the three agree to 4 significant digits, else HTTP / gRPC / offline)",
    )
    finish(paths, summary, "recsys pipeline run")
    create_markdown_artifact(key="promotion", markdown=_promotion_md(event, info, decision),
                             description="gate decision, served version and lineage")
    print("Served predictions (Triton, raw rows in, scores out):\n"
          + pd.DataFrame(report.compact_table(table, max_rows=4, merge=SCORE)).to_string())
    print(f"{cfg.model.type} validation {_metrics_line(summary['metrics'])}; "
          f"max |served - offline| = {result.max_abs_diff:.1e}; published and serving {served_dir}")
    return summary | {"predictions": table}


SCORE = ("score", report.SCORE_COLUMNS)  # served HTTP = served gRPC = offline: one column in tables


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
    try:
        body = report.request_body(Path(cfg.export.model_repository) / name / "config.pbtxt", rows.iloc[0].to_dict())
        request_file = paths.serving / "request.json"
        request_file.parent.mkdir(parents=True, exist_ok=True)
        request_file.write_text(json.dumps(body, indent=1))
    except Exception as exc:  # the commands below still hold; only the curl example is missing
        get_run_logger().warning("no curl example: %s", exc)
    return report.query_commands(name, s.host, s.http_port, s.grpc_port, serve_args, request_file, body)


def finish(paths: RunPaths, summary: dict, title: str) -> None:
    """summary.json (every figure, full precision) and the run-summary artifact (rounded, with how to query)."""
    (paths.root / "summary.json").write_text(pd.Series(summary).to_json(indent=2))
    create_markdown_artifact(key="run-summary", markdown=report.run_summary_markdown(summary, title),
                             description=f"{title}: served model, endpoints and how to query them")


def _headline_metrics(cfg: RunConfig, model, ranker) -> dict:
    if not cfg.model.is_retrieval:
        return {k: model.metrics[k] for k in ("auc", "logloss", "n_train", "n_valid")}
    k = cfg.model.retrieval.k
    out = {f"{m}@{k}": model.metrics[m] for m in ("recall", "precision", "ndcg", "mrr")}
    out.update({key: model.metrics[key] for key in (f"user_recall@{k}", f"user_ndcg@{k}") if key in model.metrics})
    out.update(n_train=model.metrics["n_train"], n_queries=model.metrics["n_queries"])
    if ranker is not None:
        out.update({f"ranker_{m}": ranker.metrics[m] for m in ("auc", "logloss")})
    return out


def baseline_rows(comparison: evaluation.BaselineReport) -> list[dict]:
    """Rows of the ``metrics`` artifact for the baselines (same split, same protocol as the model)."""
    rows = [{"metric": f"baseline {name}: {m}", "value": report.num(v)} for name, r in comparison.baselines.items()
            for m, v in r.items() if m in ("skipped",) or (m.split("@")[0] in ("auc", "logloss", "recall", "ndcg", "mrr"))]
    return rows + [{"metric": "lift over the best baseline", "value": comparison.lift}]


def _metrics_line(metrics: dict) -> str:
    return ", ".join(f"{k} {report.num(v)}" for k, v in metrics.items() if isinstance(v, float))


def _refused_md(d: gate.GateDecision) -> str:
    kept = f"version **{d.served_version}** keeps serving" if d.served_version else "nothing is served"
    served = f"served {report.num(d.served)}" if d.served is not None else "nothing served to compare"
    return "\n".join([
        "# promotion", "",
        f"- decision: **refused**; {kept}",
        f"- {d.reason}",
        f"- {d.metric}: candidate {report.num(d.candidate)}, {served} on {d.n_rows} validation rows",
    ])


def _promotion_md(event: dict, info: dict, d: gate.GateDecision) -> str:
    return "\n".join([
        "# promotion", "",
        f"- decision: **{event['action']}** version **{event['version']}** (previously served: {event['previous']})",
        f"- gate: {d.reason}",
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
