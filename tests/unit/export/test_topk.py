"""The one top-k route's shared step (retrieval, two-stage and session versions): catalogue rows of raw
ids, exclusions, the masked top-k decoded to raw ids, and the config.pbtxt writer. Served end to end in
tests/integration/test_retrieval.py and test_sessions.py."""
import json

import numpy as np
import pytest

from pipeline_lib.export import topk
from pipeline_lib.export.session import catalogue
from pipeline_lib.models.retrieval import top_k_scores


def _route(tmp_path, ids) -> topk.TopKRoute:
    (tmp_path / "spec.json").write_text(json.dumps({"kind": "retrieval", "k": 3, "request_columns": ["user_id"]}))
    np.savez(tmp_path / topk.ITEMS_FILE, ids=ids)
    return topk.TopKRoute(tmp_path)


def test_exclusions_map_raw_ids_to_catalogue_rows_and_ignore_unknown_ones(tmp_path):
    route = _route(tmp_path, np.array(["sku-a", "sku-b", "sku-c", "sku-d"], dtype=object))
    # bytes as Triton hands string ids over, str as a frame holds them; unknown ids and missing lists ignored
    assert route.catalogue_rows(np.array([b"sku-c", b"nope"], dtype=object)).tolist() == [2]
    assert route.catalogue_rows(["sku-a", "sku-d"]).tolist() == [0, 3]
    assert route.catalogue_rows(None).tolist() == [] and route.catalogue_rows(float("nan")).tolist() == []
    seen = [np.array([1]), np.zeros(0, np.int64), np.array([0, 1])]
    excl = route.exclude_rows(seen, [["sku-c"], [], None], 3)
    assert [e.tolist() for e in excl] == [[1, 2], [], [0, 1]]
    assert route.exclude_rows(None, [[], ["unknown"]], 2) is None  # nothing to exclude
    with pytest.raises(ValueError, match="holds a retrieval top-k version, not session"):
        type("Session", (topk.TopKRoute,), {"kind": "session"})(tmp_path)


def test_masked_top_k_puts_excluded_items_last_and_decodes_raw_ids(tmp_path):
    route = _route(tmp_path, np.array([101, 102, 103, 104], dtype=np.int64))
    scores = np.array([[1, 2, 3, 4], [4, 3, 2, 1], [1, 2, 3, 4]], dtype=np.float32)
    excl = route.exclude_rows([np.array([2]), np.zeros(0, np.int64), np.arange(4)], None, 3)
    idx, best = top_k_scores(scores, 3, excl)
    assert route.item_ids[idx].tolist() == [[104, 102, 101], [101, 102, 103], [101, 102, 103]]
    assert np.isneginf(best[2]).all()  # every item excluded: they come last, at -inf, ties by catalogue order
    assert top_k_scores(scores[:1], 9)[0].shape == (1, 4)  # never more than the catalogue


def test_a_session_catalogue_drops_the_special_slots_and_keeps_the_id_type():
    ids, positions = catalogue(np.array([None, None, None, 7, None, 9], dtype=object))
    assert ids.tolist() == [7, 9] and ids.dtype == np.int64 and positions.tolist() == [3, 5]
    ids, _ = catalogue(np.array([None, None, None, "sku-1", "sku-2"], dtype=object))
    assert ids.dtype == object and ids.tolist() == ["sku-1", "sku-2"]


