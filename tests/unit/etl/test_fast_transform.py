"""The compiled (numpy) serving transform against NVTabular's own Workflow.transform, on the fitted
workflow of the shared small run; and the request concatenation used by dynamic batching."""
import pickle

import numpy as np
import pandas as pd
import pytest

from pipeline_lib.export import ranking as export
from pipeline_lib.etl import fast_transform
from pipeline_lib.etl.fast_transform import Ragged, Unsupported, compile_workflow, verify
from pipeline_lib.validate.requests import check_request, concat_requests, split_rows
from pipeline_lib.etl import sessions


@pytest.fixture(scope="module")
def serving_workflow(trained):
    import nvtabular as nvt

    return nvt.Workflow.load(str(trained.etl.workflow_dir)).remove_inputs([trained.cfg.columns.label])


def _nvt(workflow, rows: pd.DataFrame) -> pd.DataFrame:
    from merlin.io import Dataset

    return workflow.transform(Dataset(rows.copy(), cpu=True)).to_ddf().compute().reset_index(drop=True)


def test_compiled_equals_nvtabular_on_raw_and_edge_rows(trained, serving_workflow):
    # as a version stores it for serving without NVTabular: pickled (plain data, no closures)
    compiled = pickle.loads(pickle.dumps(compile_workflow(serving_workflow)))
    rows = trained.valid_rows(300)
    # raw rows + every vocabulary entry + nulls, unseen values and empty lists: identical, exactly
    assert verify(compiled, serving_workflow, rows, export.raw_to_columns) > len(rows)


def test_encodings_follow_nvtabular_conventions(trained, serving_workflow):
    compiled = compile_workflow(serving_workflow)
    rows = trained.valid_rows(4).copy()
    rows["user_country"] = [rows.user_country[0], "never-seen", None, rows.user_country[0]]
    rows["item_tags"] = [[], [424242], list(rows.item_tags[2]), [424242, *rows.item_tags[3]]]
    rows.loc[1, "user_age"] = np.nan
    got = compiled(export.raw_to_columns(rows))
    want = _nvt(serving_workflow, rows)
    assert list(got) == list(want.columns)
    assert got["user_country"][1] == 2 and got["user_country"][2] == 1  # OOV 2, null 1
    assert got["user_country"][0] >= 3 and got["user_country"][0] == got["user_country"][3]
    tags = got["item_tags"]
    assert isinstance(tags, Ragged) and tags.offsets.tolist()[:3] == [0, 0, 1] and tags.values[0] == 2
    np.testing.assert_array_equal(got["user_country"], want["user_country"].to_numpy())
    np.testing.assert_array_equal(got["user_age"], want["user_age"].to_numpy())
    assert got["user_age"].dtype == np.float32
    np.testing.assert_array_equal(tags.values, np.concatenate([np.asarray(v) for v in want["item_tags"] if len(v)]))


def test_verification_catches_a_wrong_encoding(trained, serving_workflow, monkeypatch):
    """A compiled path that differs in one index is refused (export then keeps NVTabular)."""
    compiled = compile_workflow(serving_workflow)
    real = fast_transform._Vocabulary.encode

    def off_by_one_for_oov(self, x):
        out = real(self, x)
        return np.where(out == fast_transform.OOV, fast_transform.NULL, out)

    monkeypatch.setattr(fast_transform._Vocabulary, "encode", off_by_one_for_oov)
    with pytest.raises(AssertionError, match="differ"):
        verify(compiled, serving_workflow, trained.valid_rows(16), export.raw_to_columns)
    op = export.InProcessWorkflow(serving_workflow)
    status = op.enable_fast_path(trained.valid_rows(16))
    assert status["enabled"] is False and "differ" in status["reason"] and op.fast is None


def test_unsupported_ops_are_not_compiled(tmp_path):
    import nvtabular as nvt
    from merlin.io import Dataset

    df = pd.DataFrame({"x": [1.0, 2.0, 3.0, 4.0], "c": ["a", "b", "a", "c"]})
    wf = nvt.Workflow((["x"] >> nvt.ops.Clip(min_value=2.0)) + (["c"] >> nvt.ops.Categorify(out_path=str(tmp_path))))
    wf.fit(Dataset(df, cpu=True))
    with pytest.raises(Unsupported, match="Clip"):
        compile_workflow(wf)
    op = export.InProcessWorkflow(wf)
    assert op.enable_fast_path(df)["enabled"] is False
    # and the op still transforms, through NVTabular
    cols = op.transform_columns(export.raw_to_columns(df))
    np.testing.assert_array_equal(cols["x"], [2.0, 2.0, 3.0, 4.0])


