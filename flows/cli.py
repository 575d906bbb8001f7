"""``recsys`` command line: run the pipeline, serve the repository, query it."""
from __future__ import annotations

import json
import signal
import time
from pathlib import Path
from typing import List, Optional, cast

import typer

from pipeline_lib import quiet

quiet.install()  # before Merlin/TensorFlow/Prefect are imported: known-harmless library warnings off

app = typer.Typer(add_completion=False, no_args_is_help=True, help="End-to-end recommender pipeline on Merlin + Triton + Prefect.")

ConfigOpt = typer.Option(None, "--config", "-c", help="YAML run config (default: the embedded synthetic run)")
SetOpt = typer.Option(None, "--set", "-s", help="override a config key, e.g. --set model.epochs=3 (repeatable)")
ProtocolOpt = typer.Option("grpc", help="http or grpc")
UrlOpt = typer.Option(None, help="server address host:port (default from config)")


def _cfg(config: Optional[Path], sets: Optional[List[str]]):
    from pipeline_lib.config import load_config, parse_set_options

    return load_config(config, parse_set_options(sets or []))


def _address(cfg, protocol: str, url: Optional[str]) -> str:
    """host:port of the served model: ``--url``, else the config's host and the protocol's port."""
    return url or f"{cfg.serving.host}:{cfg.serving.grpc_port if protocol == 'grpc' else cfg.serving.http_port}"


def _fail(msg: str) -> None:
    typer.secho(f"error: {msg}", fg=typer.colors.RED, err=True)
    raise typer.Exit(code=2)


_DEBUG = {"on": False}


@app.callback()
def _options(debug: bool = typer.Option(False, "--debug", help="print the full traceback when a command fails")) -> None:
    _DEBUG["on"] = debug


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip() or type(exc).__name__
    return text.splitlines()[0][:400]


def _repo_failure(action: str, cfg, exc: BaseException) -> None:
    """One line for a failed promote / rollback / prune: what failed, what is served now, what to do."""
    from pipeline_lib.serving.repository import served_version

    if _DEBUG["on"]:
        raise exc
    repo, model = cfg.export.model_repository, cfg.export.model_name
    try:
        served = served_version(repo, model)
        now = f"v{served} of '{model}' is still served" if served is not None else f"nothing of '{model}' is served"
    except Exception:  # noqa: BLE001 - the repository itself may be what is broken
        now = f"the served version of '{model}' could not be read"
    _fail(f"{action} failed: {_first_line(exc)}. {now} ({repo}). Check `recsys versions` and the path's permissions; "
          "`recsys --debug ...` shows the traceback.")


@app.command()
def run(config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
        as_json: bool = typer.Option(False, "--json", help="print the full run summary as JSON (as in summary.json)")
        ) -> None:
    """Run the whole Prefect flow: data -> ETL -> train -> export -> Triton smoke test -> publish."""
    from pipeline_lib.config import parse_set_options

    from pipeline_lib.features.stage import check_store
    from pipeline_lib.paths import check_writable

    try:
        overrides = parse_set_options(set_ or [])
        cfg = _cfg(config, set_)  # validate before starting Prefect
        check_writable("runs_dir", Path(cfg.runs_dir))  # the flow checks again; this fails in a second
        check_writable("export.model_repository", Path(cfg.export.model_repository))
        check_store(cfg)  # a Redis online store that does not answer
    except Exception as exc:
        _fail(str(exc))
    from flows.pipeline import pipeline
    from pipeline_lib.errors import DataValidationError, OutputPathError
    from pipeline_lib.features.store import FeatureStoreError

    try:
        # calling the flow returns its final state's data: the summary dict
        summary = cast(dict, pipeline(config_path=str(config) if config else None, overrides=overrides or None))
    # bad input data / output path, a feature store that failed (the message says which version serves): one line
    except (DataValidationError, OutputPathError, FeatureStoreError) as exc:
        if _DEBUG["on"]:
            raise
        _fail(str(exc))
    summary.pop("predictions", None)
    if as_json:
        typer.echo(json.dumps(summary, indent=2, default=str))
        return
    from pipeline_lib.report import cli_summary

    typer.echo("\n" + cli_summary(summary))


