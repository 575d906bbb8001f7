"""User-id requests against full-feature requests, both served (issue 25, item 4): the ``user_id`` section of
``make bench``, one table for every family measured.

- top-k (two-stage): the top-k section's two-stage version, whose flow's ``features`` stage filled its store; it
  is measured on the top-k section's own server (:func:`topk`, called by ``topk_bench.bench``) and reported here
  (``make bench ARGS="--with topk"``);
- ranking: the serving section's model, made a user-id version here (:func:`ranking_version`: a feature snapshot
  of its training split, ``user_id`` + ``item_id`` required in its config, a SQLite Feast store materialized, as a
  ranking run's ``features`` stage does), served by one Triton on free ports (:func:`ranking`).

Per protocol (gRPC, HTTP) and batch (1 and 64 users; a ranking request: 1 and 64 items for one stored user), one
client: the user-id answer is checked equal to the full-feature answer for the same users (rows read from the
snapshot, i.e. the training data) first, then both are timed (p50/p99), and the served model's store lookup
alone in this process (and, top-k, Feast's ``get_online_features`` for the same users).

One published version whose store a run filled (top-k or ranking, told apart by its files), alone:

    uv run --frozen --no-sync python -m benchmarks.user_id MODEL_REPOSITORY MODEL [--quick]
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.latency import budget, timed

RANKING_MODEL = "recsys_uid"  # the ranking user-id version the section serves


def versus(c, full_in: list, id_in: list, outputs: list, calls: tuple) -> dict:
    """The full-feature and the user-id request timed one after the other on client ``c`` (a RecsysClient)."""
    n, secs = calls
    f = timed(lambda: c._client.infer(c.model_name, full_in, outputs=outputs), n, secs)
    u = timed(lambda: c._client.infer(c.model_name, id_in, outputs=outputs), n, secs)
    return {"full_features": f, "user_id": u, "user_id_minus_full_p50_ms": round(u["p50_ms"] - f["p50_ms"], 3)}


def _latest(model_dir: Path) -> int:
    return max(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())


def _online_store(model_dir: Path) -> str | None:
    from pipeline_lib.features.store import read_pointer

    s = read_pointer(model_dir)
    return s.online_store if s else None


def topk(url: str, protocol: str, model_dir: Path, calls: tuple = budget(), family: str = "two_stage") -> list[dict]:
    """A top-k version: user-id requests (features + history from the store) against full-feature requests for the
    same stored users, batch 1 and 64; also the served lookup alone (:class:`UserLookup`, in this process) and
    Feast's ``get_online_features`` for the same users."""
    from pipeline_lib.export.topk import TOPK_DIR
    from pipeline_lib.features import snapshot
    from pipeline_lib.features.lookup import UserLookup
    from pipeline_lib.features.store import SNAPSHOT_FIELD, USER_VIEW
    from pipeline_lib.serving.client import RecsysClient

    art = model_dir / str(_latest(model_dir)) / TOPK_DIR
    snap = snapshot.Snapshot.load(snapshot.snapshot_dir(art))
    lookup = UserLookup(art, model_dir)
    refs = [f"{USER_VIEW}:{c}" for c in snap.user_columns + [SNAPSHOT_FIELD]]  # what the lookup reads
    n, secs = calls
    out = []
    with RecsysClient(url, protocol, model_dir.name) as c:
        for batch in (1, 64):
            users = snapshot.stored_users(art, batch)
            full = snapshot.offline_rows(art, users)[[col for col in c.raw_columns if col != "exclude_item_ids"]]
            if not np.array_equal(c.recommend_user(users, snap.user_id)[0], c.recommend(full)[0]):
                raise AssertionError(f"{model_dir.name}: user-id top-k differs from the full-feature top-k")
            outputs = [c._tc.InferRequestedOutput(x) for x in ("item_ids", "scores")]
            id_in = c.inputs_from_arrays(c.to_arrays(pd.DataFrame({snap.user_id: users}), partial=True))
            ids, rows = np.asarray(users), [{snap.user_id: v} for v in users]
            out.append({"family": family, "protocol": protocol, "batch": batch,
                        **versus(c, c.build_inputs(full), id_in, outputs, calls),
                        "store_lookup": timed(lambda: lookup.fetch(ids), n, secs),
                        "feast_get_online_features": timed(lambda: lookup.store.get_online_features(
                            features=refs, entity_rows=rows).to_dict(), n, secs),
                        "online_store": _online_store(model_dir)})
    return out


