from pathlib import Path

import pytest
from pydantic import ValidationError

from pipeline_lib.config import FeatureKind, RunConfig, load_config, parse_set_options
from tests.support import ROOT


def test_embedded_default_is_valid_and_describes_all_roles():
    cfg = RunConfig()
    assert cfg.data.source == "synthetic"
    kinds = {f.kind for f in cfg.columns.features}
    assert kinds == {FeatureKind.categorical, FeatureKind.continuous, FeatureKind.list}
    assert cfg.columns.label not in cfg.columns.serving_columns
    assert cfg.columns.input_columns[-1] == cfg.columns.label


def test_yaml_file_and_overrides(tmp_path: Path):
    p = tmp_path / "run.yaml"
    p.write_text("seed: 7\nmodel:\n  epochs: 3\n")
    cfg = load_config(p, parse_set_options(["model.learning_rate=0.01", "split.method=time"]))
    assert (cfg.seed, cfg.model.epochs, cfg.model.learning_rate, cfg.split.method) == (7, 3, 0.01, "time")


def test_unknown_key_is_rejected_with_its_name(tmp_path: Path):
    p = tmp_path / "bad.yaml"
    p.write_text("model:\n  epoch: 3\n")
    with pytest.raises(ValidationError, match="epoch"):
        load_config(p)


def test_duplicate_roles_and_bad_values_are_rejected():
    with pytest.raises(ValidationError, match="more than one role"):
        load_config(None, {"columns": {"label": "user_id"}})
    with pytest.raises(ValidationError, match="valid_fraction"):
        load_config(None, {"split": {"valid_fraction": 1.5}})
    with pytest.raises(ValidationError, match="log"):
        load_config(None, {"columns": {"features": [{"name": "x", "kind": "categorical", "log": True}]}})
    with pytest.raises(ValidationError, match="data.path"):
        load_config(None, {"data": {"source": "parquet"}})


def test_missing_config_file_names_the_path(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="nope.yaml"):
        load_config(tmp_path / "nope.yaml")


def test_set_option_needs_key_value():
    with pytest.raises(ValueError, match="KEY=VALUE"):
        parse_set_options(["model.epochs"])


def test_dlrm_bottom_mlp_must_end_at_embedding_dim():
    with pytest.raises(ValidationError, match="must equal embedding_dim"):
        load_config(None, {"model": {"embedding_dim": 32}})
    assert load_config(None, {"model": {"embedding_dim": 32, "bottom_mlp": [64, 32]}}).model.embedding_dim == 32


def test_shipped_configs_validate_and_default_yaml_is_the_embedded_default():
    root = ROOT / "configs"
    assert load_config(root / "default.yaml") == RunConfig()
    assert load_config(root / "small.yaml").data.synthetic.n_interactions == 6000


def test_dynamic_batching_is_configurable_and_checked():
    cfg = load_config(None, {"serving": {"dynamic_batching": {"enabled": True, "max_batch_size": 16,
                                                              "max_queue_delay_microseconds": 500,
                                                              "preferred_batch_size": [4, 8]}}})
    db = cfg.serving.dynamic_batching
    assert db.enabled and db.max_batch_size == 16 and db.preferred_batch_size == [4, 8]
    assert RunConfig().serving.dynamic_batching.enabled is False
    with pytest.raises(ValidationError, match="preferred_batch_size"):
        load_config(None, {"serving": {"dynamic_batching": {"max_batch_size": 4, "preferred_batch_size": [8]}}})
    with pytest.raises(ValidationError, match="max_batch_size"):
        load_config(None, {"serving": {"dynamic_batching": {"max_batch_size": 0}}})


# --- moved from tests/test_sessions.py ------------------------------------------


def test_session_config_is_additive_and_the_example_loads():
    import os

    root = str(ROOT)
    assert load_config(os.path.join(root, "configs", "default.yaml")).task == "ranking"
    cfg = load_config(os.path.join(root, "configs", "examples", "session.yaml"))
    assert cfg.task == "session" and cfg.export.model_name == "recsys_session"
    assert cfg.session.model.type == "gru" and cfg.session.top_k == 10
    assert load_config(None, {"task": "session", "session": {"model": {"type": "transformer"}}}).session.model.type == "transformer"
    with pytest.raises(Exception, match="movielens100k|synthetic, parquet or files"):
        load_config(None, {"task": "session", "data": {"source": "movielens100k", "path": "x"}})
