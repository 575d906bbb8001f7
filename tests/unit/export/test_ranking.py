import json

import numpy as np
import pytest

from pipeline_lib.export import ranking as export


def test_export_layout_needs_only_the_python_backend(exported):
    out, _ = exported
    cfg = (out.staged_repository / "recsys" / "config.pbtxt").read_text()
    assert 'backend: "python"' in cfg and 'platform: "merlin_executor"' in cfg
    # One Triton model only; no TensorFlow backend model anywhere in the repository.
    assert [p.name for p in out.staged_repository.iterdir()] == ["recsys"]
    assert "tensorflow" not in "".join(p.read_text() for p in out.staged_repository.rglob("config.pbtxt"))
    ens = out.version_dir / "ensemble"
    assert (ens / "workflow" / "workflow.pkl").exists() and (ens / "model" / "saved_model.pb").exists()
    # raw feature inputs, list feature as values/offsets, no label
    for name in ("user_country", "item_tags__values", "item_tags__offsets", "item_price"):
        assert f'name: "{name}"' in cfg
    assert 'name: "click"' not in cfg
    info = json.loads((out.version_dir / "run_info.json").read_text())
    assert info["parity_max_abs_diff"] <= 1e-5 and info["run"] == "test"
    # the fitted workflow compiled to numpy was verified identical to NVTabular and serves
    assert info["fast_transform"]["enabled"] is True and info["fast_transform"]["verified_rows"] > 64
    assert out.fast_transform == info["fast_transform"]
    assert "max_batch_size" not in cfg and "dynamic_batching" not in cfg  # off unless configured
    assert "max_request_rows" in cfg and "pipeline_lib.validate.requests" in (out.version_dir / "model.py").read_text()


def test_exported_ensemble_equals_offline(exported, trained):
    out, rows = exported
    import nvtabular as nvt
    from merlin.dag import postorder_iter_nodes
    from merlin.systems.dag import Ensemble

    ens_dir = out.version_dir / "ensemble"
    ens = Ensemble.load(str(ens_dir))
    for node in postorder_iter_nodes(ens.graph.output_node, flatten_subgraphs=True):
        node.op.load_artifacts(str(ens_dir))
    wf = nvt.Workflow.load(str(trained.etl.workflow_dir))
    offline = export.offline_scores(wf, trained.model.model_dir, rows, "click")
    served_path = export.ensemble_scores(ens, rows)
    assert len(offline) == len(rows) and np.ptp(offline) > 0
    np.testing.assert_allclose(served_path, offline, atol=1e-5, rtol=0)


def test_parity_check_catches_the_stock_bytes_bug(trained, tmp_path, monkeypatch):
    """Stock TransformWorkflow feeds Triton's BYTES (``bytes``) to vocabularies fitted on ``str``,
    so every string category becomes OOV. The pre-export check must catch that, writing nothing."""
    from merlin.systems.dag.ops.workflow import TransformWorkflow

    monkeypatch.setattr(export.InProcessWorkflow, "transform", TransformWorkflow.transform)
    staging = tmp_path / "ensemble"
    with pytest.raises(export.ParityError, match="in-process ensemble: max \\|ensemble - offline\\|"):
        export.export_ensemble(trained.etl.workflow_dir, trained.model.model_dir, trained.valid_rows(64),
                               "click", staging, "recsys", 1)
    assert not staging.exists()


def test_model_op_schemas_equal_merlin_systems_ones(trained):
    """InProcessTensorflow reads its schemas from the loaded serving signature instead of saving the model
    again as merlin-systems' PredictTensorflow does: the same input and output schemas as merlin's."""
    from merlin.systems.dag.ops.tensorflow import PredictTensorflow

    ours = export.InProcessTensorflow(trained.model.model_dir)
    merlin = PredictTensorflow(str(trained.model.model_dir))
    assert ours.input_schema == merlin.input_schema and ours.output_schema == merlin.output_schema
    assert "item_tags" in ours.input_schema.column_names and ours.input_schema["item_tags"].is_list