@app.command()
def serve(
    config: Optional[Path] = ConfigOpt,
    set_: Optional[List[str]] = SetOpt,
    repository: Optional[Path] = typer.Option(None, help="model repository (default: export.model_repository)"),
) -> None:
    """Start Triton over the model repository and keep it running until Ctrl-C (or SIGTERM).

    A supervisor probes the model with a real inference every serving.supervisor.probe_interval_s,
    reloads the model or restarts Triton when it fails, and exits non-zero when it gives up."""
    import logging

    from pipeline_lib.serving.server import ServerError, server_from_config
    from pipeline_lib.serving.supervisor import GAVE_UP, Supervisor, SupervisorPolicy

    if not logging.getLogger().handlers:  # the supervisor's "why" lines reach the terminal / journal
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(message)s")
    cfg = _cfg(config, set_)
    repo = repository or cfg.export.model_repository
    s = cfg.serving
    from pipeline_lib.online.settings import server_env as online_env

    server = server_from_config(s, repo, cfg.export.model_name, env=online_env(cfg))
    stop = {"flag": False, "starting": True}

    def on_signal(*_) -> None:
        stop["flag"] = True
        if stop["starting"]:  # interrupt a long start-up at once (start() stops Triton on the way out)
            raise KeyboardInterrupt

    # Ctrl-C (SIGINT) and SIGTERM both stop the server, also when SIGINT came in ignored (a background
    # `cmd &` of a non-interactive shell, nohup): Python then installs no KeyboardInterrupt for it
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    try:
        server.start(timeout_s=s.startup_timeout_s, models=[cfg.export.model_name])
    except ServerError as exc:
        _fail(str(exc))
    except KeyboardInterrupt:
        server.stop()
        typer.echo("stopped during start-up.")
        raise typer.Exit(code=130) from None
    stop["starting"] = False
    typer.echo(f"Triton ready: HTTP {server.http_url}  gRPC {server.grpc_url}  metrics {s.host}:{s.metrics_port}/metrics")
    typer.echo(f"model '{cfg.export.model_name}' from {Path(repo).resolve()} (model control: {s.model_control}); "
               f"log {server.log_file}. Ctrl-C stops.")
    if server.key_file is not None:
        typer.echo(f"model-repository API (load/unload) restricted: admin key in {server.key_file} (0600)")
    sup = s.supervisor
    if not sup.enabled:
        try:
            while not stop["flag"] and server.process and server.process.poll() is None:
                time.sleep(0.5)
        finally:
            server.stop()
        typer.echo("Triton stopped.")
        return
    policy = SupervisorPolicy(sup.probe_interval_s, sup.probe_timeout_s, sup.max_failures, sup.window_s,
                              sup.backoff_initial_s, sup.backoff_max_s, s.startup_timeout_s)
    code = Supervisor(server, cfg.export.model_name, Path(repo), policy).run(lambda: stop["flag"])
    if code == GAVE_UP:
        typer.secho(f"error: Triton stopped: model '{cfg.export.model_name}' kept failing ({sup.max_failures} recoveries "
                    f"within {sup.window_s:.0f} s); see {server.log_file}", fg=typer.colors.RED, err=True)
        raise typer.Exit(code=code)
    typer.echo("Triton stopped.")


def _live(cfg):
    from pipeline_lib.serving.server import live_server

    return live_server(cfg.serving) if cfg.serving.notify_live_server else None


@app.command()
def versions(config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt) -> None:
    """List published versions with their lineage; '*' marks the served one."""
    from pipeline_lib.serving.repository import describe

    cfg = _cfg(config, set_)
    rows = describe(cfg.export.model_repository, cfg.export.model_name)
    if not rows:
        typer.echo(f"no published version of '{cfg.export.model_name}' in {cfg.export.model_repository}")
    for r in rows:
        m = r["metrics"] or {}
        name = "auc" if "auc" in m else next((k for k in m if k.startswith("recall@")), "auc")  # session models: recall@k
        auc = m.get(name)
        typer.echo(f"{'*' if r['served'] else ' '} v{r['version']:<4} created {r['created']}  "
                   f"{name} {auc if auc is None else round(auc, 4)}  data {r['data_fingerprint']}  run {r['run_dir']}")


