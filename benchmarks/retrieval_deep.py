"""Deep retrieval vs classical on one split (benchmarks/README.md, "Deep retrieval vs classical (session 23)").

    nice -n 5 uv run --frozen --no-sync python -m benchmarks.retrieval_deep \\
        --config configs/examples/movielens100k.yaml --set data.path=/tmp/ml-full

Every variant trains on the same split and ETL output (with the user-history feature, so history-reading
variants share it), is scored on validation (per-user recall@k: what a run chooses on) and on the test split
under the test protocol (the users' history = train + validation positives, scored from and excluded;
:func:`pipeline_lib.models.evaluation.retrieval_report` with ``valid_path``) and, for the root cause, under the
old one (history = train only). Also: EASE refit on train + validation (the refit protocol, for the decision in
docs/evaluation.md). Writes ``benchmarks/results/retrieval-deep-<dataset>.json``.
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, Optional

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"

# name -> (type, retrieval overrides, model overrides)
VARIANTS: dict[str, tuple[str, dict, dict]] = {
    "ease": ("ease", {}, {}),
    "item_knn": ("item_knn", {}, {}),
    "two_tower": ("two_tower", {}, {}),
    "two_tower_nologq": ("two_tower", {"logq_correction": False}, {}),
    "two_tower_hist": ("two_tower", {"query_history": True}, {}),
    "two_tower_hist_nouid": ("two_tower", {"query_history": True, "query_user_id": False}, {}),
    "youtube_dnn": ("youtube_dnn", {}, {}),
    "mult_dae": ("mult_dae", {}, {}),
    "mult_vae": ("mult_vae", {}, {}),
}


def parse_args(argv: Optional[list[str]] = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default=None)
    p.add_argument("--set", dest="set_", action="append", default=[], metavar="KEY=VALUE")
    p.add_argument("--variants", default="ease,item_knn,two_tower,two_tower_hist")
    p.add_argument("--extra", action="append", default=[], metavar="NAME=JSON",
                   help='another variant: NAME={"type": ..., "retrieval": {...}, "model": {...}}')
    p.add_argument("--no-etl", action="store_true", help="only variants that read the raw split (ease, item_knn, "
                   "mult_dae, mult_vae): no NVTabular fit")
    p.add_argument("--out", type=Path, default=RESULTS)
    p.add_argument("--keep", action="store_true", help="keep earlier rows of the results file")
    p.add_argument("--hybrid", default=None, help="ranking model type re-ranking EASE's candidates (e.g. dlrm)")
    p.add_argument("--hybrid-candidates", type=int, default=100)
    return p.parse_args(argv)


def interval(report, method: str, metric: str) -> Optional[dict]:
    iv = (report.intervals.get(method) or {}).get(metric)
    return None if not iv else {k: iv.get(k) for k in ("value", "lo", "hi")}


def hybrid_rows(cfg, e, work: Path, ranker_type: str, n_candidates: int) -> list[dict]:
    """EASE's top-``n_candidates`` re-ranked by a ``ranker_type`` model trained on the ETL output (the exported
    two-stage classical version, per user on the test split: query = the user's first positive test row), and
    the ranker alone over the whole catalogue (every item a candidate)."""
    import pandas as pd

    from pipeline_lib.export import classical as cexport
    from pipeline_lib.export import topk
    from pipeline_lib.models import baselines as bl
    from pipeline_lib.models import classical, intervals
    from pipeline_lib.models import ranking as ranking_model
    from pipeline_lib.models import retrieval

    c, k = cfg.columns, cfg.model.retrieval.k
    t0 = time.perf_counter()
    rcfg = cfg.model.model_copy(update={"type": ranker_type})
    ranker = ranking_model.train(e.train_dir, e.valid_dir, rcfg, c.label, cfg.seed, work / "ranker")
    ranker_s = round(time.perf_counter() - t0, 1)
    ease = classical.train(e.split.train, e.split.valid, c, cfg.model.model_copy(update={"type": "ease"}), work / "ease2")
    train, valid, test = (pd.read_parquet(x) for x in (e.split.train, e.split.valid, e.split.test))
    out = []
    for name, n, split_eval in ((f"ease+{ranker_type}", n_candidates, "both"),
                                (f"{ranker_type} alone (whole catalogue)", None, "test")):
        res = {}
        for which, target, hist in (("valid", valid, None), ("test", test, e.split.valid)):
            if split_eval == "test" and which == "valid":
                continue
            p = bl.TopKProtocol.build(train, target, c.user_id, c.item_id, c.label,
                                      history=pd.read_parquet(hist) if hist is not None else None)
            settings = topk.TopKSettings(c, k=k, ranker_dir=ranker.model_dir, candidates=n or len(p.item_ids),
                                         exclude_seen=True)
            rows = retrieval.first_positive_rows(target, c.label, c.user_id, p.users)
            exp = cexport.export_classical(ease.model_dir, e.split.train, rows.head(4), settings,
                                           work / f"staging-{which}", "hybrid", workflow_dir=e.workflow_dir,
                                           raw_history=hist)
            rec = exp.open(cexport.ClassicalRecommender)
            ids, _ = rec.recommend(rows[rec.request_columns])
            m = bl.topk_metrics(ids.tolist(), p.relevant, k, units=True)
            iv = intervals.interval(intervals.MeanUnits(m["units"][f"recall@{k}"]), n_resamples=cfg.evaluation.bootstrap_resamples, seed=cfg.seed)
            res[which] = {"value": iv.value, "lo": iv.lo, "hi": iv.hi}
        row = {"variant": name, "type": "two-stage", "candidates": n, "ranker_train_seconds": ranker_s,
               "ranker_valid_auc": ranker.metrics.get("auc"), "valid": (res.get("valid") or {}).get("value"),
               "test": res["test"]}
        print(json.dumps(row, default=str), flush=True)
        out.append(row)
    return out


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    import pandas as pd

    from pipeline_lib.config import CandidateSpec, candidate_config, load_config, parse_set_options
    from pipeline_lib.data import sources as data
    from pipeline_lib.etl import workflow as etl
    from pipeline_lib.models import baselines as bl
    from pipeline_lib.models import classical, evaluation, retrieval

    overrides = parse_set_options(["task=retrieval"] + args.set_)
    cfg = load_config(args.config, overrides)
    variants = dict(VARIANTS)
    for e in args.extra:
        name, spec = e.split("=", 1)
        d = json.loads(spec)
        variants[name] = (d["type"], d.get("retrieval", {}), d.get("model", {}))
    names = [v.strip() for v in args.variants.split(",") if v.strip()] + [e.split("=", 1)[0] for e in args.extra]
    work = Path(tempfile.mkdtemp(prefix="retrieval-deep-"))
    raw = data.write_raw(cfg.data, cfg.seed, work / "raw", cfg.columns)
    hist = cfg.model.retrieval.history_length
    split = etl.split_raw(raw, cfg.split, cfg.columns, cfg.seed, work / "split", history_length=hist)
    e: Any = (SimpleNamespace(split=split, workflow_dir=None, train_dir=None, valid_dir=None)
              if args.no_etl else etl.fit_transform(cfg.columns, cfg.etl, split, work / "etl", history=True))
    k, c = cfg.model.retrieval.k, cfg.columns
    metric = f"recall@{k}"
    rows = []
    for name in names:
        kind, rover, mover = variants[name]
        # validated, nested overrides merged (e.g. {"autoencoder": {"dropout": 0.2}})
        mcfg = candidate_config(cfg.model, CandidateSpec(type=kind, overrides={**mover, "retrieval": rover}))
        rcfg = cfg.model_copy(update={"model": mcfg})
        t0 = time.perf_counter()
        if mcfg.scores_history:
            out = classical.train(e.split.train, e.split.valid, c, mcfg, work / name, cfg.seed)
        else:
            out = retrieval.train(e.workflow_dir, e.train_dir, e.split.train, e.split.valid, c, mcfg, cfg.seed,
                                  work / name)
        seconds = round(time.perf_counter() - t0, 1)
        assert e.split.test is not None
        old = evaluation.retrieval_report(rcfg, e.split.train, e.split.test, dict(out.metrics), out.model_dir,
                                          e.workflow_dir)
        new = evaluation.retrieval_report(rcfg, e.split.train, e.split.test, dict(out.metrics), out.model_dir,
                                          e.workflow_dir, valid_path=e.split.valid)
        row = {"variant": name, "type": kind, "retrieval": rover, "model": mover, "train_seconds": seconds,
               "epochs_run": out.metrics.get("epochs_run"), "best_epoch": out.metrics.get("best_epoch"),
               "valid": out.metrics.get(f"user_recall@{k}"),
               "test": interval(new, "model", metric), "test_old_protocol": interval(old, "model", metric),
               "baselines_test": {n: interval(new, n, metric) for n in new.baselines if interval(new, n, metric)},
               "baselines_test_old": {n: interval(old, n, metric) for n in old.baselines if interval(old, n, metric)},
               "protocol": new.protocol}
        rows.append(row)
        print(json.dumps({x: row[x] for x in ("variant", "train_seconds", "best_epoch", "valid", "test",
                                                "test_old_protocol")}), flush=True)
    if args.hybrid:  # two-stage: EASE's candidates re-ranked by a ranking model, vs each part alone
        rows += hybrid_rows(cfg, e, work, args.hybrid, args.hybrid_candidates)
    # the refit protocol's data point: EASE fitted on train + validation, same test users and history
    train, valid, test = (pd.read_parquet(p) for p in (e.split.train, e.split.valid, e.split.test))
    both = pd.concat([train, valid], ignore_index=True)
    p = bl.TopKProtocol.build(both, test, c.user_id, c.item_id, c.label)
    w = classical.fit_weights(p.full_train_matrix, "ease", cfg.model.classical)
    refit = p.evaluate_scores(classical.protocol_scorer(w), k)
    rows.append({"variant": "ease_refit_train_valid", "type": "ease", "valid": None,
                 "test": {"value": refit[metric]}, "protocol": p.stats})
    print(json.dumps(rows[-1], default=str), flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"retrieval-deep-{Path(str(cfg.data.path or 'synthetic')).name}.json"
    if args.keep and path.is_file():
        done = {r["variant"] for r in rows}
        rows = [r for r in json.loads(path.read_text())["rows"] if r["variant"] not in done] + rows
    path.write_text(json.dumps({"config": args.config, "set": args.set_, "rows": rows}, indent=2, default=str))
    print(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