def test_config_pbtxt_is_written_with_the_public_model_config_api(tmp_path):
    import tritonclient.grpc.model_config_pb2 as mc
    from google.protobuf import text_format

    inputs = [topk.RequestInput("user_id", "int64", False), topk.RequestInput("item_id", str, True),
              topk.RequestInput(topk.EXCLUDE_INPUT, str, True)]
    path = tmp_path / "config.pbtxt"
    topk.write_config(path, "m", inputs, np.array(["a"], dtype=object), 5, 100)
    cfg = text_format.Parse(path.read_text(), mc.ModelConfig())
    got = {i.name: (mc.DataType.Name(i.data_type), list(i.dims), i.optional) for i in cfg.input}
    assert got == {"user_id": ("TYPE_INT64", [-1], False), "item_id__values": ("TYPE_STRING", [-1], False),
                   "item_id__offsets": ("TYPE_INT32", [-1], False),
                   "exclude_item_ids__values": ("TYPE_STRING", [-1], True),
                   "exclude_item_ids__offsets": ("TYPE_INT32", [-1], True), "k": ("TYPE_INT32", [1], True)}
    assert [(o.name, mc.DataType.Name(o.data_type), list(o.dims)) for o in cfg.output] == [
        ("item_ids", "TYPE_STRING", [-1, -1]), ("scores", "TYPE_FP32", [-1, -1]), ("count", "TYPE_INT32", [-1]),
        ("request_id", "TYPE_STRING", [1])]
    assert cfg.backend == "python" and cfg.parameters["max_request_rows"].string_value == "100"
    assert cfg.parameters["top_k"].string_value == "5" and cfg.parameters["max_string_bytes"].string_value == "1024"


def test_finish_top_k_answers_only_valid_items_with_their_count():
    """Exclusions that leave a row fewer than k items: the -inf slots are not answered (sentinel id, score 0,
    ``count``); ``k`` keeps the first columns; NaN / +inf scores raise instead of being answered."""
    from pipeline_lib.validate.requests import NonFiniteScores

    ids = np.array([[7, 3, 9], [4, 5, 6]], dtype=np.int64)
    scores = np.array([[0.9, -np.inf, -np.inf], [0.5, 0.4, 0.3]], dtype=np.float32)
    got_ids, got_scores, count = topk.finish_top_k(ids, scores)
    assert got_ids.tolist() == [[7, -1, -1], [4, 5, 6]] and count.tolist() == [1, 3]
    np.testing.assert_allclose(got_scores, [[0.9, 0.0, 0.0], [0.5, 0.4, 0.3]], rtol=1e-6)
    assert np.isfinite(got_scores).all()
    s_ids, _, s_count = topk.finish_top_k(np.array([["a", "b"]], dtype=object), np.array([[-np.inf, -np.inf]]))
    assert s_ids.tolist() == [["", ""]] and s_count.tolist() == [0]
    two = topk.finish_top_k(ids, scores, 2)
    assert two[0].tolist() == [[7, -1], [4, 5]] and two[2].tolist() == [1, 2]
    for bad in (np.nan, np.inf):
        with pytest.raises(NonFiniteScores, match=r"non-finite scores for rows \[1\]"):
            topk.finish_top_k(ids, np.array([[0.9, 0.8, 0.7], [0.5, bad, 0.3]], dtype=np.float32))


def test_requested_k_accepts_1_to_the_exported_k_and_refuses_the_rest():
    from pipeline_lib.validate.requests import BadRequest

    assert topk.requested_k(None, 10) is None
    assert topk.requested_k(np.array([3], dtype=np.int32), 10) == 3
    assert topk.requested_k(np.array([10], dtype=np.int32), 10) == 10
    for bad in (0, -1, 11, 10**6):
        with pytest.raises(BadRequest, match=rf"input 'k' is {bad}; this version answers 1 to 10 items per row"):
            topk.requested_k(np.array([bad], dtype=np.int32), 10)
    with pytest.raises(BadRequest, match=r"input 'k' must be one integer"):
        topk.requested_k(np.array([1, 2], dtype=np.int32), 10)


def test_rerank_never_promotes_an_excluded_candidate():
    ids = np.array([[1, 2, 3]])
    retrieved = np.array([[0.5, 0.4, -np.inf]], dtype=np.float32)  # candidate 3 was excluded
    got_ids, got_scores = topk.rerank(ids, np.array([[0.1, 0.2, 0.99]], dtype=np.float32), 3, retrieved)
    assert got_ids.tolist() == [[2, 1, 3]] and np.isneginf(got_scores[0, 2])
    assert topk.finish_top_k(got_ids, got_scores)[2].tolist() == [2]