def test_requests_outside_the_compiled_path_fall_back_to_nvtabular(trained, serving_workflow):
    op = export.InProcessWorkflow(serving_workflow)
    rows = trained.valid_rows(8)
    assert op.enable_fast_path(rows)["enabled"] is True
    cols = export.raw_to_columns(rows)
    cols["user_id"] = cols["user_id"].astype(np.float64)  # not the fitted dtype: NVTabular handles it
    with pytest.raises(Unsupported):
        op.fast(cols)
    got = op.transform_columns(cols)
    want = op.transform_columns(export.raw_to_columns(rows))
    np.testing.assert_array_equal(got["user_id"], want["user_id"])


def test_take_rows_selects_and_repeats_rows_of_lists_and_scalars():
    tags = Ragged(np.array([5, 6, 7, 8]), np.array([0, 1, 1, 4], dtype=np.int32))  # [5], [], [6, 7, 8]
    got = fast_transform.take_rows(tags, np.array([2, 0, 0, 1]))
    assert got.offsets.dtype == np.int32 and got.offsets.tolist() == [0, 3, 4, 5, 5]
    assert got.values.tolist() == [6, 7, 8, 5, 5]
    assert fast_transform.take_rows(np.array(["a", "b"], dtype=object), np.zeros(3, dtype=int)).tolist() == ["a"] * 3
    empty = fast_transform.take_rows(tags, np.array([], dtype=int))
    assert empty.offsets.tolist() == [0] and len(empty.values) == 0


def test_a_jointly_encoded_column_group_compiles_like_nvtabular(tmp_path):
    """[item_id, history] share one vocabulary (Categorify joint group, as the YouTube DNN ETL fits it)."""
    import nvtabular as nvt
    from merlin.io import Dataset

    df = pd.DataFrame({"item": ["a", "b", "a", "c", "a"],
                       "hist": [[], ["a"], ["a", "b"], ["d"], ["c", "c", "b"]],
                       "x": [1.0, 2.0, 3.0, 4.0, 5.0]})
    wf = nvt.Workflow(([["item", "hist"]] >> nvt.ops.Categorify(encode_type="joint", out_path=str(tmp_path)))
                      + (["x"] >> nvt.ops.Normalize()))
    wf.fit(Dataset(df, cpu=True))
    compiled = compile_workflow(wf)
    assert verify(compiled, wf, df, export.raw_to_columns) > len(df)
    got = compiled(export.raw_to_columns(df))
    assert got["item"][0] == got["hist"].values[0]  # "a" has the same index in both columns
    assert got["hist"].values[2] == got["item"][1]  # and so has "b"


def test_concat_and_split_requests():
    a = {"u": np.array([1, 2]), "t__values": np.array([5, 6, 7]), "t__offsets": np.array([0, 1, 3], dtype=np.int32)}
    b = {"u": np.array([3]), "t__values": np.array([], dtype=np.int64), "t__offsets": np.array([0, 0], dtype=np.int32)}
    c = {"u": np.array([4, 5]), "t__values": np.array([8]), "t__offsets": np.array([0, 0, 1], dtype=np.int32)}
    for r in (a, b, c):
        check_request(r, {"t"}, 10)
    combined, counts = concat_requests([a, b, c], {"t"})
    assert counts == [2, 1, 2]
    np.testing.assert_array_equal(combined["u"], [1, 2, 3, 4, 5])
    np.testing.assert_array_equal(combined["t__values"], [5, 6, 7, 8])
    np.testing.assert_array_equal(combined["t__offsets"], [0, 1, 3, 3, 3, 4])
    assert combined["t__offsets"].dtype == np.int32
    check_request(combined, {"t"}, 10)
    parts = split_rows(np.arange(5).reshape(5, 1), counts)
    assert [p.ravel().tolist() for p in parts] == [[0, 1], [2], [3, 4]]


