"""The classical session version (kind session_classical): export checks, the served entry point on request
tensors (what Triton's model.py calls) == offline, exclusions, the recommender picked by spec.json.
Served by a real Triton in tests/integration/test_session_classical.py."""
import json

import numpy as np
import pandas as pd
import pytest

from pipeline_lib.config import SessionClassicalConfig
from pipeline_lib.export import session_classical as export
from pipeline_lib.export.topk import TOPK_DIR
from pipeline_lib.models import session_classical as sc
from tests.unit.models.test_session_classical import COLS, TRAIN


@pytest.fixture(scope="module")
def version(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("classical_version")
    model_dir = sc.fit(TRAIN, "sequential_rules", SessionClassicalConfig(max_distance=1), COLS).save(tmp / "model")
    sample = pd.DataFrame({COLS.item_id: [["a"], ["d"], ["b", "a"]], COLS.timestamp: [[1], [2], [3, 4]]})
    return export.export_session_classical(model_dir, sample, COLS.item_id, 3, tmp / "staged", "sess"), sample


def test_the_version_is_a_top_k_version_without_workflow(version):
    exp, _ = version
    spec = json.loads((exp.version_dir / TOPK_DIR / "spec.json").read_text())
    assert spec["kind"] == "session_classical" and spec["request_columns"] == ["item_id"] and spec["k"] == 3
    assert spec["fast_transform"]["enabled"] is False and exp.parity["max_abs_score_diff"] == 0.0
    config = exp.config_path.read_text()
    assert 'name: "item_id__values"' in config and "TYPE_STRING" in config and "timestamp" not in config
    assert (exp.version_dir / "model.py").exists()
    assert isinstance(export.open_session_version(exp.version_dir), export.ClassicalSessionRecommender)
    assert export.recommender_class("session_knn") is export.ClassicalSessionRecommender


def test_served_tensors_give_the_offline_top_k_with_exclusions(version):
    exp, sample = version
    rec = exp.recommender
    values = np.array([b"a", b"d", b"b", b"a", b"zzz"], dtype=object)  # bytes, as Triton hands them over
    arrays = {"item_id__values": values, "item_id__offsets": np.array([0, 1, 2, 5], dtype=np.int32),
              "exclude_item_ids__values": np.array([b"b", b"nope"], dtype=object),
              "exclude_item_ids__offsets": np.array([0, 2, 2, 2], dtype=np.int32)}
    ids, scores = rec.recommend_tensors(arrays, {"item_id", "exclude_item_ids"})
    frame = pd.DataFrame({"item_id": [["a"], ["d"], ["b", "a", "zzz"]], "exclude_item_ids": [["b", "nope"], [], []]})
    want = rec.offline(frame)
    assert ids.tolist() == want[0].tolist() and np.array_equal(scores, want[1])
    # [a] without b (requested): c (a -> c once); [d]: e (d -> e); [b a zzz]: c, then the most popular unseen
    assert ids.tolist() == [["c", "d", "e"], ["e", "a", "b"], ["c", "d", "e"]]
    assert scores[0].tolist() == [1.0, 0.0, 0.0]


def test_a_version_of_another_kind_is_refused(version, tmp_path):
    exp, _ = version
    (tmp_path / TOPK_DIR).mkdir()
    (tmp_path / TOPK_DIR / "spec.json").write_text(json.dumps({"kind": "retrieval"}))
    with pytest.raises(ValueError, match="not a session model"):
        export.open_session_version(tmp_path)
