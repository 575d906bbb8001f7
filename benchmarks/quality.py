"""The quality table: every candidate of each family on each data set, through the pipeline itself.

    make quality                                                    # = python -m benchmarks.quality
    uv run --frozen --no-sync python -m benchmarks.quality --quick  # small synthetic runs only (smoke)
    uv run --frozen --no-sync python -m benchmarks.quality --only ranking/ml-full,session/ml-sessions
    uv run --frozen --no-sync python -m benchmarks.quality --render-only   # table from the stored results

Each row of the plan is one ordinary ``recsys run --json`` (a fresh process, the candidates chosen by config
as a user would; nothing re-implemented here) in a private folder: ``runs_dir``, ``export.model_repository``
and ``export.model_name`` of its own, ``serving.notify_live_server: false``. From each run's summary (the
leaderboard: validation value that chose the winner, test value with its 95% bootstrap interval, training
time; the baselines' test figures) it builds a table and the issue-23 targets on the MovieLens-layout log:

- ranking: the best deep candidate's test AUC >= logistic regression + 0.02;
- retrieval: the best deep candidate's per-user recall@10 >= EASE's;
- session: the best deep candidate's recall@10 >= 1.1 x co-occurrence's.

Data sets: the embedded synthetic defaults; ``ml-full``, the MovieLens-layout log (``--ml-dir``, default
``/tmp/ml-full``, generated with ``tests/fixtures/make_ml100k.py --full`` when missing) through
``configs/examples/movielens100k.yaml``; ``ml-sessions``, the same log as per-user daily sessions
(``benchmarks/session_movielens.py``). Results: ``benchmarks/results/quality.json`` (written after every
run, merged with earlier results so that ``--only`` refreshes some rows) and the table in
``benchmarks/README.md`` between the ``quality-table`` markers. A failed run is a row naming its error
(and its log file); the others still run.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "benchmarks" / "README.md"
START, END = "<!-- quality-table:start -->", "<!-- quality-table:end -->"
ML_CONFIG = "configs/examples/movielens100k.yaml"
SESSION_CONFIG = "configs/examples/session.yaml"
RANKING_CANDIDATES = "[{type: dlrm}, {type: dcn}, {type: deepfm}, {type: wide_deep}]"
DEEP = {"ranking": ("dlrm", "dcn", "deepfm", "wide_deep"),
        "retrieval": ("two_tower", "youtube_dnn", "mf", "mult_dae", "mult_vae"),
        "session": ("gru", "transformer", "sasrec")}


@dataclass
class RunSpec:
    """One ``recsys run``: ``key`` = family/dataset; ``args`` its --config/--set arguments (``{ml}`` and
    ``{work}`` are filled in); ``prepare`` writes inputs into the run's work folder first."""

    family: str
    dataset: str
    args: list[str]
    prepare: Optional[Callable[[Path, Path], None]] = None  # (work folder, ml dir)

    @property
    def key(self) -> str:
        return f"{self.family}/{self.dataset}"


@dataclass
class Target:
    family: str
    dataset: str
    text: str  # what is required, in words
    reference: str  # the baseline or candidate it is measured against
    factor: float = 1.0  # required: best deep >= factor * reference + offset
    offset: float = 0.0
    deep: Sequence[str] = field(default_factory=tuple)


TARGETS = [
    Target("ranking", "ml-full", "best deep AUC >= logistic regression + 0.02", "logistic_regression",
           offset=0.02, deep=DEEP["ranking"]),
    Target("retrieval", "ml-full", "best deep recall@10 >= EASE", "ease", deep=DEEP["retrieval"]),
    Target("session", "ml-full daily sessions", "best deep recall@10 >= 1.1 x co-occurrence", "cooccurrence",
           factor=1.1, deep=DEEP["session"]),
]


def _ml_sessions(work: Path, ml_dir: Path) -> None:
    from benchmarks.session_movielens import ml_events, write_config

    events = work / "events.parquet"
    ml_events(ml_dir).to_parquet(events, index=False)
    write_config(events, work / "session_ml.yaml")