@app.command()
def promote(version: int = typer.Argument(..., help="version number to serve"),
            config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt) -> None:
    """Serve VERSION; a running `recsys serve` switches to it without restart."""
    from pipeline_lib.serving.repository import promote as _promote

    from pipeline_lib.features.stage import check_restorable, restore

    cfg = _cfg(config, set_)
    repo, model = cfg.export.model_repository, cfg.export.model_name
    try:
        check_restorable(repo, model, version)  # the feature store must be able to follow
        event = _promote(repo, model, version, _live(cfg), cfg.serving.instance_count)
        event["features"] = restore(repo, model, version)
    except Exception as exc:  # noqa: BLE001 - one line (traceback with --debug)
        _repo_failure(f"promote to v{version}", cfg, exc)
    typer.echo(json.dumps(event))


@app.command()
def rollback(config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt) -> None:
    """Serve the previous (next older) version; a running `recsys serve` switches without restart."""
    from pipeline_lib.serving.repository import rollback as _rollback

    from pipeline_lib.features.stage import check_restorable, restore
    from pipeline_lib.serving.repository import rollback_target

    cfg = _cfg(config, set_)
    repo, model = cfg.export.model_repository, cfg.export.model_name
    try:
        check_restorable(repo, model, rollback_target(repo, model))  # refused when its features cannot follow
        event = _rollback(repo, model, _live(cfg), cfg.serving.instance_count)
        event["features"] = restore(repo, model, event["version"])  # the rolled-back version's snapshot
    except Exception as exc:  # noqa: BLE001 - one line (traceback with --debug)
        _repo_failure("rollback", cfg, exc)
    typer.echo(json.dumps(event))


@app.command()
def features(config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt) -> None:
    """Fill the feature store with the served version's snapshot again (what each run does after promotion)."""
    from pipeline_lib.features.stage import fill_store
    from pipeline_lib.serving.repository import served_version

    cfg = _cfg(config, set_)
    version = served_version(cfg.export.model_repository, cfg.export.model_name)
    if version is None:
        _fail(f"nothing of '{cfg.export.model_name}' is served in {cfg.export.model_repository}")
        return
    try:
        info = fill_store(cfg, version)
    except Exception as exc:  # noqa: BLE001 - one line (traceback with --debug)
        _repo_failure("features", cfg, exc)
    typer.echo(json.dumps(info) if info else f"v{version} of '{cfg.export.model_name}' has no feature snapshot")


@app.command()
def recommend(
    user_id: str = typer.Argument(..., help="raw user id"),
    k: Optional[int] = typer.Option(None, "--k", help="items to return (default: the version's k)"),
    exclude: Optional[List[str]] = typer.Option(None, "--exclude", help="an item id never to return (repeatable)"),
    protocol: str = ProtocolOpt,
    url: Optional[str] = UrlOpt,
    config: Optional[Path] = ConfigOpt,
    set_: Optional[List[str]] = SetOpt,
) -> None:
    """The served top-k for one user id (features and history from the feature store), with item features."""
    import pandas as pd

    from pipeline_lib.features.store import item_rows, read_pointer
    from pipeline_lib.serving.client import RecsysClient, RequestError

    cfg = _cfg(config, set_)
    address, col = _address(cfg, protocol, url), cfg.columns.user_id
    try:
        with RecsysClient(address, protocol, cfg.export.model_name) as client:  # type: ignore[arg-type]
            numeric = (client.input_datatype(col) or "").startswith(("INT", "UINT"))
            uid = int(user_id) if numeric and user_id.lstrip("-").isdigit() else user_id
            item_numeric = (client.input_datatype("exclude_item_ids__values") or "").startswith(("INT", "UINT"))
            excl = [[int(e) if item_numeric else e for e in exclude]] if exclude else None
            ids, scores, count, cold = client.recommend_user([uid], col, k, excl)
    except RequestError as exc:
        _fail(str(exc))
    except Exception as exc:  # connection refused, the store unavailable (503): say it plainly
        _fail(f"request to {protocol}://{address} failed: {exc}")
    top = list(ids[0][: int(count[0])])
    out = pd.DataFrame({cfg.columns.item_id: top, "score": [round(float(x), 4) for x in scores[0][: len(top)]]})
    store = read_pointer(Path(cfg.export.model_repository) / cfg.export.model_name)
    if store is not None and top:
        feats = item_rows(store.repo, cfg.columns.item_id, [v.item() if hasattr(v, "item") else v for v in top])
        out = pd.concat([out, feats.drop(columns=[cfg.columns.item_id])], axis=1)
    typer.echo(f"user {uid}{' (unknown to the feature store: cold-start answer)' if cold[0] else ''}: top {len(top)}")
    typer.echo(out.to_string(index=False))


