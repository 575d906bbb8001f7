"""The benchmark suite, one command:

    make bench                                   # = uv run --frozen --no-sync python -m benchmarks.run
    uv run --frozen --no-sync python -m benchmarks.run --quick
    uv run --frozen --no-sync python -m benchmarks.run --etl-rows 1000000,5000000 --skip e2e   # other sizes
    uv run --frozen --no-sync python -m benchmarks.run --with topk   # + top-k serving (retrieval, two-stage)
    uv run --frozen --no-sync python -m benchmarks.run --skip etl,etl_peers,train,serving,serving_peers,e2e --with topk  # top-k only
    uv run --frozen --no-sync python -m benchmarks.run --skip train,e2e --peers-etl-rows 1e6,1e7   # peers, bigger
    uv run --frozen --no-sync python -m benchmarks.run --skip etl,etl_peers,train,serving_peers,impressions,e2e --with topk  # user-id section

Writes ``benchmarks/results/latest.json`` and ``benchmarks/results/latest.md`` (git-ignored;
README.md / benchmarks/README.md keep a copy of the figures). Everything is measured in one run on
one machine: compare the ratios, not absolute figures across machines.
"""
from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SECTIONS = ("etl", "etl_peers", "train", "serving", "serving_peers", "topk", "impressions", "e2e", "user_id")
OPTIONAL = ("topk",)  # not in the default run (keeps `make bench` under 15 min here); add with --with

FULL = {"etl_rows": [1_000_000, 10_000_000], "train_rows": 1_000_000, "serve_model_rows": 20_000,
        "peers_etl_rows": [1_000_000]}
QUICK = {"etl_rows": [100_000, 1_000_000], "train_rows": 100_000, "serve_model_rows": 20_000,
         "peers_etl_rows": [100_000]}


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small sizes: ETL 100k/1M rows, fewer requests")
    p.add_argument("--etl-rows", help="comma-separated ETL sizes (default 1M,10M; quick 100k,1M)")
    p.add_argument("--peers-etl-rows", help="comma-separated sizes of the ETL peers (stock NVTabular, pandas, polars; "
                   "default 1M, quick 100k; a size the ETL section ran reuses its pipeline and pandas figures)")
    p.add_argument("--train-rows", type=int, help="rows of the training benchmark's synthetic set (default 1M, quick 100k; 80%% are trained on)")
    p.add_argument("--train-batch-size", type=int, default=1024)
    p.add_argument("--train-one-interpreter", action="store_true",
                   help="the training runs one after the other in one child process (default: one child each)")
    p.add_argument("--train-unshuffled-only", action="store_true",
                   help="only the two unshuffled training runs (default: unshuffled and shuffled)")
    p.add_argument("--serve-model-rows", type=int, help="rows the served model is trained on (default 20k)")
    p.add_argument("--serve-requests", type=int, default=None,
                   help="cap on requests per client and configuration (default: 300/200/40 for batch 1/64/1024)")
    p.add_argument("--serve-seconds", type=float, default=None, help="cap on seconds per serving configuration")
    p.add_argument("--serve-one-triton", action="store_true",
                   help="serve the dynamically batched variant (under its own name) and the serving_peers section's "
                   "models on the serving section's server (default: a server each)")
    p.add_argument("--serve-model-from-topk", action="store_true",
                   help="the serving sections serve the top-k section's re-ranker (the DLRM of its two-stage flow, "
                   "with that run's workflow and validation rows) instead of training a model; the top-k section "
                   "then runs first (needs --with topk; default: a model trained for the serving sections)")
    p.add_argument("--e2e-overrides-json", default="{}", help="config overrides for the end-to-end run (default: none)")
    p.add_argument("--e2e-from-topk", action="store_true",
                   help="the e2e section reports the flow the topk section ran (its two-stage config) instead of "
                   "running the default flow (default: its own flow)")
    p.add_argument("--prefect-api-url", help="the flows of the topk and e2e sections report to this running "
                   "Prefect API (default: each starts its own ephemeral API, whose start-up is measured)")
    p.add_argument("--topk-overrides-json", default=None,
                   help="data/model overrides of the topk section's flow (default: 20k interactions, 1 epoch)")
    p.add_argument("--topk-ann-items", type=int, default=None, help="catalogue size of the topk section's ANN "
                   "part (default 1M; 0: no ANN part)")
    p.add_argument("--skip", default="", help=f"comma-separated sections to skip: {','.join(SECTIONS)}")
    p.add_argument("--with", dest="with_", default="",
                   help=f"comma-separated optional sections to run as well: {','.join(OPTIONAL)} (top-k serving, ~3-5 min)")
    p.add_argument("--out", default=str(RESULTS), help="folder for latest.json / latest.md")
    p.add_argument("--data-dir", default=str(RESULTS / ".data"), help="cache of generated input data")
    p.add_argument("--keep-work", action="store_true", help="keep the temporary work folder")
    return p.parse_args(argv)