def plan(quick: bool = False) -> list[RunSpec]:
    """The runs of the full table, or (``quick``) small synthetic runs of each family: a smoke test of the
    whole chain (minutes), not figures to report."""
    if quick:
        small = ["--set", "data.synthetic.n_users=300", "--set", "data.synthetic.n_items=150",
                 "--set", "data.synthetic.n_interactions=6000"]
        return [
            RunSpec("ranking", "synthetic (quick)", small + ["--set", "model.epochs=1",
                                                             "--set", "model.candidates=[{type: dlrm}, {type: dcn}]"]),
            RunSpec("retrieval", "synthetic (quick)", small + ["--set", "task=retrieval",
                                                               "--set", "model.retrieval.epochs=1",
                                                               "--set", "model.autoencoder.epochs=5"]),
            RunSpec("session", "synthetic (quick)", ["--config", SESSION_CONFIG, "--set", "session.model.candidates=auto",
                                                     "--set", "session.synthetic.n_sessions=600",
                                                     "--set", "session.model.epochs=1"]),
        ]
    ml = ["--config", ML_CONFIG, "--set", "data.path={ml}"]
    return [
        RunSpec("ranking", "synthetic", ["--set", f"model.candidates={RANKING_CANDIDATES}"]),
        RunSpec("ranking", "ml-full", ml + ["--set", f"model.candidates={RANKING_CANDIDATES}"]),
        RunSpec("retrieval", "synthetic", ["--set", "task=retrieval"]),
        RunSpec("retrieval", "ml-full", ml + ["--set", "task=retrieval"]),
        RunSpec("session", "synthetic", ["--config", SESSION_CONFIG, "--set", "session.model.candidates=auto"]),
        RunSpec("session", "ml-full daily sessions", ["--config", "{work}/session_ml.yaml"], prepare=_ml_sessions),
    ]


def ensure_ml(ml_dir: Path) -> None:
    """The MovieLens-layout log, generated by the project's fixture script when missing."""
    if (ml_dir / "u.data").exists() and (ml_dir / "u.item").exists() and (ml_dir / "u.user").exists():
        return
    subprocess.run([sys.executable, str(ROOT / "tests" / "fixtures" / "make_ml100k.py"), "--full", str(ml_dir)],
                   check=True, cwd=ROOT)


def _slug(key: str) -> str:
    return "".join(ch if ch.isalnum() else "_" for ch in key).strip("_")


def recsys_command() -> list[str]:
    """The ``recsys`` console script of this interpreter's environment (``python -m`` when absent)."""
    script = Path(sys.executable).parent / "recsys"
    return [str(script)] if script.exists() else [sys.executable, "-c", "from flows.cli import app; app()"]


