"""The session-based (next-item) run: the same stages as the ranking flow, for ``task: session``.

raw events -> validated -> NVTabular (grouping by session + fitted feature workflow) -> sequence
model vs baselines -> ensemble (workflow + model + top-k decoding) -> gate -> Triton smoke test
(served top-k == offline top-k) -> publish -> promote. ``flows.pipeline.pipeline`` calls
:func:`run_session` when the config says ``task: session``; every task is a thin wrapper over
``pipeline_lib`` functions.
"""
from __future__ import annotations

from pathlib import Path

import pandas as pd
from prefect import get_run_logger, task
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.cache_policies import NO_CACHE

from pipeline_lib.data import sessions as session_data
from pipeline_lib.validate import sessions as session_checks
from pipeline_lib.release import session_gate as session_release
from pipeline_lib import report
from pipeline_lib.serving import repository
from pipeline_lib.validate import data as validate
from pipeline_lib.config import RunConfig
from pipeline_lib.paths import RunPaths

from flows.pipeline import (_baselines, _promotion_md, _refused_md, finish, learning_curve_artifact,  # shared with
                            query_info, run_promote, run_publish, stage_timer)  # ranking runs: same tasks, artifacts


@task(name="raw-data", retries=2, retry_delay_seconds=[2, 10], cache_policy=NO_CACHE,
      retry_condition_fn=lambda t, r, s: not isinstance(getattr(s, "data", None), validate.DataValidationError))
def session_raw_data(cfg: RunConfig, paths: RunPaths) -> Path:

    return session_data.write_raw_events(cfg.data, cfg.session, cfg.seed, paths.raw)


@task(name="validate", cache_policy=NO_CACHE)
def session_validate(cfg: RunConfig, paths: RunPaths, raw_path: Path) -> Path:

    stats = session_checks.validate_events(raw_path, cfg.session.columns, paths.validated)
    drift = validate.drift_report(stats, cfg.runs_dir, paths.root, cfg.validation.drift, paths.validated / "drift.json")
    if drift["drifted"]:
        get_run_logger().warning("data drift against %s:\n  - %s", drift["previous"],
                                 "\n  - ".join(f["message"] for f in drift["findings"]))
    return stats


@task(name="etl", cache_policy=NO_CACHE)
def session_etl(cfg: RunConfig, paths: RunPaths, raw_path: Path):
    from pipeline_lib.etl import sessions

    return sessions.run_session_etl(raw_path, cfg, paths.transformed, paths.split)


@task(name="train", cache_policy=NO_CACHE)
def session_train(cfg: RunConfig, paths: RunPaths, etl_out):
    from pipeline_lib.models import session as session_model

    model = session_model.train_and_evaluate(etl_out, cfg, paths.model)
    return model, _baselines(cfg, etl_out, model)


def _requests(cfg: RunConfig, etl_out, n: int) -> pd.DataFrame:
    """Held-out sessions minus their last event: what a client would send."""
    from pipeline_lib.etl.sessions import prefixes

    return prefixes(pd.read_parquet(etl_out.split.valid).head(n), cfg.session.columns)[0]


@task(name="export", cache_policy=NO_CACHE)
def session_export(cfg: RunConfig, paths: RunPaths, etl_out, model):
    from pipeline_lib.export import session as ssm

    return ssm.export_session_ensemble(
        etl_out.workflow_dir, model.model_dir, _requests(cfg, etl_out, cfg.export.parity_rows),
        cfg.session.columns.item_id, cfg.session.top_k, paths.ensemble, cfg.export.model_name, 1,
        cfg.export.parity_atol, run_info={"run_dir": str(paths.root), "metrics": model.metrics},
        max_request_rows=cfg.export.max_request_rows, fast_transform=cfg.export.fast_transform,
        exclude_seen=cfg.session.exclude_seen,
    )


@task(name="gate", cache_policy=NO_CACHE)
def session_gate(cfg: RunConfig, paths: RunPaths, etl_out, exp, baselines=None):
    from pipeline_lib.release import gate

    repo, name = cfg.export.model_repository, cfg.export.model_name
    served = repository.served_version(repo, name)
    served_dir = Path(repo) / name / str(served) if served else None
    valid = pd.read_parquet(etl_out.split.valid).head(cfg.gate.max_rows)
    if not cfg.gate.enabled:
        decision = gate.GateDecision(True, cfg.session.gate_metric, float("nan"), None, served, cfg.gate.tolerance, 0,
                                     "gate disabled (gate.enabled: false)")
    else:
        decision = session_release.decide(exp.version_dir, served_dir, served, valid, cfg.session.columns, cfg.session.top_k,
                              cfg.session.gate_metric, cfg.gate.tolerance)
        args = gate.baseline_args(cfg.gate, baselines)
        if args:
            decision = gate.with_baselines(decision, args["baselines"], args["baseline_candidate"],
                                           args["baseline_metric"], args["min_lift"], args["model_name"])
    decision.save(paths.root / "gate.json")
    print(f"promotion gate: {'PROMOTE' if decision.promote else 'KEEP SERVED VERSION'}: {decision.reason}")
    return decision


