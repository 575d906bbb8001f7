"""The model table: every model type trained on the default synthetic data, with its metrics.

    uv run --frozen --no-sync python -m benchmarks.model_zoo            # all seven (~15 min on 2 cores)
    uv run --frozen --no-sync python -m benchmarks.model_zoo --models mf,two_tower --epochs 1

Ranking models (DLRM, DCN-v2, DeepFM, Wide&Deep): AUC and logloss on the held-out split.
Retrieval models (two-tower, YouTube DNN, MF): Recall/Precision/NDCG/MRR@k of the held-out
positive interactions against the whole item catalogue (exact top-k). Each uses the pipeline's
own stage functions and the config defaults (configs/default.yaml) apart from ``model.type``.
Writes ``benchmarks/results/models.json`` and ``models.md``.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
ALL = ["dlrm", "dcn", "deepfm", "wide_deep", "two_tower", "youtube_dnn", "mf"]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default=",".join(ALL))
    p.add_argument("--epochs", type=int, default=None, help="default: the config's (2)")
    args = p.parse_args(argv)

    from pipeline_lib import data, etl, retrieval, train
    from pipeline_lib.config import RunConfig

    cfg = RunConfig()
    work = Path(tempfile.mkdtemp(prefix="model-zoo-"))
    raw = data.write_raw(cfg.data, cfg.seed, work / "raw", cfg.columns)
    etl_outs: dict[int, etl.EtlOutput] = {}

    def etl_for(hist: int) -> etl.EtlOutput:
        if hist not in etl_outs:
            split = etl.split_raw(raw, cfg.split, cfg.columns, cfg.seed, work / f"split-{hist}", history_length=hist)
            etl_outs[hist] = etl.fit_transform(cfg.columns, cfg.etl, split, work / f"etl-{hist}", history=bool(hist))
        return etl_outs[hist]

    rows = []
    for kind in args.models.split(","):
        update = {"type": kind} | ({"epochs": args.epochs} if args.epochs else {})
        mcfg = cfg.model.model_copy(update=update)
        hist = mcfg.retrieval.history_length if kind == "youtube_dnn" else 0
        e = etl_for(hist)
        t0 = time.perf_counter()
        if mcfg.is_retrieval:
            out = retrieval.train(e.workflow_dir, e.train_dir, e.split.train, e.split.valid, cfg.columns, mcfg,
                                  cfg.seed, work / kind)
        else:
            out = train.train(e.train_dir, e.valid_dir, mcfg, cfg.columns.label, cfg.seed, work / kind)
        m = out.metrics
        rows.append({"model": kind, "task": "retrieval" if mcfg.is_retrieval else "ranking",
                     "train_seconds": round(time.perf_counter() - t0, 1),
                     **{k: m.get(k) for k in ("auc", "logloss", "recall", "precision", "ndcg", "mrr", "k")}})
        print(json.dumps(rows[-1]), flush=True)

    if any(r["task"] == "retrieval" for r in rows):
        rows.append(popularity_baseline(etl_for(0), cfg))
        print(json.dumps(rows[-1]), flush=True)

    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "models.json").write_text(json.dumps(rows, indent=2))
    k = cfg.model.retrieval.k
    fmt = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
    lines = [f"| model | task | AUC | logloss | Recall@{k} | Precision@{k} | NDCG@{k} | MRR@{k} | train s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['task']} | {fmt(r['auc'])} | {fmt(r['logloss'])} | {fmt(r['recall'])} | "
                     f"{fmt(r['precision'])} | {fmt(r['ndcg'])} | {fmt(r['mrr'])} | {r['train_seconds']} |")
    (RESULTS / "models.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


def popularity_baseline(e, cfg) -> dict:
    """Reference for the retrieval rows: every user gets the items most clicked in training."""
    import numpy as np
    import pandas as pd

    from pipeline_lib.retrieval import retrieval_metrics

    label, item = cfg.columns.label, cfg.columns.item_id
    train_raw, valid_raw = pd.read_parquet(e.split.train), pd.read_parquet(e.split.valid)
    counts = train_raw[train_raw[label] == 1][item].value_counts()
    items = train_raw[item].drop_duplicates().sort_values().to_numpy()
    pop = counts.reindex(items).fillna(0).to_numpy(dtype=np.float32)
    targets = valid_raw[valid_raw[label] == 1][item].to_numpy()
    m = retrieval_metrics(np.tile(pop, (len(targets), 1)), items, targets, cfg.model.retrieval.k)
    return {"model": "most_popular (baseline)", "task": "retrieval", "train_seconds": 0.0,
            **{k: m.get(k) for k in ("auc", "logloss", "recall", "precision", "ndcg", "mrr", "k")}}


if __name__ == "__main__":
    raise SystemExit(main())
