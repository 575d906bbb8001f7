"""Classical session models (session_knn, sequential_rules) on tiny sessions whose scores are checked by hand."""
from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from pipeline_lib.config import SessionClassicalConfig, SessionColumns, load_config
from pipeline_lib.models import session_classical as sc

COLS = SessionColumns()


def sessions(*lists: list, start: int = 0) -> pd.DataFrame:
    """Raw training sessions as the session ETL writes them (one row per session, list columns);
    session i starts at ``start + 100 * i`` (later rows are more recent)."""
    return pd.DataFrame({"session_id": range(len(lists)), COLS.item_id: [list(v) for v in lists],
                         COLS.timestamp: [[start + 100 * i + j for j in range(len(v))] for i, v in enumerate(lists)],
                         **{f: [[0] * len(v) for v in lists] for f in COLS.item_features}})


TRAIN = sessions(["a", "b", "c"], ["a", "b"], ["a", "c"], ["d", "e"], ["d"])  # counts a3 d2 b2 c2 e1


def top(model: sc.ClassicalSessionModel, session: list, k: int = 4, exclude_seen: bool = True):
    idx, scores = model.top_k([session], k, sc.session_exclusions(model, [session], exclude_seen))
    return model.item_ids[idx[0]].tolist(), scores[0].tolist()


def test_the_catalogue_is_ordered_by_training_popularity_ties_by_first_appearance():
    ids, counts, rows = sc.catalogue(TRAIN[COLS.item_id])
    assert ids.tolist() == ["a", "b", "c", "d", "e"] and counts.tolist() == [3, 2, 2, 2, 1]
    assert [r.tolist() for r in rows] == [[0, 1, 2], [0, 1], [0, 2], [3, 4], [3]]
    ints, _, _ = sc.catalogue(pd.Series([[5, 7], [7]]))
    assert ints.dtype == np.int64 and ints.tolist() == [7, 5]


def test_sequential_rules_weigh_each_later_item_by_one_over_its_distance():
    opts = SessionClassicalConfig(max_distance=1)
    m = sc.fit(TRAIN, "sequential_rules", opts, COLS)
    # a -> b twice, a -> c once (a's own row excluded: the session holds it); d, e: no rule, by popularity
    assert top(m, ["a"]) == (["b", "c", "d", "e"], [2.0, 1.0, 0.0, 0.0])
    m2 = sc.fit(TRAIN, "sequential_rules", SessionClassicalConfig(max_distance=2), COLS)
    assert top(m2, ["a"]) == (["b", "c", "d", "e"], [2.0, 1.5, 0.0, 0.0])  # a -> c also at distance 2 in [a b c]
    # the last item's rules only (recency_decay 0): [b, a] scores like [a]; a and b (the session) come last at -inf
    assert top(m, ["b", "a"])[0] == ["c", "d", "e", "a"] and top(m, ["b", "a"])[1][-1] == -np.inf
    # recency_decay 0.5: b's rule b -> c (1) adds at weight 0.5 to a's a -> c (1)
    m3 = sc.fit(TRAIN, "sequential_rules", SessionClassicalConfig(max_distance=1, recency_decay=0.5), COLS)
    assert top(m3, ["b", "a"], k=2) == (["c", "d"], [1.5, 0.0])


