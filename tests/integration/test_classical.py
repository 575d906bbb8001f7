"""Classical retrieval models (ease, item_knn) through the whole Prefect flow: trained on the raw split,
exported as a top-k version (kind classical), gated, smoke-tested (served == offline) and published; the
published versions then served by one real Triton, over HTTP and gRPC, with seen items, exclude_item_ids
and an unknown user. The pieces: tests/unit/models/test_classical.py, tests/unit/export/test_classical.py."""
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline_lib.export import topk
from pipeline_lib.export.classical import ClassicalRecommender
from pipeline_lib.serving.client import RecsysClient
from pipeline_lib.serving.server import TritonServer

from tests.conftest import SMALL

pytestmark = pytest.mark.integration

RUNS = {"recsys_ease": {"type": "ease"}, "recsys_knn": {"type": "item_knn", "classical": {"knn_neighbours": 20}}}


@pytest.fixture(scope="module")
def classical_runs(prefect_harness, tmp_path_factory):
    from flows.pipeline import pipeline

    tmp = tmp_path_factory.mktemp("classical")
    repo = tmp / "model_repository"
    summaries = {}
    for name, model in RUNS.items():
        overrides = {**SMALL, "seed": 5, "runs_dir": str(tmp / "runs"), "run_name": name,
                     "model": {**SMALL["model"], **model},
                     "gate": {"require_beat_baseline": name == "recsys_ease"},
                     "export": {**SMALL["export"], "model_repository": str(repo), "model_name": name}}
        summaries[name] = pipeline(overrides=overrides)
    return tmp, repo, summaries


def test_flow_trains_gates_and_publishes_each_classical_model(classical_runs):
    tmp, repo, summaries = classical_runs
    for name, s in summaries.items():
        kind = RUNS[name]["type"]
        assert s["model"] == kind and s["model_version"] == 1 and s["gate"]["promote"], s["gate"]
        assert s["max_abs_diff_served_vs_offline"] <= 1e-5
        m = s["metrics"]
        assert 0.0 < m["user_recall@10"] <= 1.0 and 0.0 < m["user_ndcg@10"] <= 1.0
        # the model under the baselines' protocol is the figure training computed
        assert s["lift"].startswith(f"{kind} (per user, seen items excluded) recall@10 {m['user_recall@10']:.4f}")
        art = repo / name / "1" / topk.TOPK_DIR
        assert json.loads((art / "spec.json").read_text())["kind"] == "classical"
        weights = "weights.npy" if kind == "ease" else "weights.npz"
        assert (art / weights).is_file() and (art / topk.SEEN_FILE).is_file()
        lineage = json.loads((repo / name / "1" / "lineage.json").read_text()) \
            if (repo / name / "1" / "lineage.json").is_file() else None
        if lineage:
            assert lineage["model"]["fingerprint"].startswith("sha256:")
    ease = summaries["recsys_ease"]
    assert ease["baselines"]["ease"] == {"skipped": "this run's model is ease (model.type)"}
    assert "beats the best baseline" in ease["gate"]["reason"]  # most_popular / item_cooccurrence, not itself
    assert "ease" in summaries["recsys_knn"]["baselines"] and "recall@10" in summaries["recsys_knn"]["baselines"]["ease"]


@pytest.fixture(scope="module")
def served(classical_runs):
    tmp, repo, _ = classical_runs
    server = TritonServer.on_free_ports(repo, log_file=tmp / "triton.log")
    with server.start(timeout_s=300, models=list(RUNS)):
        yield server


@pytest.mark.parametrize("name", list(RUNS))
def test_served_classical_top_k_equals_offline_over_http_and_grpc(classical_runs, served, name):
    tmp, repo, summaries = classical_runs
    rec = ClassicalRecommender(repo / name / "1" / topk.TOPK_DIR)
    split = Path(summaries[name]["etl_from"]).parent / "split"
    train = pd.read_parquet(split / "train.parquet")
    seen = train[train["click"] > 0].groupby("user_id")["item_id"].apply(set).to_dict()
    rows = pd.read_parquet(split / "valid.parquet").iloc[10:30][["user_id"]].reset_index(drop=True)
    rows.loc[0, "user_id"] = 987654321  # an unknown user: the most popular items
    want_ids, want_scores = rec.offline(rows)
    np.testing.assert_array_equal(want_ids[0], rec.item_ids[:10])
    more = rows.assign(**{topk.EXCLUDE_INPUT: [list(r[:3]) for r in want_ids.tolist()]})
    want_more = rec.offline(more)
    for url, protocol in ((served.http_url, "http"), (served.grpc_url, "grpc")):
        with RecsysClient(url, protocol, name) as client:
            ids, scores = client.recommend(rows)
            more_ids, more_scores = client.recommend(more)
        np.testing.assert_array_equal(ids, want_ids)
        np.testing.assert_allclose(scores, want_scores, atol=1e-5, rtol=0)
        for user, items in zip(rows["user_id"], ids.tolist()):
            assert not set(items) & seen.get(user, set()), (protocol, user)
        np.testing.assert_array_equal(more_ids, want_more[0])
        np.testing.assert_allclose(more_scores, want_more[1], atol=1e-5, rtol=0)
        for items, dropped, user in zip(more_ids.tolist(), more[topk.EXCLUDE_INPUT], rows["user_id"]):
            assert not set(items) & (set(dropped) | seen.get(user, set()))
        assert more_ids[0].tolist() == rec.item_ids[3:13].tolist()  # unknown user: popular minus the excluded