@app.command()
def prune(keep: Optional[int] = typer.Option(None, help="versions to keep (default export.keep_versions)"),
          config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt) -> None:
    """Delete old versions beyond the retention setting (never the served one)."""
    from pipeline_lib.serving.repository import prune as _prune

    cfg = _cfg(config, set_)
    try:
        removed = _prune(cfg.export.model_repository, cfg.export.model_name, keep or cfg.export.keep_versions)
    except Exception as exc:  # noqa: BLE001 - one line (traceback with --debug)
        _repo_failure("prune", cfg, exc)
    typer.echo(f"removed versions: {removed or 'none'}")


@app.command()
def predict(
    rows: Optional[Path] = typer.Option(None, help="JSON file: a list of raw rows (objects). Default: rows from the latest run's validation split"),
    n: int = typer.Option(5, help="number of sample rows when --rows is not given"),
    protocol: str = ProtocolOpt,
    url: Optional[str] = UrlOpt,
    config: Optional[Path] = ConfigOpt,
    set_: Optional[List[str]] = SetOpt,
) -> None:
    """Send raw feature rows to the running Triton server and print the scores."""
    import pandas as pd

    from pipeline_lib.serving.client import RecsysClient, RequestError

    cfg = _cfg(config, set_)
    if cfg.task == "session":
        return _predict_sessions(cfg, rows, n, protocol, url)
    if rows is not None:
        df = pd.DataFrame(json.loads(rows.read_text()))
    else:
        runs = sorted(Path(cfg.runs_dir).glob("*/split/valid.parquet"), key=lambda p: p.stat().st_mtime)
        runs = [p for p in runs if not (p.parent.parent / "transformed" / "sessions").is_dir()]  # not session runs
        if not runs:
            _fail(f"no run found under {cfg.runs_dir}; pass --rows FILE.json")
        df = pd.read_parquet(runs[-1]).head(n)
    address = _address(cfg, protocol, url)
    try:
        with RecsysClient(address, protocol, cfg.export.model_name) as client:  # type: ignore[arg-type]
            df = df[[c for c in df.columns if c in client.raw_columns]]
            if client.is_topk:  # retrieval model: the k best items per row
                ids, scores = client.recommend(df)
                df = df.assign(top_items=[list(map(str, r)) for r in ids],
                               top_scores=[[round(float(x), 4) for x in r] for r in scores])
            else:
                df = df.assign(score=client.predict(df))
    except RequestError as exc:
        _fail(str(exc))
    except Exception as exc:  # connection refused, server-side error: say it plainly
        _fail(f"request to {protocol}://{address} failed: {exc}")
    typer.echo(df.to_string())