def test_session_knn_scores_items_by_the_cosine_of_the_sessions_holding_them():
    plain = SessionClassicalConfig(position_weighting=False)
    m = sc.fit(TRAIN, "session_knn", plain, COLS)
    # [a] shares a with the sessions [a b c] (cos 1/sqrt 3), [a b] and [a c] (1/sqrt 2 each)
    ids, scores = top(m, ["a"])
    assert ids == ["b", "c", "d", "e"]  # b and c tie (1/sqrt3 + 1/sqrt2): the more popular first (first seen)
    np.testing.assert_allclose(scores, [3 ** -0.5 + 2 ** -0.5] * 2 + [0, 0], rtol=1e-6)
    # V-SKNN: [c, a] weighs a (last) 1 and c 1/2; [a b c]: 1.5 / (sqrt 3 sqrt 1.25), [a c]: 1.5 / (sqrt 2 ...)
    v = sc.fit(TRAIN, "session_knn", SessionClassicalConfig(), COLS)
    s = v.scores([["c", "a"]])[0]
    q = np.sqrt(1.25)
    np.testing.assert_allclose(s[v.index.get_loc("b")], 1.5 / (np.sqrt(3) * q) + 1 / (np.sqrt(2) * q), rtol=1e-6)
    # neighbours: the 1 most similar ([a c] for [c, a]) scores nothing but its own items
    one = sc.fit(TRAIN, "session_knn", SessionClassicalConfig(neighbors=1), COLS)
    assert one.scores([["c", "a"]])[0][one.index.get_loc("b")] == 0
    # sample: only the most recent session sharing an item ([a c], the third) is a candidate
    recent = sc.fit(TRAIN, "session_knn", SessionClassicalConfig(sample_size=1, position_weighting=False), COLS)
    assert top(recent, ["a"], k=2)[0] == ["c", "b"] and top(recent, ["a"], k=2)[1][1] == 0


@pytest.mark.parametrize("kind", sc.TYPES)
def test_unknown_items_are_ignored_and_a_session_of_unknown_items_gets_the_most_popular(kind):
    m = sc.fit(TRAIN, kind, SessionClassicalConfig(), COLS)
    assert top(m, ["zzz", 42])[0] == ["a", "b", "c", "d"]
    assert top(m, [])[0] == ["a", "b", "c", "d"]
    np.testing.assert_array_equal(m.scores([["zzz", "a"]]), m.scores([["a"]]))


@pytest.mark.parametrize("kind", sc.TYPES)
def test_excluded_items_are_never_returned_and_fewer_than_k_pads_with_minus_inf(kind):
    m = sc.fit(TRAIN, kind, SessionClassicalConfig(), COLS)
    ids, scores = top(m, ["a", "b", "c"], k=4)
    assert ids[:2] == ["d", "e"] and scores[2:] == [-np.inf, -np.inf]  # only 2 items left: the rest at -inf
    ids, _ = top(m, ["a", "b", "c"], k=4, exclude_seen=False)
    assert set(ids) & {"a", "b", "c"}


def test_save_and_load_give_the_same_scores(tmp_path):
    for kind in sc.TYPES:
        m = sc.fit(TRAIN, kind, SessionClassicalConfig(), COLS)
        back = sc.ClassicalSessionModel.load(m.save(tmp_path / kind))
        assert back.type == kind and back.item_ids.tolist() == m.item_ids.tolist()
        np.testing.assert_array_equal(back.scores([["a"], ["d", "b"]]), m.scores([["a"], ["d", "b"]]))
        assert (tmp_path / kind / sc.MATRIX_FILE).exists()


def test_held_out_metrics_follow_the_session_protocol():
    m = sc.fit(TRAIN, "sequential_rules", SessionClassicalConfig(max_distance=1), COLS)
    # prefixes [a] -> target b (rank 1), [d] -> target e (rank 1: d -> e), [a] -> target zzz (unknown: a miss)
    valid = sessions(["a", "b"], ["d", "e"], ["a", "zzz"])
    res = sc.topk_metrics_of(m, valid, COLS, 2)
    assert res["recall@2"] == pytest.approx(2 / 3) and res["mrr@2"] == pytest.approx(2 / 3)


def test_the_classical_types_are_session_model_types():
    cfg = load_config(None, {"task": "session", "session": {"model": {"type": "session_knn",
                                                                      "classical": {"neighbors": 5}}}})
    assert cfg.session.model.is_classical and cfg.session.model.classical.neighbors == 5
    assert not load_config(None, {"task": "session"}).session.model.is_classical
    with pytest.raises(ValueError, match="neighbors"):
        load_config(None, {"task": "session", "session": {"model": {"classical": {"neighbors": 0}}}})
    with pytest.raises(ValueError, match="not a classical session type"):
        sc.fit(TRAIN, "gru", SessionClassicalConfig(), COLS)
