"""A classical session model (session.model.type: sequential_rules / session_knn) through the whole session
flow -- train, export, gate, served smoke test, publish -- and its published version served by a real
Triton over HTTP and gRPC like offline, with the session's own items and exclude_item_ids excluded.
Real NVTabular (the session ETL), Prefect and tritonserver; small data."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from pipeline_lib.config import SessionColumns
from pipeline_lib.etl import sessions
from tests.support import ROOT

pytestmark = pytest.mark.integration

COLS = SessionColumns()


@pytest.fixture(scope="module")
def classical_run(prefect_harness, tmp_path_factory):
    """One flow run of ``sequential_rules`` on the embedded session generator; returns (tmp, summary, repo)."""
    from flows.pipeline import pipeline

    tmp = tmp_path_factory.mktemp("session_classical")
    repo = tmp / "repo"
    # seed 7: other data than test_sessions.py's runs, so the cached ETL of one never stands in for the other's
    over = {"seed": 7, "runs_dir": str(tmp / "runs"), "run_name": "sr",
            "export": {"model_repository": str(repo), "parity_rows": 32, "model_name": "recsys_sr"},
            "serving": {"notify_live_server": False}, "gate": {"require_beat_baseline": False},
            "session": {"synthetic": {"n_sessions": 1500, "n_items": 150, "n_categories": 8},
                        "model": {"type": "sequential_rules"}}}
    summary = pipeline(config_path=str(ROOT / "configs" / "examples" / "session.yaml"), overrides=over)
    return tmp, summary, repo


@pytest.mark.integration
def test_a_classical_session_run_is_gated_served_like_offline_and_published(classical_run):
    tmp, summary, repo = classical_run
    run = tmp / "runs" / "sr"
    assert summary["task"] == "session" and summary["model"] == "sequential_rules"
    assert "serving-smoke-test" in summary["stage_seconds"], (summary["gate"], summary["stage_seconds"])
    # the same baselines as a deep run, on the same held-out prefixes, plus the other classical type
    assert set(summary["baselines"]) == {"most_popular", "cooccurrence", "session_knn"}
    m = summary["metrics"]
    assert m["recall@10"] > summary["baselines"]["most_popular"]["recall@10"] + 0.1, summary["baselines"]
    # first-order Markov data: SR and the last-item transitions are within noise (the requirement is off)
    assert summary["gate"]["promote"] and summary["model_version"] == 1, summary["gate"]
    assert summary["served_topk_equals_offline"] and summary["max_abs_diff_served_vs_offline"] <= 1e-5
    preds = summary["predictions"]
    for proto in ("served_http", "served_grpc"):
        assert [list(x) for x in preds[proto]] == [list(x) for x in preds["offline"]]
    saved = json.loads((run / "model" / "metrics.json").read_text())
    assert saved["metrics"]["model"] == "sequential_rules" and saved["metrics"]["n_train"] > 1000
    assert (run / "model" / "model" / "matrix.npz").exists()  # the sparse rules, no SavedModel
    version = repo / "recsys_sr" / "1"
    spec = json.loads((version / "topk" / "spec.json").read_text())
    assert spec["kind"] == "session_classical" and spec["request_columns"] == ["item_id"]
    assert not (version / "topk" / "workflow").exists()  # numpy scoring of raw ids: no feature workflow


@pytest.mark.integration
def test_classical_versions_are_served_like_offline_with_exclusions(classical_run, tmp_path):
    """The published sequential_rules version and a session_knn version with string item ids (exported
    directly), both on one real Triton: served top-k == offline over HTTP and gRPC, the session's own items
    and the request's exclude_item_ids never returned; unknown ids ignored."""
    from pipeline_lib.config import SessionClassicalConfig
    from pipeline_lib.export.session_classical import export_session_classical, open_session_version
    from pipeline_lib.models import session_classical as sc
    from pipeline_lib.release import session_gate
    from pipeline_lib.serving import repository
    from pipeline_lib.serving.server import TritonServer
    from pipeline_lib.serving.session_client import SessionClient

    tmp, _, repo = classical_run
    run = tmp / "runs" / "sr"
    valid = pd.read_parquet(run / "split" / "valid.parquet")
    train = pd.read_parquet(run / "split" / "train.parquet")
    # a session_knn version with string item ids, into a second repository
    str_train, str_valid = (f.assign(**{COLS.item_id: f[COLS.item_id].map(lambda v: [f"sku-{x}" for x in v])})
                            for f in (train, valid))
    knn = sc.fit(str_train, "session_knn", SessionClassicalConfig(), COLS).save(tmp_path / "knn")
    req_str, _ = sessions.prefixes(str_valid.head(16), COLS)
    exp = export_session_classical(knn, req_str, COLS.item_id, 5, tmp_path / "staged", "knn")
    repo2 = tmp_path / "repo2"
    repository.publish(exp.version_dir, exp.config_path, repo2, "knn")
    repository.promote(repo2, "knn", 1)
    assert session_gate.score_version(repo2 / "knn" / "1", str_valid.head(200), COLS, 5) == \
        session_gate.score_version(exp.version_dir, str_valid.head(200), COLS, 5, rec=exp.recommender)

    req, _ = sessions.prefixes(valid.head(20), COLS)
    req.loc[0, "item_id"] = [987654, *req.loc[0, "item_id"]]  # an unseen id is ignored
    cases = []
    for name, root, frame in (("recsys_sr", repo, req), ("knn", repo2, req_str)):
        rec = open_session_version(root / name / "1")
        want = rec.offline(frame)
        assert not any(set(r) & set(p) for r, p in zip(want[0].tolist(), frame["item_id"]))  # exclude_seen
        unknown = "sku-unknown" if name == "knn" else 987655
        more = frame.assign(exclude_item_ids=[list(r[:2]) + [unknown] for r in want[0].tolist()])
        want_more = rec.offline(more)
        assert [r[:3] for r in want_more[0].tolist()] == [r[2:5] for r in want[0].tolist()]  # the next best move up
        cases.append((name, frame, more, want, want_more))
    server = TritonServer.on_free_ports(repo, log_file=tmp_path / "triton.log",
                                        extra_args=[f"--model-repository={repo2}"])
    with server.start(timeout_s=240):
        for proto, url in (("http", server.http_url), ("grpc", server.grpc_url)):
            for name, frame, more, want, want_more in cases:
                with SessionClient(url, proto, name) as client:
                    assert client.raw_columns == ["item_id", "exclude_item_ids"]
                    ids, scores = client.recommend(frame)  # extra columns (features, timestamps) are not sent
                    got_more = client.recommend(more)
                assert ids.tolist() == want[0].tolist(), (name, proto)
                np.testing.assert_allclose(scores, want[1], atol=1e-6, rtol=0)
                assert got_more[0].tolist() == want_more[0].tolist(), (name, proto)
                np.testing.assert_allclose(got_more[1], want_more[1], atol=1e-6, rtol=0)
    assert all(isinstance(v, str) and v.startswith("sku-") for v in cases[1][3][0].ravel())