def ranking(url: str, protocol: str, model_dir: Path, calls: tuple = budget()) -> list[dict]:
    """A ranking version: per batch (1 and 64 items for one stored user) the full-feature request (the pairs' full
    rows read from the snapshot) and the user-id request (``user_id`` [1] + ``item_id`` [n]), checked equal, then
    timed; also the served lookup alone (``features/pairs.complete_pairs``: the user + the items, in this process)."""
    from pipeline_lib.export.ranking import ENSEMBLE_SUBDIR
    from pipeline_lib.features import snapshot
    from pipeline_lib.features.lookup import UserLookup
    from pipeline_lib.features.pairs import complete_pairs
    from pipeline_lib.serving.client import RecsysClient

    art = model_dir / str(_latest(model_dir)) / ENSEMBLE_SUBDIR
    snap = snapshot.Snapshot.load(snapshot.snapshot_dir(art))
    lookup = UserLookup(art, model_dir)
    user = snapshot.stored_users(art, 1)[0]
    n, secs = calls
    out = []
    with RecsysClient(url, protocol, model_dir.name) as c:
        for batch in (1, 64):
            items = snapshot.stored_items(art, batch)
            full = snapshot.offline_pairs(art, [user] * batch, items)[c.raw_columns]
            by_id, _ = c.predict_user([user], items, snap.user_id, snap.item_id)
            if not np.allclose(by_id, c.predict(full), atol=1e-6):
                raise AssertionError(f"{model_dir.name}: user-id scores differ from the full-feature scores")
            id_in = c.inputs_from_arrays({**c.to_arrays(pd.DataFrame({snap.user_id: [user]}), partial=True),
                                          **c.to_arrays(pd.DataFrame({snap.item_id: items}), partial=True)})
            request = {snap.user_id: np.array([user]), snap.item_id: np.array(items)}
            missing = [col for col in snap.user_columns + snap.item_columns if col in full.columns]
            out.append({"family": "ranking", "protocol": protocol, "batch": batch,
                        **versus(c, c.build_inputs(full), id_in, [c._tc.InferRequestedOutput(c._outputs[0])], calls),
                        "store_lookup": timed(lambda: complete_pairs(lookup, dict(request), missing), n, secs),
                        "feast_get_online_features": None, "online_store": _online_store(model_dir)})
    return out


def measure(url: str, protocol: str, model_dir: Path, calls: tuple = budget()) -> list[dict]:
    """:func:`topk` or :func:`ranking`, by the published version's files."""
    from pipeline_lib.export.topk import TOPK_DIR

    if (model_dir / str(_latest(model_dir)) / TOPK_DIR).is_dir():
        return topk(url, protocol, model_dir, calls, family="top-k")
    return ranking(url, protocol, model_dir, calls)


def served(model_repository: Path, model: str, calls: tuple, log_file: Path) -> list[dict]:
    """:func:`measure` of ``model`` on a Triton over ``model_repository`` on free ports, gRPC then HTTP."""
    from pipeline_lib.serving.server import TritonServer

    server = TritonServer.on_free_ports(model_repository, log_file=log_file)
    out: list[dict] = []
    with server.start(timeout_s=300, models=[model]):
        for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
            out += measure(url, protocol, model_repository / model, calls)
    return out