def test_median_fill_is_compiled_and_equals_nvtabular(tmp_path):
    """FillMedian -> Normalize on a column with missing values: the compiled transform fills the
    fitted median, exactly as NVTabular does (verify: raw rows + nulls + edge rows)."""
    import nvtabular as nvt
    from merlin.dag import postorder_iter_nodes
    from merlin.io import Dataset

    from pipeline_lib.etl import workflow as etl
    from pipeline_lib.config import ColumnsConfig, FeatureSpec

    rng = np.random.default_rng(5)
    df = pd.DataFrame({"user_id": rng.integers(0, 20, 200), "item_id": rng.integers(0, 30, 200),
                       "year": np.where(rng.random(200) < 0.1, np.nan, rng.integers(1950, 1999, 200).astype(float)),
                       "price": rng.gamma(2.0, 10.0, 200).astype(np.float32), "click": rng.integers(0, 2, 200)})
    df.loc[3, "price"] = np.nan
    cols = ColumnsConfig(timestamp=None, features=[FeatureSpec(name="year", kind="continuous"),
                                                   FeatureSpec(name="price", kind="continuous", log=True)])
    wf = etl.build_workflow(cols, tmp_path / "cats")
    wf.fit(Dataset(df, cpu=True))
    wf = wf.remove_inputs(["click"])
    rows = df.drop(columns=["click"])
    compiled = compile_workflow(wf)
    assert verify(compiled, wf, rows, export.raw_to_columns) > len(rows)
    got = compiled(export.raw_to_columns(rows))
    median = [n.op for n in postorder_iter_nodes(wf.output_node)
              if isinstance(n.op, nvt.ops.FillMedian) and "year" in n.op.medians][0].medians["year"]
    missing = np.flatnonzero(df["year"].isna().to_numpy())
    assert len(missing) and np.unique(got["year"][missing]).size == 1
    np.testing.assert_array_equal(got["year"][missing], _nvt(wf, rows)["year"].to_numpy()[missing])
    assert abs(got["year"][missing[0]]) < 1 and median == pytest.approx(df["year"].median(), abs=1.0)


# --- moved from tests/test_sessions.py ------------------------------------------


def test_the_session_workflow_compiles_to_the_numpy_serving_transform(session_etl):
    """Categorify on lists, ListSlice to the last max_length events, the time-delta lambda and the
    rename: the compiled transform equals NVTabular on held-out sessions plus edge rows (empty
    sessions, unseen items, every vocabulary entry), and truncation keeps the *last* events."""
    import nvtabular as nvt

    from pipeline_lib.export import ranking as export
    from pipeline_lib.etl.fast_transform import Ragged, compile_workflow, verify

    cfg, _, etl_out = session_etl
    wf = nvt.Workflow.load(str(etl_out.workflow_dir))
    compiled = pickle.loads(pickle.dumps(compile_workflow(wf)))  # as a version would store it
    raw = pd.read_parquet(etl_out.split.valid)[wf.input_schema.column_names].head(200).reset_index(drop=True)
    assert verify(compiled, wf, raw, export.raw_to_columns) > len(raw)
    n = cfg.session.etl.max_session_length
    long = raw.iloc[[0]].copy()
    long["item_id"] = [list(raw.item_id[0]) * (n + 3)]
    long["item_category"] = [list(raw.item_category[0]) * (n + 3)]
    long["timestamp"] = [list(range(0, 10 * len(long.item_id[0]), 10))]
    out = compiled(export.raw_to_columns(long))
    assert isinstance(out["item_id"], Ragged) and len(out["item_id"].values) == n
    deltas = out[sessions.TIME_DELTA].values
    assert deltas.dtype == np.float32 and np.allclose(deltas, np.log1p(10.0))  # the first events were cut
    assert verify(compiled, wf, long, export.raw_to_columns) >= 1


@pytest.mark.parametrize("keys", [np.array([5, 9, 1, 300, 42], np.int64), np.array([10**15, 3, -7], np.int64),
                                  np.array(["b", "a", "zz"], dtype=object)])
def test_bulk_vocabulary_lookups_equal_the_per_value_lookups(tmp_path, keys):
    """From BULK_ROWS values the lookups are vectorised (a dense table for compact integer keys, one lookup
    per distinct string, dictionary-encoded strings from the ETL): the same labels as value by value."""
    path = tmp_path / "unique.c.parquet"
    pd.DataFrame({"c": keys}, index=pd.RangeIndex(3, 3 + len(keys))).to_parquet(path)
    vocab = fast_transform._Vocabulary(str(path), "c", np.int64)
    rng = np.random.default_rng(0)
    n = fast_transform.BULK_ROWS + 5
    if keys.dtype == object:
        pool = np.array(list(keys) + ["unseen", None, np.nan, b"a"], dtype=object)
    else:
        pool = np.concatenate([keys, keys + 1, [keys.min() - 1, keys.max() + 1]])
    x = pool[rng.integers(0, len(pool), n)]
    small = np.concatenate([vocab.encode(x[i:i + 7]) for i in range(0, n, 7)])  # below BULK_ROWS each
    assert np.array_equal(vocab.encode(x), small)
    if keys.dtype == object:
        strings = np.array([v if isinstance(v, str) else None for v in x], dtype=object)
        coded = pd.Categorical(strings)
        assert np.array_equal(vocab.encode(coded), np.concatenate(
            [vocab.encode(strings[i:i + 7]) for i in range(0, n, 7)]))
    assert set(small) >= {fast_transform.OOV}
