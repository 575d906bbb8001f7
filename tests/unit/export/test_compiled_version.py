"""The compiled version (pipeline_lib/export/compiled_version.py): what the served model loads without
TensorFlow, NVTabular or merlin, checked against the offline scores, and the requests it hands back."""
import dataclasses
import json
import subprocess
import sys

import nvtabular as nvt
import numpy as np
import pandas as pd
import pytest

from pipeline_lib.etl.fast_transform import tensors_from_columns
from pipeline_lib.export import compiled_version
from pipeline_lib.export import ranking as export
from pipeline_lib.export.compiled_version import CompiledPredictor, NeedsFallback


def _tensors(rows: pd.DataFrame, columns: list[str]) -> dict:
    """Raw rows -> request tensors, as Triton hands them to the model."""
    return tensors_from_columns(export.raw_to_columns(rows[columns]))


def test_the_compiled_version_is_written_and_equals_offline(exported, trained):
    out, rows = exported
    info = json.loads((out.version_dir / "run_info.json").read_text())
    assert info["loads_without_tensorflow"] is True
    assert out.fast_transform["enabled"] and out.compiled_model["enabled"]
    predictor = CompiledPredictor.load(out.version_dir / export.ENSEMBLE_SUBDIR)
    plan = predictor.plan
    assert plan.chunk_rows == out.compiled_model["largest_verified_batch"] and plan.ragged == ["item_tags"]
    assert plan.output_names == [out.output_name] and "item_tags__offsets" in plan.input_names
    columns = [n for n in plan.input_names if not n.endswith("__offsets")]
    columns = [n[:-len("__values")] if n.endswith("__values") else n for n in columns]
    offline = export.offline_scores(nvt.Workflow.load(str(trained.etl.workflow_dir)), trained.model.model_dir,
                                    rows, "click")
    got = predictor(_tensors(rows, columns))[out.output_name].reshape(-1)
    np.testing.assert_allclose(got, offline, atol=1e-5, rtol=0)
    one = predictor(_tensors(rows.iloc[[3]], columns))[out.output_name]
    assert one.shape == (1, 1)
    np.testing.assert_allclose(one.reshape(-1), offline[3:4], atol=1e-5, rtol=0)


def test_a_request_bigger_than_the_verified_batch_is_scored_in_chunks(exported, trained):
    """More rows than export verified the compiled model on: the compiled version still answers (no
    TensorFlow load), in chunks of ``chunk_rows``, with the offline scores of those rows."""
    out, rows = exported
    predictor = CompiledPredictor.load(out.version_dir / export.ENSEMBLE_SUBDIR)
    assert predictor.plan.chunk_rows == out.compiled_model["largest_verified_batch"] == 1024
    offline = export.offline_scores(nvt.Workflow.load(str(trained.etl.workflow_dir)), trained.model.model_dir,
                                    rows, "click")
    idx = np.arange(predictor.plan.chunk_rows + 1) % len(rows)
    big = predictor(_tensors(rows.iloc[idx], list(rows.columns)))[out.output_name]
    assert big.shape == (len(idx), 1)
    np.testing.assert_allclose(big.reshape(-1), offline[idx], atol=1e-5, rtol=0)
    small_chunks = dataclasses.replace(predictor, plan=dataclasses.replace(predictor.plan, chunk_rows=5))
    whole = predictor(_tensors(rows, list(rows.columns)))[out.output_name]
    np.testing.assert_allclose(small_chunks(_tensors(rows, list(rows.columns)))[out.output_name], whole,
                               atol=1e-6, rtol=0)


def test_requests_outside_the_compiled_transform_are_handed_back(exported):
    """Inputs the compiled transform does not cover: the served model answers them with the full ensemble."""
    out, rows = exported
    predictor = CompiledPredictor.load(out.version_dir / export.ENSEMBLE_SUBDIR)
    odd = _tensors(rows.head(2), list(rows.columns))
    odd["user_id"] = odd["user_id"].astype(np.float64)  # not the fitted dtype
    with pytest.raises(NeedsFallback, match="outside the compiled transform"):
        predictor(odd)


def test_a_plan_of_the_previous_format_loads_as_none(exported, tmp_path):
    """Format 1 plans sent requests above ``max_rows`` to TensorFlow: such a version loads the full ensemble."""
    out, _ = exported
    plan = json.loads((out.version_dir / export.ENSEMBLE_SUBDIR / compiled_version.PLAN_FILE).read_text())
    assert plan["format"] == compiled_version.FORMAT == 2
    plan["format"], plan["max_rows"] = 1, plan.pop("chunk_rows")
    (tmp_path / compiled_version.PLAN_FILE).write_text(json.dumps(plan))
    assert CompiledPredictor.load(tmp_path) is None


def test_the_compiled_version_loads_without_tensorflow_nvtabular_or_merlin(exported, tmp_path):
    """In a fresh interpreter, as the served model.py loads it: no heavy module gets imported, same scores."""
    out, rows = exported
    artifacts = out.version_dir / export.ENSEMBLE_SUBDIR
    request = tmp_path / "request.npy"
    np.save(request, _tensors(rows.head(3), list(rows.columns)), allow_pickle=True)
    code = (
        "import json, numpy as np\n"
        "from pipeline_lib.export.compiled_version import CompiledPredictor, heavy_modules\n"
        f"p = CompiledPredictor.load({str(artifacts)!r})\n"
        f"scores = next(iter(p(np.load({str(request)!r}, allow_pickle=True).item()).values()))\n"
        "print(json.dumps({'scores': scores.reshape(-1).tolist(), 'heavy': heavy_modules()}))\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-2000:]
    got = json.loads(res.stdout.strip().splitlines()[-1])
    assert got["heavy"] == []
    want = CompiledPredictor.load(artifacts)(_tensors(rows.head(3), list(rows.columns)))[out.output_name]
    np.testing.assert_array_equal(np.asarray(got["scores"], dtype=np.float32), want.reshape(-1))


def test_no_compiled_version_without_both_fast_paths(tmp_path):
    assert CompiledPredictor.load(tmp_path) is None  # nothing written: the full ensemble serves
    (tmp_path / compiled_version.PLAN_FILE).write_text(json.dumps({"format": compiled_version.FORMAT + 1}))
    assert CompiledPredictor.load(tmp_path) is None  # a plan of another format: the full ensemble serves