def ranking_version(serving_work: Path, work: Path) -> Path:
    """The serving section's published ranking version (``serving_bench.load_prepared``) as a user-id version
    ``RANKING_MODEL`` in ``work/model_repository``: a snapshot of the training split its model came from (the
    default columns), user-id requests in its config, its SQLite Feast store materialized; -> the repository."""
    from pipeline_lib.config import ColumnsConfig
    from pipeline_lib.export.ranking import ENSEMBLE_SUBDIR
    from pipeline_lib.features import snapshot, store
    from pipeline_lib.features.serving import allow_user_id_requests
    from pipeline_lib.serving import repository

    from benchmarks import serving_bench

    sm = serving_bench.load_prepared(serving_work)
    if sm is None:
        raise RuntimeError(f"no model prepared in {serving_work}: the ranking part of the user_id section serves "
                           "the serving section's model (do not --skip serving)")
    cols = ColumnsConfig()
    vdir = work / "staged" / "1"
    shutil.rmtree(work, ignore_errors=True)
    shutil.copytree(sm.repo / serving_bench.MODEL / str(sm.version), vdir)
    train = Path(sm.source.raw_rows).with_name("train.parquet")  # the split beside the validation rows
    items = [cols.item_id] + [f.name for f in cols.features if f.side.value == "item"]
    snapshot.write_snapshot(vdir / ENSEMBLE_SUBDIR, pd.read_parquet(train if train.is_file() else sm.source.raw_rows),
                            [c for c in cols.serving_columns if c not in items], items, cols, None, 0)
    config = vdir / repository.VERSION_CONFIG
    allow_user_id_requests(config, cols.user_id, (cols.item_id,))
    config.write_text(config.read_text().replace(f'name: "{serving_bench.MODEL}"', f'name: "{RANKING_MODEL}"', 1))
    repo = work / "model_repository"
    version, _ = repository.publish(vdir, config, repo, RANKING_MODEL)
    repository.promote(repo, RANKING_MODEL, version)
    settings = store.StoreSettings((work / "feature_store" / RANKING_MODEL).resolve())
    store.materialize(settings, repo / RANKING_MODEL / str(version) / ENSEMBLE_SUBDIR, version)
    store.write_pointer(repo / RANKING_MODEL, settings)
    return repo


def section(topk_rows: list[dict] | None, serving_work: Path, work: Path, calls: tuple) -> dict:
    """The section: ``topk_rows`` (measured by the top-k section, None when it did not run) and the ranking
    version built from the serving section's model, served here (none when the serving section did not run)."""
    from benchmarks import serving_bench

    rows = list(topk_rows or [])
    if serving_bench.load_prepared(serving_work) is not None:
        repo = ranking_version(serving_work, work)
        rows += served(repo, RANKING_MODEL, calls, work / "triton.log")
    return {"rows": rows, "topk_measured": topk_rows is not None, "ranking_measured": len(rows) > len(topk_rows or [])}


def markdown(r: dict) -> list[str]:
    """One table, every family."""
    lines = ["User-id requests (the served model reads the feature store: features, history, item features) against "
             "full-feature requests for the same users, both served, one client, answers checked equal first. "
             "Top-k: the top-k section's two-stage version (batch = users); ranking: the serving section's model as "
             "a user-id version (batch = items for one user). Served lookup = the served model's store read alone, "
             "in this process (SQLite read directly; Redis through Feast).", ""]
    if not r.get("topk_measured"):
        lines += ["(No top-k rows: the top-k section did not run; `--with topk` adds them.)", ""]
    if not r.get("ranking_measured"):
        lines += ["(No ranking rows: the serving section, whose model they serve, did not run.)", ""]
    lines += ["| family | protocol | batch | full-feature p50 ms (p99) | user-id p50 ms (p99) | difference p50 ms "
              "| served lookup p50 ms (p99) | Feast get_online_features p50 ms (p99) | online store |",
              "|---|---|---|---|---|---|---|---|---|"]
    for x in r["rows"]:
        f, u, s = x["full_features"], x["user_id"], x["store_lookup"]
        g = x.get("feast_get_online_features")
        feast = f"{g['p50_ms']} ({g['p99_ms']})" if g else "–"
        lines.append(f"| {x['family']} | {x['protocol']} | {x['batch']} | {f['p50_ms']} ({f['p99_ms']}) "
                     f"| {u['p50_ms']} ({u['p99_ms']}) | {x['user_id_minus_full_p50_ms']} "
                     f"| {s['p50_ms']} ({s['p99_ms']}) | {feast} | {x['online_store']} |")
    return lines


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks.user_id", description=__doc__.split("\n")[0])
    p.add_argument("model_repository", type=Path)
    p.add_argument("model")
    p.add_argument("--quick", action="store_true", help="fewer calls per timed point")
    a = p.parse_args()
    repo = a.model_repository.resolve()
    res = served(repo, a.model, budget(a.quick), Path("/tmp") / f"user_id_{a.model}.log")
    print(json.dumps(res, indent=2))
    print("\n".join(markdown({"rows": res, "topk_measured": True})))