def _predict_sessions(cfg, rows: Optional[Path], n: int, protocol: str, url: Optional[str]) -> None:
    """task: session -- raw sessions so far (list columns) in, top-k next item ids and scores out."""
    import pandas as pd

    from pipeline_lib.serving.client import RequestError
    from pipeline_lib.serving.session_client import SessionClient
    from pipeline_lib.etl.sessions import prefixes

    if rows is not None:
        df = pd.DataFrame(json.loads(rows.read_text()))
    else:
        runs = sorted(Path(cfg.runs_dir).glob("*/split/valid.parquet"), key=lambda p: p.stat().st_mtime)
        runs = [p for p in runs if (p.parent.parent / "transformed" / "sessions").is_dir()]  # session runs only
        if not runs:
            _fail(f"no session run found under {cfg.runs_dir}; pass --rows FILE.json")
        df = prefixes(pd.read_parquet(runs[-1]).head(n), cfg.session.columns)[0]
    address = _address(cfg, protocol, url)
    try:
        with SessionClient(address, protocol, cfg.export.model_name) as client:  # type: ignore[arg-type]
            ids, scores = client.recommend(df)
    except RequestError as exc:
        _fail(str(exc))
    except Exception as exc:
        _fail(f"request to {protocol}://{address} failed: {exc}")
    item = cfg.session.columns.item_id
    out = pd.DataFrame({f"{item} (last 5)": df[item].map(lambda v: list(v)[-5:]), "next_item_ids": list(ids),
                        "scores": [[round(float(x), 3) for x in s] for s in scores]})
    typer.echo(out.to_string())


@app.command()
def feedback(
    files: Optional[List[Path]] = typer.Argument(None, help="feedback files (CSV, JSON lines, parquet): click / "
                                                 "purchase events with request_id or user_id, item_id, ts"),
    inbox: bool = typer.Option(False, "--inbox", help="also ingest every file dropped in <feedback>/inbox/"),
    config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt,
) -> None:
    """Accept user feedback for the online evaluation and retraining (docs/online.md).

    Good rows go to <online.feedback_path>/accepted/; every bad row is kept in rejected/ with its line and the
    reason, and reported here. Exit status 1 when any row was rejected."""
    from pipeline_lib.online.feedback import drain_inbox, ingest
    from pipeline_lib.online.settings import feedback_dir

    cfg = _cfg(config, set_)
    folder = feedback_dir(cfg)
    if not files and not inbox:
        _fail(f"give feedback files, or --inbox to ingest the files dropped in {folder / 'inbox'}")
    missing = [str(f) for f in files or [] if not Path(f).is_file()]
    if missing:
        _fail(f"feedback file(s) not found: {', '.join(missing)}")
    results = [ingest(Path(f), folder) for f in files or []] + (drain_inbox(folder) if inbox else [])
    for r in results:
        typer.echo(r.line())
    typer.echo(f"accepted: {sum(r.accepted for r in results)}, rejected: {sum(r.rejected for r in results)} "
               f"(feedback folder: {folder})")
    if any(r.rejected for r in results):
        raise typer.Exit(code=1)


@app.command("online-eval")
def online_eval(config: Optional[Path] = ConfigOpt, set_: Optional[List[str]] = SetOpt) -> None:
    """Run the online evaluation flow once: dropped feedback ingested, impressions joined, per-version CTR report
    (docs/online.md); names a served version whose online CTR regressed (online.auto_rollback rolls it back)."""
    from flows.online import online_evaluation
    from pipeline_lib.online.evaluation import table_rows

    cfg = _cfg(config, set_)
    result = online_evaluation(overrides=cfg.model_dump(mode="json"))
    for row in table_rows(result):
        typer.echo("  ".join(f"{k}: {v}" for k, v in row.items()))
    for r in result["regressions"]:
        typer.echo(f"regression: version {r['version']} below version {r['previous']}")
    if result.get("rollback"):
        typer.echo(result["rollback"])


@app.command("generate-data")
def generate_data(
    out: Path = typer.Option(Path("data/synthetic"), help="output folder"),
    config: Optional[Path] = ConfigOpt,
    set_: Optional[List[str]] = SetOpt,
) -> None:
    """Write the synthetic interaction log (interactions.parquet) for the config's seed and size."""
    from pipeline_lib.data.sources import write_raw

    cfg = _cfg(config, set_)
    path = write_raw(cfg.data.model_copy(update={"source": "synthetic"}), cfg.seed, out)
    typer.echo(str(path))


def main() -> None:  # pragma: no cover
    app()


if __name__ == "__main__":  # pragma: no cover
    main()
