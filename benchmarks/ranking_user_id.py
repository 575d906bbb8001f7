"""Ranking by user id vs full-feature requests, served (issue 25, item 3 for ranking).

A published ranking version whose feature store a run filled (``features.enabled``): one Triton on free ports,
one client per protocol; per batch (1 and 64 items for one stored user) the full-feature request (the pairs' full
rows read from the snapshot) and the user-id request (``user_id`` [1] + ``item_id`` [n]) are checked equal, then
timed (p50/p99); also the store lookup alone in this process (``features/pairs.complete_pairs``: user + items).

    python -m benchmarks.ranking_user_id MODEL_REPOSITORY MODEL [--quick]
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks.topk_bench import _timed, budget


def bench(url: str, protocol: str, model_dir: Path, calls: tuple) -> list[dict]:
    from pipeline_lib.export.ranking import ENSEMBLE_SUBDIR
    from pipeline_lib.features import snapshot
    from pipeline_lib.features.lookup import UserLookup
    from pipeline_lib.features.pairs import complete_pairs
    from pipeline_lib.serving.client import RecsysClient

    version = max(int(p.name) for p in model_dir.iterdir() if p.name.isdigit())
    art, model = model_dir / str(version) / ENSEMBLE_SUBDIR, model_dir.name
    snap = snapshot.Snapshot.load(snapshot.snapshot_dir(art))
    lookup = UserLookup(art, model_dir)
    user = snapshot.stored_users(art, 1)[0]
    n, secs = calls
    out = []
    with RecsysClient(url, protocol, model) as c:
        for batch in (1, 64):
            items = snapshot.stored_items(art, batch)
            full = snapshot.offline_pairs(art, [user] * batch, items)[c.raw_columns]
            by_id, _ = c.predict_user([user], items, snap.user_id, snap.item_id)
            if not np.allclose(by_id, c.predict(full), atol=1e-6):
                raise AssertionError(f"{model}: user-id scores differ from the full-feature scores")
            full_in = c.build_inputs(full)
            id_in = c.inputs_from_arrays({**c.to_arrays(pd.DataFrame({snap.user_id: [user]}), partial=True),
                                          **c.to_arrays(pd.DataFrame({snap.item_id: items}), partial=True)})
            outputs = [c._tc.InferRequestedOutput(c._outputs[0])]
            f = _timed(lambda: c._client.infer(model, full_in, outputs=outputs), n, secs)
            u = _timed(lambda: c._client.infer(model, id_in, outputs=outputs), n, secs)
            request = {snap.user_id: np.array([user]), snap.item_id: np.array(items)}
            missing = [col for col in snap.user_columns + snap.item_columns if col in full.columns]
            look = _timed(lambda: complete_pairs(lookup, dict(request), missing), n, secs)
            out.append({"protocol": protocol, "items": batch, "full_features": f, "user_id": u, "store_lookup": look,
                        "user_id_minus_full_p50_ms": round(u["p50_ms"] - f["p50_ms"], 3)})
    return out


def run(model_repository: Path, model: str, quick: bool = False) -> list[dict]:
    from pipeline_lib.serving.server import TritonServer

    server = TritonServer.on_free_ports(model_repository, log_file=Path("/tmp") / f"ranking_user_id_{model}.log")
    out: list[dict] = []
    with server.start(timeout_s=300, models=[model]):
        for protocol, url in (("grpc", server.grpc_url), ("http", server.http_url)):
            out += bench(url, protocol, model_repository / model, budget(quick))
    return out


def markdown(rows: list[dict]) -> list[str]:
    lines = ["| protocol | items (one user) | full-feature p50 ms (p99) | user-id p50 ms (p99) | difference p50 ms "
             "| store lookup in process p50 ms (p99) |", "|---|---|---|---|---|---|"]
    for r in rows:
        f, u, s = r["full_features"], r["user_id"], r["store_lookup"]
        lines.append(f"| {r['protocol']} | {r['items']} | {f['p50_ms']} ({f['p99_ms']}) | {u['p50_ms']} ({u['p99_ms']}) "
                     f"| {r['user_id_minus_full_p50_ms']} | {s['p50_ms']} ({s['p99_ms']}) |")
    return lines


if __name__ == "__main__":
    import argparse

    p = argparse.ArgumentParser(prog="python -m benchmarks.ranking_user_id", description=__doc__.split("\n")[0])
    p.add_argument("model_repository", type=Path)
    p.add_argument("model")
    p.add_argument("--quick", action="store_true")
    a = p.parse_args()
    res = run(a.model_repository.resolve(), a.model, a.quick)
    print(json.dumps(res, indent=2))
    print("\n".join(markdown(res)))
