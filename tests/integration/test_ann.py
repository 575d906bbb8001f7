"""One retrieval version exported with a (deliberately coarse) FAISS index by the real flow, served by a real Triton."""
import json
from pathlib import Path
import numpy as np
import pytest
from pipeline_lib.export import ann
from pipeline_lib.export import topk
from pipeline_lib.serving.client import RecsysClient
from pipeline_lib.serving.server import TritonServer
from tests.conftest import SMALL


pytestmark = pytest.mark.integration


ANN = {"mode": "faiss", "nlist": 8, "nprobe": 2, "min_recall": 0.0}


@pytest.fixture(scope="module")
def ann_run(prefect_harness, tmp_path_factory):
    from flows.pipeline import pipeline

    tmp = tmp_path_factory.mktemp("ann")
    repo = tmp / "model_repository"
    over = {**SMALL, "seed": 5, "runs_dir": str(tmp / "runs"), "run_name": "ann",
            "model": {**SMALL["model"], "type": "mf", "retrieval": {"epochs": 1, "ann": ANN}},
            "export": {**SMALL["export"], "model_repository": str(repo), "model_name": "recsys_ann"}}
    return tmp, repo, pipeline(overrides=over)


@pytest.mark.integration
def test_flow_exports_a_faiss_version_whose_served_top_k_equals_offline(ann_run):
    import pandas as pd

    tmp, repo, summary = ann_run
    art = repo / "recsys_ann" / "1" / topk.TOPK_DIR
    meta = json.loads((art / "spec.json").read_text())["ann"]
    assert meta["index"] == "faiss" and meta["nlist"] == 8 and meta["nprobe"] == 2
    assert (art / ann.INDEX_FILE).is_file() and summary["ann"] == meta
    assert 0.0 <= meta["recall_at_k"] <= 1.0 and meta["queries"] == SMALL["export"]["parity_rows"]
    assert summary["max_abs_diff_served_vs_offline"] <= 1e-5  # the flow's smoke test, through the index
    rec = topk.TopKRecommender(art)
    assert rec.index is not None and rec.index.nprobe == 2
    valid = Path(summary["etl_from"]).parent / "split" / "valid.parquet"
    rows = pd.read_parquet(valid).iloc[40:64][rec.request_columns].reset_index(drop=True)
    want = rec.offline(rows)
    more = rows.assign(**{topk.EXCLUDE_INPUT: [list(r[:3]) for r in want[0].tolist()]})
    want_more = rec.offline(more)
    server = TritonServer.on_free_ports(repo, log_file=tmp / "triton.log")
    with server.start(timeout_s=300, models=["recsys_ann"]):
        for url, protocol in ((server.http_url, "http"), (server.grpc_url, "grpc")):
            with RecsysClient(url, protocol, "recsys_ann") as client:
                got, got_more = client.recommend(rows), client.recommend(more)
            np.testing.assert_array_equal(got[0], want[0])
            np.testing.assert_allclose(got[1], want[1], atol=1e-5, rtol=0)
            np.testing.assert_array_equal(got_more[0], want_more[0])
            for items, dropped in zip(got_more[0].tolist(), more[topk.EXCLUDE_INPUT]):
                assert not set(items) & set(dropped), protocol