def machine_info() -> dict:
    cpu = ""
    try:
        cpu = next(l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name"))
    except (OSError, StopIteration):
        pass
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True).stdout.strip()
    except OSError:
        commit = ""
    import psutil

    return {"cpus": os.cpu_count(), "cpu_model": cpu, "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
            "python": platform.python_version(), "platform": platform.platform(), "git_commit": commit,
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def main(argv=None) -> dict:
    a = parse_args(argv)
    sizes = QUICK if a.quick else FULL
    etl_rows = [int(float(x)) for x in a.etl_rows.split(",")] if a.etl_rows else sizes["etl_rows"]
    peers_rows = [int(float(x)) for x in a.peers_etl_rows.split(",")] if a.peers_etl_rows else sizes["peers_etl_rows"]
    train_rows = a.train_rows or sizes["train_rows"]
    serve_rows = a.serve_model_rows or sizes["serve_model_rows"]
    skip = skipped_sections(a)
    out_dir, data_dir = Path(a.out), Path(a.data_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="recsys-bench-"))

    results: dict = {
        "started": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        "mode": ("quick" if a.quick else "full") + (" (sizes overridden)" if (a.etl_rows or a.train_rows or a.serve_model_rows or a.serve_requests) else ""),
        "machine": machine_info(),
        "params": {"etl_rows": etl_rows, "peers_etl_rows": peers_rows, "train_rows": train_rows, "train_batch_size": a.train_batch_size,
                   "serve_model_rows": serve_rows, "serve_requests": a.serve_requests,
                   "serve_seconds": a.serve_seconds, "skip": sorted(skip)},
        "section_seconds": {}, "errors": {},
    }
    t_all = time.perf_counter()

    def section(name, fn):
        if name in skip:
            return
        print(f"[bench] {name} ...", flush=True)
        t0 = time.perf_counter()
        try:
            results[name] = fn()
        except Exception as exc:  # one failing section does not lose the others' figures
            results["errors"][name] = f"{type(exc).__name__}: {exc}"
            traceback.print_exc()
        results["section_seconds"][name] = round(time.perf_counter() - t0, 1)
        print(f"[bench] {name} done in {results['section_seconds'][name]} s", flush=True)
        _write(results, out_dir)  # partial results survive an interrupted run

    section("etl", lambda: etl_section(etl_rows, work, data_dir))
    section("etl_peers", lambda: etl_peers_section(results.get("etl"), peers_rows, work, data_dir))
    section("train", lambda: train_section(a, results.get("etl"), train_rows, work, data_dir))
    if a.serve_model_from_topk:  # the serving sections serve its flow's re-ranker
        section("topk", lambda: topk_section(a, work))
    section("serving", lambda: serving_section(a, "serving_peers" not in skip, serve_rows, work, data_dir))
    section("serving_peers", lambda: serving_peers_section(a, serve_rows, work, data_dir,
                                                           (results.get("serving") or {}).pop("guest", None)))
    if not a.serve_model_from_topk:
        section("topk", lambda: topk_section(a, work))
    section("impressions", lambda: impressions_section(a, work))
    section("e2e", lambda: e2e_section(a, work))
    section("user_id", lambda: user_id_section(a, results, work))

    results["total_seconds"] = round(time.perf_counter() - t_all, 1)
    results["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    results["finished"] = dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")
    _write(results, out_dir)
    if a.keep_work:
        print(f"[bench] work folder kept: {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    print((out_dir / "latest.md").read_text())
    print(f"[bench] wrote {out_dir / 'latest.json'} and {out_dir / 'latest.md'} in {results['total_seconds']} s")
    return results


def skipped_sections(a: argparse.Namespace) -> set[str]:
    """--skip, plus the optional sections not asked for with --with (--serve-model-from-topk needs topk)."""
    skip = {s.strip() for s in a.skip.split(",") if s.strip()}
    bad = skip - set(SECTIONS)
    if bad:
        raise SystemExit(f"--skip: unknown section(s) {sorted(bad)}; choose from {SECTIONS}")
    extra = {s.strip() for s in a.with_.split(",") if s.strip()}
    if extra - set(OPTIONAL):
        raise SystemExit(f"--with: unknown optional section(s) {sorted(extra - set(OPTIONAL))}; choose from {OPTIONAL}")
    skip |= set(OPTIONAL) - extra
    if a.serve_model_from_topk and "topk" in skip:
        raise SystemExit("--serve-model-from-topk: the top-k section must run (--with topk)")
    return skip


def train_section(a: argparse.Namespace, etl_results: list | None, train_rows: int, work: Path, data_dir: Path) -> dict:
    """The training section on the ETL section's NVTabular output of this size, else on one transformed here."""
    from benchmarks import etl_bench, train_bench

    done = [e for e in etl_results or [] if e["rows"] == train_rows]
    if done and Path(done[0]["nvt"]["train_dir"]).is_dir():
        train_dir = Path(done[0]["nvt"]["train_dir"])
    else:
        from pipeline_lib.config import ColumnsConfig

        d = etl_bench.prepare_data(train_rows, data_dir)
        train_dir = Path(etl_bench.nvt_fit_transform(ColumnsConfig(), d["train"], d["valid"],
                                                     work / "train_etl")["train_dir"])
    return train_bench.bench(train_dir, a.train_batch_size, a.train_one_interpreter, not a.train_unshuffled_only)


def serving_section(a: argparse.Namespace, with_peers: bool, serve_rows: int, work: Path, data_dir: Path) -> dict:
    """The serving section in its child process (with --serve-one-triton and the serving_peers section
    to run, the peers measured on its server too)."""
    from benchmarks import serving_bench, serving_peers

    from benchmarks import topk_bench

    run_dir = str(topk_bench.flow_run_dir(work / "topk")) if a.serve_model_from_topk else None
    plan = serving_bench.Plan(quick=a.quick, requests_cap=a.serve_requests, seconds_cap=a.serve_seconds,
                              model_from_run=run_dir)
    if a.serve_one_triton and with_peers:
        return serving_peers.serving_subprocess(work / "serving", data_dir, plan, serve_rows)
    return serving_bench.bench_subprocess(work / "serving", data_dir, plan, serve_rows, a.serve_one_triton)


def e2e_section(a: argparse.Namespace, work: Path) -> dict:
    """The default flow end to end, or with --e2e-from-topk the figures of the top-k section's flow."""
    from benchmarks import e2e_bench

    if a.e2e_from_topk:
        return e2e_bench.load(work / "topk" / "flow") | {"from_topk_section": True}
    return e2e_bench.bench(work / "e2e", json.loads(a.e2e_overrides_json), prefect_api=a.prefect_api_url)


def etl_section(etl_rows: list[int], work: Path, data_dir: Path) -> list:
    """The pipeline's ETL against plain pandas at each size; prints the target line."""
    from benchmarks import etl_bench

    out = [etl_bench.bench(n, work / "etl", data_dir) for n in etl_rows]
    for e in out:
        print(f"[etl] {etl_bench.target_line(e)}", flush=True)
    return out


def etl_peers_section(etl_results: list | None, peers_rows: list[int], work: Path, data_dir: Path) -> list:
    """ETL peers at each size (reusing the ETL section's pipeline and pandas runs of that size); prints the ratios."""
    from benchmarks import etl_peers

    done = {e["rows"]: e for e in etl_results or []}
    out = [etl_peers.bench(n, work / "etl", data_dir, done.get(n)) for n in peers_rows]
    for line in (x for e in out for x in etl_peers.ratio_lines(e)):
        print(f"[peers] {line}", flush=True)
    return out


def serving_peers_section(a: argparse.Namespace, serve_rows: int, work: Path, data_dir: Path,
                          measured: dict | None = None) -> dict:
    """Serving peers on one Triton (the serving section's model when it ran); prints the ratios.
    ``measured``: the peers the serving section already measured on its server (--serve-one-triton)."""
    from benchmarks import serving_peers

    out = measured or serving_peers.bench_subprocess(work / "serving_peers", data_dir, quick=a.quick, model_rows=serve_rows,
                                         serving_work=work / "serving", requests_cap=a.serve_requests,
                                         seconds_cap=a.serve_seconds)
    for line in serving_peers.ratio_lines(out):
        print(f"[peers] {line}", flush=True)
    return out


def impressions_section(a: argparse.Namespace, work: Path) -> dict:
    """Batch-1 p50 with and without the impression log, on one Triton (benchmarks/impressions_bench.py)."""
    from benchmarks import impressions_bench

    return impressions_bench.bench(work / "impressions", requests=500 if a.quick else 2000)


def topk_section(a: argparse.Namespace, work: Path) -> dict:
    """The top-k section with the run's options (request caps shared with the serving sections)."""
    from benchmarks import latency, topk_bench

    data = json.loads(a.topk_overrides_json) if a.topk_overrides_json else None
    items = topk_bench.ANN_ITEMS if a.topk_ann_items is None else a.topk_ann_items
    return topk_bench.bench(work / "topk", quick=a.quick, data=data, ann_items=items,
                            calls=latency.budget(a.quick, a.serve_requests, a.serve_seconds),
                            prefect_api=a.prefect_api_url)


def user_id_section(a: argparse.Namespace, results: dict, work: Path) -> dict:
    """User-id vs full-feature requests, served (benchmarks/user_id.py): the top-k section's two-stage rows (moved
    out of its results) and the serving section's model as a ranking user-id version, on a Triton of its own."""
    from benchmarks import latency, user_id

    topk_rows = (results.get("topk") or {}).get("two_stage", {}).pop("user_id", None)
    return user_id.section(topk_rows, work / "serving", work / "user_id",
                           latency.budget(a.quick, a.serve_requests, a.serve_seconds))


def _write(results: dict, out_dir: Path) -> None:
    from benchmarks.report import markdown

    (out_dir / "latest.json").write_text(json.dumps(results, indent=2, default=str))
    (out_dir / "latest.md").write_text(markdown(results))


if __name__ == "__main__":
    res = main()
    sys.exit(1 if res.get("errors") else 0)