def run_one(spec: RunSpec, work_root: Path, ml_dir: Path, timeout_s: float) -> dict:
    """Run ``spec`` as a ``recsys run --json`` process; its summary (or the error) and the wall time."""
    work = work_root / _slug(spec.key)
    work.mkdir(parents=True, exist_ok=True)
    log_path = work / "run.log"
    t0 = time.perf_counter()
    try:
        if spec.prepare:
            spec.prepare(work, ml_dir)
        args = [a.replace("{ml}", str(ml_dir)).replace("{work}", str(work)) for a in spec.args]
        name = "q_" + _slug(spec.key)[:40]
        cmd = recsys_command() + ["run", *args, "--set", f"runs_dir={work / 'runs'}", "--set", "run_name=quality",
                                  "--set", f"export.model_repository={work / 'repo'}", "--set",
                                  f"export.model_name={name}", "--set", "serving.notify_live_server=false", "--json"]
        env = {**os.environ, "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS":
               os.environ.get("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "180")}
        with open(log_path, "w") as log:
            proc = subprocess.run(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=log, text=True, timeout=timeout_s,
                                  env=env)
        if proc.returncode != 0:
            raise RuntimeError(f"recsys run exited with {proc.returncode}: {_tail(log_path)}")
        summary = json.loads(proc.stdout[proc.stdout.index("{"):])
        return {"key": spec.key, "family": spec.family, "dataset": spec.dataset, "summary": _keep(summary),
                "seconds": round(time.perf_counter() - t0, 1), "log": str(log_path)}
    except Exception as exc:  # noqa: BLE001 - one failed run is a row of the table, the others still run
        return {"key": spec.key, "family": spec.family, "dataset": spec.dataset, "error": f"{type(exc).__name__}: "
                f"{exc}"[:600], "seconds": round(time.perf_counter() - t0, 1), "log": str(log_path)}


def _tail(path: Path, lines: int = 4) -> str:
    text = [x for x in path.read_text(errors="replace").splitlines() if x.strip()] if path.exists() else []
    return " | ".join(text[-lines:])


def _keep(summary: Mapping[str, Any]) -> dict:
    """The parts of a run summary the table reads (the full summary stays in the run folder)."""
    keys = ("model", "metrics", "metrics_split", "intervals_detail", "baselines", "leaderboard", "selection_metric",
            "split", "stage_seconds", "gate", "served_version", "run_dir", "warnings")
    return {k: summary[k] for k in keys if k in summary}


# --- reading a summary ---------------------------------------------------------------------------------


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def fmt(v: Any, lo: Any = None, hi: Any = None) -> str:
    if not _finite(v):
        return "–"
    return f"{v:.4f}" + (f" [{lo:.4f}, {hi:.4f}]" if _finite(lo) and _finite(hi) else "")


def _metric_variants(metric: str) -> list[str]:
    out = [metric]
    if metric.startswith("user_"):
        out.append(metric[len("user_"):])
    return out + [m.split("@")[0] for m in list(out)]


def baseline_test(summary: Mapping[str, Any], name: str, metric: str) -> tuple[Optional[float], Any, Any]:
    """A baseline's (or a candidate's) test figure ``(value, lo, hi)``: the leaderboard row of that type,
    else the summary's baseline intervals, else its baseline figures."""
    for row in summary.get("leaderboard") or []:
        if row.get("type") == name and _finite(row.get("test_value")):
            return row["test_value"], row.get("test_ci_low"), row.get("test_ci_high")
    detail = (summary.get("intervals_detail") or {}).get(name) or {}
    for m in _metric_variants(metric):
        d = detail.get(m)
        if isinstance(d, Mapping) and _finite(d.get("value")):
            return d["value"], d.get("lo"), d.get("hi")
    plain = (summary.get("baselines") or {}).get(name) or {}
    for m in _metric_variants(metric):
        if _finite(plain.get(m)):
            return plain[m], None, None
    return None, None, None


def candidate_rows(result: Mapping[str, Any]) -> list[dict]:
    """One table row per leaderboard entry of a run (a single-model run: its one model)."""
    base = {"family": result["family"], "dataset": result["dataset"]}
    if "error" in result:
        return [{**base, "candidate": "(run failed)", "validation": "–", "test": "–", "train_s": "–",
                 "winner": f"error: {result['error'][:200]} (log: {result.get('log', '')})"}]
    s = result["summary"]
    board = s.get("leaderboard") or []
    if not board:  # a single-model run: the summary's own figures
        metric = s.get("selection_metric") or next(iter(s.get("metrics") or {}), "")
        value, lo, hi = baseline_test(s, "model", metric)
        board = [{"candidate": s.get("model"), "metric": metric, "test_metric": metric, "value": None,
                  "test_value": value if value is not None else (s.get("metrics") or {}).get(metric),
                  "test_ci_low": lo, "test_ci_high": hi, "winner": True,
                  "train_seconds": next((v for k, v in (s.get("stage_seconds") or {}).items()
                                         if k.startswith("train")), None)}]
    rows = []
    for r in board:
        served = s.get("served_version")
        winner = ("**winner**" + (f", served v{served}" if served else "")) if r.get("winner") else ""
        if r.get("error"):
            winner = f"error: {str(r['error'])[:160]}"
        rows.append({**base, "candidate": str(r.get("candidate")), "metric": r.get("test_metric") or r.get("metric"),
                     "validation": fmt(r.get("value"), r.get("ci_low"), r.get("ci_high")),
                     "test": fmt(r.get("test_value"), r.get("test_ci_low"), r.get("test_ci_high")),
                     "train_s": f"{r['train_seconds']:.1f}" if _finite(r.get("train_seconds")) else "–",
                     "winner": winner})
    return rows


def evaluate_target(t: Target, results: Mapping[str, Mapping[str, Any]]) -> dict:
    """``{target, best, reference, required, measured, status}`` for one target from the stored results."""
    out = {"target": f"{t.family}, {t.dataset}: {t.text}", "best": "–", "reference": "–", "required": "–",
           "status": "not measured"}
    res = results.get(f"{t.family}/{t.dataset}")
    if not res or "error" in res:
        out["status"] = "not measured" + (" (run failed)" if res else "")
        return out
    s = res["summary"]
    board = [r for r in s.get("leaderboard") or [] if r.get("type") in t.deep and _finite(r.get("test_value"))]
    if not board and s.get("model") in t.deep:  # single-model run
        metric = s.get("selection_metric") or ""
        v = baseline_test(s, "model", metric)[0]
        board = [{"type": s["model"], "candidate": s["model"], "test_value": v, "test_metric": metric}] if _finite(v) else []
    if not board:
        out["status"] = "not measured (no deep candidate in the run)"
        return out
    best = max(board, key=lambda r: r["test_value"])
    metric = best.get("test_metric") or s.get("selection_metric") or ""
    ref, lo, hi = baseline_test(s, t.reference, metric)
    out["best"] = f"{best['candidate']} {fmt(best['test_value'], best.get('test_ci_low'), best.get('test_ci_high'))}"
    if ref is None:
        out["status"] = f"not measured ({t.reference} not in the run)"
        return out
    required = t.factor * ref + t.offset
    out["reference"] = f"{t.reference} {fmt(ref, lo, hi)}"
    out["required"] = f"{required:.4f}"
    gap = best["test_value"] - required
    out["status"] = f"**met** (+{gap:.4f})" if gap >= 0 else f"**missed** by {-gap:.4f}"
    return out


# --- the table ---------------------------------------------------------------------------------------


def render(results: Mapping[str, Mapping[str, Any]], order: Sequence[str], meta: Mapping[str, Any]) -> str:
    """The markdown put between the README markers: the candidates table and the targets table."""
    keys = [k for k in order if k in results] + sorted(k for k in results if k not in order)
    lines = [f"Generated by `{meta.get('command', 'make quality')}` on {meta.get('date', '?')} "
             f"({meta.get('machine', '')}; {meta.get('seconds', 0) / 60:.0f} min in all). Validation chose the winner "
             "(its interval where the run computes one); test is reported, 95% bootstrap intervals; train s: the "
             "candidate's training (and its own evaluation) time.", "",
             "| family | data | candidate | metric | validation | test [95% CI] | train s | winner |",
             "|---|---|---|---|---|---|---|---|"]
    for k in keys:
        for r in candidate_rows(results[k]):
            lines.append(f"| {r['family']} | {r['dataset']} | {r['candidate']} | {r.get('metric') or '–'} | "
                         f"{r['validation']} | {r['test']} | {r['train_s']} | {r['winner']} |")
    runs = ", ".join(f"{k} {results[k].get('seconds', 0) / 60:.1f} min" for k in keys)
    lines += ["", f"Wall time per run (whole `recsys run`: data, ETL, every candidate, export, gate, Triton smoke "
              f"test): {runs}.", "", "| target (test split) | best deep candidate | reference | required | result |",
              "|---|---|---|---|---|"]
    for t in TARGETS:
        e = evaluate_target(t, results)
        lines.append(f"| {e['target']} | {e['best']} | {e['reference']} | {e['required']} | {e['status']} |")
    return "\n".join(lines)


def replace_between_markers(text: str, body: str, title: str = "## Quality table (`make quality`)") -> str:
    """``text`` with the part between the quality-table markers replaced by ``body`` (markers and a
    section appended at the end when missing)."""
    if START in text and END in text and text.index(START) < text.index(END):
        head, rest = text.split(START, 1)
        return head + START + "\n" + body + "\n" + END + rest.split(END, 1)[1]
    return text.rstrip("\n") + f"\n\n{title}\n\n{START}\n{body}\n{END}\n"


def load_results(path: Path) -> dict:
    if path.exists():
        try:
            return json.loads(path.read_text()).get("results", {})
        except (json.JSONDecodeError, AttributeError):
            return {}
    return {}


def save(path: Path, results: Mapping[str, Any], meta: Mapping[str, Any]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"meta": dict(meta), "results": dict(results)}, indent=1, default=str))


