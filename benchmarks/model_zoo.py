"""The model table: each requested model trained on one data set, beside the baselines of its family.

    uv run --frozen --no-sync python -m benchmarks.model_zoo --models two_tower,mf,youtube_dnn
    uv run --frozen --no-sync python -m benchmarks.model_zoo --config configs/examples/movielens100k.yaml \\
        --set data.path=/tmp/ml-full --models two_tower,mf,youtube_dnn
    uv run --frozen --no-sync python -m benchmarks.model_zoo --models dlrm --set model.epochs=1

``--config`` (default: the embedded default config) and ``--set key=value`` (repeatable, as for
``recsys run``) give the run config; for each model only ``model.type`` changes. Each model goes
through the pipeline's own stage functions (raw data -> split -> NVTabular ETL -> training) and
:func:`pipeline_lib.models.evaluation.compare_with_baselines` on the same split:

- ranking models: validation AUC / log loss vs ``logistic_regression`` and ``item_click_rate``;
- retrieval models: per-user Recall@k / NDCG@k with the user's training positives excluded
  (``user_recall@k``) vs ``most_popular``, ``item_cooccurrence`` and ``ease`` (docs/evaluation.md).

Writes ``benchmarks/results/models-<dataset>.json`` and ``.md`` (``--dataset``, default:
``synthetic`` or the data path's folder name).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ALL = ["dlrm", "dcn", "deepfm", "wide_deep", "two_tower", "youtube_dnn", "mf", "ease", "item_knn"]


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None, help="run config YAML (default: the embedded default)")
    p.add_argument("--set", dest="set_", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config key, e.g. --set model.epochs=3 (repeatable)")
    p.add_argument("--models", default=",".join(ALL), help=f"comma-separated, from {','.join(ALL)}")
    p.add_argument("--dataset", default=None, help="name in the results file names")
    p.add_argument("--out", type=Path, default=RESULTS, help="results folder")
    p.add_argument("--keep", action="store_true",
                   help="keep the other models' rows of an existing results file (run models one at a time)")
    return p.parse_args(argv)


def dataset_name(cfg) -> str:
    if cfg.data.source == "synthetic":
        return "synthetic"
    path = cfg.data.path or (cfg.data.interactions.path if cfg.data.interactions else "data")
    return Path(str(path).rstrip("/")).name.replace(".", "-") or "data"


def run_model(cfg, kind: str, work: Path, etl_for) -> dict:
    """Train ``kind`` with the run config ``cfg`` (only model.type changed) and compare it with the
    baselines of its family on the same split; one result row."""
    from pipeline_lib.models import classical, evaluation
    from pipeline_lib.models import retrieval
    from pipeline_lib.models import ranking as train

    rcfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"type": kind})})
    mcfg = rcfg.model
    e = etl_for(mcfg.retrieval.history_length if kind == "youtube_dnn" else 0)
    t0 = time.perf_counter()
    if mcfg.scores_history:
        out = classical.train(e.split.train, e.split.valid, cfg.columns, mcfg, work / kind, cfg.seed)
    elif mcfg.is_retrieval:
        out = retrieval.train(e.workflow_dir, e.train_dir, e.split.train, e.split.valid, cfg.columns, mcfg,
                              cfg.seed, work / kind)
    else:
        out = train.train(e.train_dir, e.valid_dir, mcfg, cfg.columns.label, cfg.seed, work / kind)
    seconds = time.perf_counter() - t0
    report = evaluation.compare_with_baselines(rcfg, e.split.train, e.split.test, out, e.workflow_dir,
                                               valid_path=e.split.valid)  # test split, history = train + valid
    m = out.metrics
    return {"model": kind, "family": report.family, "metric": report.metric, "train_seconds": round(seconds, 1),
            "epochs_run": m.get("epochs_run", len((out.history or {}).get("loss", []))),
            "best_epoch": m.get("best_epoch"), "model_metrics": report.model, "baselines": report.baselines,
            "lift": report.lift, "protocol": report.protocol, "split": report.split,
            "intervals": report.intervals, "lift_interval": report.lift_interval}


def _f(v) -> str:
    from pipeline_lib.models.baselines import finite

    return f"{float(v):.4f}" if finite(v) else ""


def markdown(rows: list[dict], title: str) -> str:
    """One table per family: each model's figures, then the baselines on that model's own split
    (models whose ETL differs, e.g. youtube_dnn's history feature, have their own split files)."""
    lines = [f"# {title}", ""]
    for family in ("retrieval", "ranking"):
        fam = [r for r in rows if r["family"] == family]
        if not fam:
            continue
        metric = fam[0]["metric"]
        keys = [metric, metric.replace("recall", "ndcg")] if family == "retrieval" else ["auc", "logloss"]
        names = list(fam[0]["baselines"])
        unit = "per user, seen items excluded" if family == "retrieval" else "validation rows"
        lines += [f"## {family} ({unit})", "",
                  "| model | " + " | ".join(keys) + " | " + " | ".join(f"{n} {metric}" for n in names)
                  + " | train s | epochs run (best) |", "|---" * (len(keys) + len(names) + 3) + "|"]
        for r in fam:
            base = [_f(r["baselines"].get(n, {}).get(metric)) or "skipped" for n in names]
            lines.append(f"| {r['model']} | " + " | ".join(_f(r["model_metrics"].get(k)) for k in keys) + " | "
                         + " | ".join(base) + f" | {r['train_seconds']} | {r['epochs_run']} ({r['best_epoch'] or '-'}) |")
        lines += [""] + [f"- {r['lift']}" for r in fam] + [""]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    from pipeline_lib.data import sources as data
    from pipeline_lib.etl import workflow as etl
    from pipeline_lib.config import load_config, parse_set_options

    cfg = load_config(args.config, parse_set_options(args.set_) or None)
    name = args.dataset or dataset_name(cfg)
    work = Path(tempfile.mkdtemp(prefix="model-zoo-"))
    raw = data.write_raw(cfg.data, cfg.seed, work / "raw", cfg.columns)
    etl_outs: dict[int, etl.EtlOutput] = {}

    def etl_for(hist: int) -> etl.EtlOutput:
        if hist not in etl_outs:
            split = etl.split_raw(raw, cfg.split, cfg.columns, cfg.seed, work / f"split-{hist}", history_length=hist)
            etl_outs[hist] = etl.fit_transform(cfg.columns, cfg.etl, split, work / f"etl-{hist}", history=bool(hist))
        return etl_outs[hist]

    rows = []
    for kind in [m.strip() for m in args.models.split(",") if m.strip()]:
        rows.append(run_model(cfg, kind, work, etl_for))
        print(json.dumps({k: rows[-1][k] for k in ("model", "train_seconds", "model_metrics", "lift")},
                         default=str), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    old = args.out / f"models-{name}.json"
    if args.keep and old.is_file():
        done = {r["model"] for r in rows}
        rows = [r for r in json.loads(old.read_text())["models"] if r["model"] not in done] + rows
    meta = {"dataset": name, "config": args.config, "set": args.set_, "models": rows}
    (args.out / f"models-{name}.json").write_text(json.dumps(meta, indent=2, default=str))
    md = markdown(rows, f"Models on {name} ({args.config or 'embedded default config'}"
                        f"{''.join(' --set ' + s for s in args.set_)})")
    (args.out / f"models-{name}.md").write_text(md)
    print(md)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
