"""The session model vs its baselines on a realistic ratings log grouped into per-user daily sessions.

    python tests/fixtures/make_ml100k.py --full /tmp/ml-full
    uv run --frozen --no-sync python -m benchmarks.session_movielens /tmp/ml-full --out /tmp/ml-sessions
    uv run --frozen --no-sync python -m benchmarks.session_movielens /tmp/ml-full --set session.model.epochs=5

``u.data`` (user, item, rating, timestamp) becomes an event log: one session per user and UTC day
(``session_id`` = user * 100000 + day), the item's first genre as ``item_category``. The script
writes ``events.parquet`` and ``session_ml.yaml`` (``task: session``, ``data.source: parquet``,
time split) into ``--out``, then runs the pipeline's own stages (raw -> session ETL -> train and
evaluate: the model and the most-popular / co-occurrence baselines under the same protocol) and
prints the metrics. ``--set a.b.c=value`` overrides the config (repeatable). ``--test`` also scores
the model and every baseline on the test split with 95% intervals (what a run reports; validation is
what candidates are chosen on); ``--config configs/examples/session.yaml`` measures another session log
instead (the embedded Markov + intent generator); ``--reuse-etl`` skips the ETL of an earlier call.
Figures: benchmarks/README.md, "Deep session models vs classical (session 23)".
"""
from __future__ import annotations

import argparse
import json
import os
import pickle
import time
from pathlib import Path

import pandas as pd
from pipeline_lib.data import sessions as session_data

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def ml_events(ml_dir: Path) -> pd.DataFrame:
    """u.data + u.item -> one row per rating: session_id (user x day), item_id, timestamp, item_category."""
    ratings = pd.read_csv(ml_dir / "u.data", sep="\t", names=["user_id", "item_id", "rating", "timestamp"])
    items = pd.read_csv(ml_dir / "u.item", sep="|", header=None, encoding="latin-1")
    flags = items.iloc[:, 5:].to_numpy()
    genre = pd.Series(flags.argmax(axis=1) + 1, index=items[0].to_numpy(), name="item_category")
    day = ratings["timestamp"] // 86_400
    out = pd.DataFrame({"session_id": ratings["user_id"].astype("int64") * 100_000 + (day - day.min()),
                        "item_id": ratings["item_id"].astype("int64"), "timestamp": ratings["timestamp"].astype("int64")})
    out["item_category"] = genre.reindex(out["item_id"]).fillna(0).astype("int64").to_numpy()
    return out.sort_values(["timestamp", "session_id"], kind="stable").reset_index(drop=True)


def write_config(events: Path, path: Path) -> dict:
    cfg = {"task": "session", "data": {"source": "parquet", "path": str(events)},
           "split": {"method": "time", "valid_fraction": 0.2}, "export": {"model_name": "recsys_session_ml"}}
    import yaml

    path.write_text(yaml.safe_dump(cfg, sort_keys=False))
    return cfg


def _set(over: dict, dotted: str) -> None:
    import yaml

    key, value = dotted.split("=", 1)
    *parents, leaf = key.split(".")
    node = over
    for p in parents:
        node = node.setdefault(p, {})
    node[leaf] = yaml.safe_load(value)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ml_dir", type=Path, nargs="?", help="the MovieLens-layout folder (u.data, u.item)")
    p.add_argument("--config", type=Path, default=None, help="a session config of its own instead of ml_dir's "
                   "daily sessions (e.g. configs/examples/session.yaml: the embedded Markov + intent generator)")
    p.add_argument("--out", type=Path, default=Path("/tmp/ml-sessions"))
    p.add_argument("--set", action="append", default=[], help="config override a.b.c=value (repeatable)")
    p.add_argument("--test", action="store_true", help="also score every method on the test split, with 95%% "
                   "intervals (the figures a run reports); validation figures are the candidates' choice")
    p.add_argument("--reuse-etl", action="store_true", help="reuse --out's ETL output from an earlier call with the "
                   "same data/split/etl settings (model options only differ)")
    args = p.parse_args(argv)

    from pipeline_lib.models import session as session_model
    from pipeline_lib.etl import sessions
    from pipeline_lib.config import load_config
    from pipeline_lib.models import evaluation, session_classical

    args.out.mkdir(parents=True, exist_ok=True)
    if args.config is None:
        if args.ml_dir is None:
            p.error("give ml_dir or --config")
        events = args.out / "events.parquet"
        ml_events(args.ml_dir).to_parquet(events, index=False)
        write_config(events, args.out / "session_ml.yaml")
    over: dict = {}
    for s in args.set:
        _set(over, s)
    cfg = load_config(str(args.config or args.out / "session_ml.yaml"), over)
    run = args.out / "run"
    etl_pickle = run / "etl_out.pkl"
    if args.reuse_etl and etl_pickle.is_file():
        etl_out = pickle.loads(etl_pickle.read_bytes())
    else:
        raw = session_data.write_raw_events(cfg.data, cfg.session, cfg.seed, run / "raw")
        etl_out = sessions.run_session_etl(raw, cfg, run / "transformed", run / "split")
        etl_pickle.write_bytes(pickle.dumps(etl_out))
    t0 = time.perf_counter()
    s = cfg.session
    train_raw = pd.read_parquet(etl_out.split.train)
    out = session_model.train_and_evaluate(etl_out, cfg, run / "model", lambda held_out: (
        session_classical.baseline_metrics(train_raw, held_out, s.model.classical, s.columns, s.top_k,
                                           s.exclude_seen)))
    train_s = time.perf_counter() - t0
    m, k = out.metrics, cfg.session.top_k
    valid = {m["model"]: m, **m["baselines"]}
    rows = [{"method": n, **{f"valid {x}": round(v[f"{x}@{k}"], 4) for x in ("recall", "ndcg")}}
            for n, v in valid.items()]
    if args.test:
        rep = evaluation.compare_with_baselines(cfg, etl_out.split.train, etl_out.split.test, out,
                                                etl_out.workflow_dir, etl_out.train_dir)
        for r in rows:
            key = "model" if r["method"] == m["model"] else r["method"]
            vals = rep.model if key == "model" else rep.baselines.get(key, {})
            r[f"test recall@{k}"] = round(vals.get(f"recall@{k}", float("nan")), 4)
            r["95% CI"] = rep.interval_text(key, f"recall@{k}")
        print(rep.lift)
    print(pd.DataFrame(rows).to_string(index=False))
    print(json.dumps({"overrides": over, "n_train": m["n_train"], "n_valid": m["n_valid"], "n_items": m["n_items"],
                      "exclude_seen": m.get("exclude_seen"), "train_seconds": round(train_s, 1),
                      "epochs_run": m.get("epochs_run"), "best_epoch": m.get("best_epoch"),
                      "val_recall": [round(x, 4) for x in out.history.get("val_recall", [])],
                      "final_loss": out.history.get("loss", [None])[-1]}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