def write_table(args: argparse.Namespace, results: Mapping[str, Any], meta: Mapping[str, Any]) -> str:
    """Render the table; into the README unless ``--quick`` / ``--no-readme``."""
    body = render(results, [s.key for s in plan(args.quick)], meta)
    if not (args.quick or args.no_readme):
        args.readme.write_text(replace_between_markers(args.readme.read_text(), body))
    return body


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small synthetic runs of each family (a smoke test)")
    p.add_argument("--only", default="", help="comma-separated run keys (family/dataset) of the plan to run")
    p.add_argument("--ml-dir", type=Path, default=Path("/tmp/ml-full"), help="the MovieLens-layout log")
    p.add_argument("--work", type=Path, default=RESULTS / "quality-work", help="run folders and logs")
    p.add_argument("--out", type=Path, default=None, help="results JSON (default benchmarks/results/quality.json; "
                   "--quick: quality-quick.json)")
    p.add_argument("--readme", type=Path, default=README, help="the markdown file whose table is regenerated")
    p.add_argument("--no-readme", action="store_true", help="leave the README alone (--quick does)")
    p.add_argument("--render-only", action="store_true", help="no runs: the table from the stored results")
    p.add_argument("--timeout-s", type=float, default=3600.0, help="per run")
    return p.parse_args(argv)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    specs = plan(args.quick)
    if args.only:
        wanted = {k.strip() for k in args.only.split(",") if k.strip()}
        unknown = wanted - {s.key for s in specs}
        if unknown:
            print(f"--only: unknown run(s) {sorted(unknown)}; the plan has {[s.key for s in specs]}", file=sys.stderr)
            return 2
        specs = [s for s in specs if s.key in wanted]
    out = args.out or RESULTS / ("quality-quick.json" if args.quick else "quality.json")
    results = load_results(out)
    t0 = time.perf_counter()
    meta = {"command": "make quality" + (" ARGS=--quick" if args.quick else ""),
            "date": time.strftime("%Y-%m-%d", time.gmtime()), "machine": f"{os.cpu_count()} CPU cores"}
    if not args.render_only:
        if any("{ml}" in " ".join(s.args) or s.prepare for s in specs):
            ensure_ml(args.ml_dir)
        # the MovieLens-layout runs (the targets) first; the table keeps the plan's order
        for spec in sorted(specs, key=lambda sp: sp.dataset.startswith("synthetic")):
            print(f"[quality] {spec.key} ...", file=sys.stderr, flush=True)
            results[spec.key] = run_one(spec, args.work, args.ml_dir, args.timeout_s)
            r = results[spec.key]
            print(f"[quality] {spec.key}: {'FAILED ' + r['error'] if 'error' in r else 'done'} in "
                  f"{r['seconds']:.0f} s", file=sys.stderr, flush=True)
            meta["seconds"] = sum(v.get("seconds", 0) for v in results.values())
            save(out, results, meta)
            write_table(args, results, meta)  # after every run: a stopped run still leaves its table
    meta["seconds"] = sum(v.get("seconds", 0) for v in results.values())
    print(write_table(args, results, meta))
    print(f"[quality] {len(specs)} run(s) in {(time.perf_counter() - t0) / 60:.1f} min; results {out}",
          file=sys.stderr)
    return 1 if any("error" in results.get(s.key, {}) for s in specs) else 0


if __name__ == "__main__":
    raise SystemExit(main())