@task(name="serving-smoke-test", retries=1, retry_delay_seconds=5, cache_policy=NO_CACHE)
def session_smoke(cfg: RunConfig, paths: RunPaths, etl_out, exp):
    import nvtabular as nvt

    from pipeline_lib.export import session as ssm

    rows = _requests(cfg, etl_out, cfg.serving.smoke_rows)
    offline = ssm.offline_topk(nvt.Workflow.load(str(etl_out.workflow_dir)), exp.version_dir / "ensemble" / "model",
                               rows, cfg.session.columns.item_id, cfg.session.top_k, cfg.session.exclude_seen)
    result = session_release.session_smoke_test(exp.staged_repository, exp.model_name, rows, offline, cfg.serving.smoke_atol,
                                    paths.serving, cfg.serving.startup_timeout_s)
    get_run_logger().info("smoke test: %d raw sessions, served top-%d over HTTP and gRPC == offline top-k (same ids "
                          "and order; max score diff %.1e)", result.n_sessions, cfg.session.top_k, result.max_abs_diff)
    return result


def metric_table(metrics: dict, k: int) -> list[dict]:
    """Model vs baselines, one row each."""
    rows = [{"method": metrics["model"], **{m: metrics[f"{m}@{k}"] for m in ("recall", "ndcg", "mrr")}}]
    for name, vals in metrics["baselines"].items():
        rows.append({"method": name, **{m: vals[f"{m}@{k}"] for m in ("recall", "ndcg", "mrr")}})
    return [{"method": r["method"], f"recall@{k}": round(r["recall"], 4), f"ndcg@{k}": round(r["ndcg"], 4),
             f"mrr@{k}": round(r["mrr"], 4)} for r in rows]


def run_session(cfg: RunConfig, paths: RunPaths, serve_args: list[str] | None = None) -> dict:
    """Every stage of a session run (called inside the ``recsys-pipeline`` flow)."""
    timings: dict[str, float] = {}
    timed = stage_timer(timings)

    k = cfg.session.top_k
    raw_path = timed("raw-data", session_raw_data, cfg, paths)
    timed("validate", session_validate, cfg, paths, raw_path)
    etl_out = timed("etl", session_etl, cfg, paths, raw_path)
    model, baselines = timed("train", session_train, cfg, paths, etl_out)
    learning_curve_artifact([(model.metrics["model"], model.metrics_path)])
    exp = timed("export", session_export, cfg, paths, etl_out, model)
    decision = timed("gate", session_gate, cfg, paths, etl_out, exp, baselines)
    table = metric_table(model.metrics, k)
    summary = {
        "task": "session",
        "run_dir": str(paths.root),
        "etl_device": etl_out.device,
        "etl_from": str(etl_out.workflow_dir.parent),
        "model": model.metrics["model"],
        "metrics": {key: model.metrics[key] for key in (f"recall@{k}", f"ndcg@{k}", f"mrr@{k}", "n_train", "n_valid")},
        "baselines": baselines.baselines,
        "lift": baselines.lift,
        "gate": {"promote": decision.promote, "metric": decision.metric, "candidate": decision.candidate,
                 "served": decision.served, "served_version": decision.served_version, "reason": decision.reason},
        "stage_seconds": timings,
    }
    create_table_artifact(key="metrics", table=table, description=f"next-item metrics on held-out sessions (k={k})")
    print("Next-item metrics on the held-out sessions (last item):\n" + pd.DataFrame(table).to_string(index=False))
    requests = _requests(cfg, etl_out, cfg.serving.smoke_rows)
    if not decision.promote:
        summary.update(model_version=None, served_version=decision.served_version,
                       query=query_info(cfg, paths, requests, serve_args or []))
        finish(paths, summary, "session run")
        create_markdown_artifact(key="promotion", markdown=_refused_md(decision), description="promotion gate")
        print(f"candidate refused by the gate; "
              f"{f'version {decision.served_version} keeps serving' if decision.served_version else 'nothing is served'}")
        return summary | {"predictions": None}

    result = timed("serving-smoke-test", session_smoke, cfg, paths, etl_out, exp)
    version, served_dir, info = timed("publish", run_publish, cfg, paths, raw_path, etl_out, model, exp)
    event = timed("promote", run_promote, cfg, version)
    preds = result.table(requests)
    summary.update({
        "model_version": version, "served_dir": str(served_dir), "served_version": event["version"],
        "previous_version": event["previous"], "pruned_versions": event["pruned"],
        "data_fingerprint": info["data"]["fingerprint"],
        "max_abs_diff_served_vs_offline": result.max_abs_diff, "served_topk_equals_offline": True,
        "live_server": event["live_server"], "query": query_info(cfg, paths, requests, serve_args or []),
    })
    shown = preds.drop(columns=[cfg.session.columns.timestamp], errors="ignore")  # 10-digit lists: too wide
    create_table_artifact(key="served-predictions",
                          table=report.compact_table(shown, merge=("top-k", report.SCORE_COLUMNS),
                                                     tail=[c for c in shown.columns if c not in report.SCORE_COLUMNS]),
                          description="Raw sessions sent to Triton (their last 4 events; timestamps not shown) and the "
                                      "top-k item ids: served over HTTP, over gRPC and offline (one list where the three "
                                      "agree; first 4 shown)")
    finish(paths, summary, "session run")
    create_markdown_artifact(key="promotion", markdown=_promotion_md(event, info, decision),
                             description="gate decision, served version and lineage")
    item = cfg.session.columns.item_id
    shown = pd.DataFrame({f"{item} (last 5 of the session)": preds[item].map(lambda v: list(v)[-5:]),
                          "served_grpc top-k": preds["served_grpc"], "offline top-k": preds["offline"]})
    print("Served top-k (Triton, raw sessions in, next item ids out):\n" + shown.head(4).to_string())
    print(f"{model.metrics['model']} recall@{k} {model.metrics[f'recall@{k}']:.4f}, ndcg@{k} "
          f"{model.metrics[f'ndcg@{k}']:.4f}; served top-k == offline; published and serving {served_dir}")
    return summary | {"predictions": preds}
