"""The optional tune stage: a real Optuna study over real Merlin Models trainings on tiny data,
and one real Prefect flow run with tuning on."""
import json

import numpy as np
import optuna
import pandas as pd
import pytest
from pydantic import ValidationError

from pipeline_lib.models import tune
from pipeline_lib.config import ModelConfig, load_config

from tests.conftest import small_config

# a narrow space: every trial takes seconds
FAST_SPACE = {"epochs": [1, 2], "batch_size": [512], "embedding_dim": [8, 16], "mlp_width": [32, 64],
              "mlp_depth": [1, 1]}


@pytest.fixture(scope="module")
def etl_out(trained, tmp_path_factory):
    """The shared small run's ETL output (tests/conftest.py `trained`: the same data and config as
    small_config); the studies write into a folder of their own."""
    return tmp_path_factory.mktemp("tune"), trained.etl


@pytest.fixture(scope="module")
def study(etl_out):
    root, out = etl_out
    cfg = small_config(root, tune={"enabled": True, "n_trials": 3, "timeout_s": 600, "pruning": False,
                                   "space": FAST_SPACE})
    return cfg, tune.run_study(cfg, out, root / "tune")


def test_study_records_every_trial_and_the_best(study):
    cfg, result = study
    t = result.trials
    assert list(t["number"]) == [0, 1, 2] and set(t["state"]) == {"COMPLETE"}
    assert {"value", "seconds", "best", "note", *FAST_SPACE, "learning_rate"} <= set(t.columns)
    assert (t["seconds"] > 0).all() and t["value"].between(0, 1).all()
    assert result.metric == "auc" and result.direction == "maximize"
    assert result.best_value == t["value"].max() and t.loc[t["best"], "number"].item() == result.best_trial
    best_row = t.loc[t["best"]].iloc[0]
    assert result.best_params == {k: best_row[k] for k in result.best_params}
    # the searched values stay inside the (overridden) space
    assert set(t["batch_size"]) == {512} and set(t["mlp_depth"]) == {1} and set(t["embedding_dim"]) <= {8, 16}
    assert t["learning_rate"].between(1e-4, 3e-2).all()
    # the files of the run folder
    saved = pd.read_csv(result.out_dir / "trials.csv")
    assert list(saved["number"]) == [0, 1, 2]
    np.testing.assert_allclose(saved["value"], t["value"])
    best = json.loads((result.out_dir / "best_config.json").read_text())
    assert best["best_trial"] == result.best_trial and best["params"] == result.best_params
    assert ModelConfig.model_validate(best["model"]) == result.best_model
    assert result.history_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "data:image/png;base64," in tune.history_markdown(result)
    assert result.summary()["completed"] == 3


def test_best_config_carries_the_best_params(study):
    cfg, result = study
    m, p = result.best_model, result.best_params
    assert (m.learning_rate, m.embedding_dim, m.epochs, m.batch_size) == (
        p["learning_rate"], p["embedding_dim"], p["epochs"], p["batch_size"])
    assert m.top_mlp == [p["mlp_width"]] and m.bottom_mlp == [*cfg.model.bottom_mlp[:-1], p["embedding_dim"]]
    assert m.type == cfg.model.type and m.optimizer == cfg.model.optimizer  # the rest untouched


def test_apply_params_maps_every_family():
    m = tune.apply_params(ModelConfig(type="dcn"), {"mlp_width": 128, "mlp_depth": 3, "cross_depth": 1})
    assert m.top_mlp == [128, 64, 32] and m.cross_depth == 1
    y = tune.apply_params(ModelConfig(type="youtube_dnn", retrieval={"tower_mlp": [64, 64]}),
                          {"tower_width": 32, "logits_temperature": 0.1, "num_sampled": 50, "embedding_dim": 32})
    assert y.retrieval.tower_mlp == [32, 32] and y.retrieval.logits_temperature == 0.1
    assert y.retrieval.num_sampled == 50 and y.embedding_dim == 32
    # two-stage with a DLRM re-ranker: DLRM's bottom MLP must still end at embedding_dim
    t = tune.apply_params(ModelConfig(type="two_tower", retrieval={"rerank_with": "dlrm"}), {"embedding_dim": 32})
    assert t.bottom_mlp[-1] == 32 and t.retrieval.rerank_with == "dlrm"
    # retrieval models train with model.retrieval.epochs / learning_rate when set (defaults 20 / 0.01)
    r = tune.apply_params(ModelConfig(type="mf"), {"epochs": 3, "learning_rate": 0.002})
    assert (r.retrieval.epochs, r.retrieval.learning_rate) == (3, 0.002)
    assert list(tune.search_space("mf")) == ["learning_rate", "embedding_dim", "batch_size", "epochs",
                                             "logq_correction"]


def test_timeout_stops_the_study_after_the_running_trial(etl_out):
    root, out = etl_out
    cfg = small_config(root, tune={"enabled": True, "n_trials": 50, "timeout_s": 1,
                                   "space": {**FAST_SPACE, "epochs": [1, 1]}})
    result = tune.run_study(cfg, out, root / "tune-timeout")
    assert len(result.trials) == 1 and result.trials["state"].item() == "COMPLETE"  # 50 allowed, 1 started


def test_bad_search_space_keys_are_config_errors_naming_them():
    with pytest.raises(ValidationError, match="'dropout' is not a tunable parameter"):
        load_config(None, {"tune": {"enabled": True, "space": {"dropout": [0.1, 0.5]}}})
    with pytest.raises(ValidationError, match="'num_sampled' is not a tunable parameter of model.type 'dlrm'"):
        load_config(None, {"tune": {"enabled": True, "space": {"num_sampled": [10, 50]}}})
    with pytest.raises(ValidationError, match=r"tune.space.learning_rate: need 0 < low <= high"):
        load_config(None, {"tune": {"space": {"learning_rate": [1e-2, 1e-4]}}})
    with pytest.raises(ValidationError, match="tune applies to task: ranking"):
        load_config(None, {"task": "session", "tune": {"enabled": True}})
    assert load_config(None).tune.enabled is False  # off by default (`make run`)


def test_pruning_callback_stops_a_trial_below_the_median():
    """A real Optuna study whose earlier trial reached 0.9 at epoch 1: 0.5 there is pruned."""
    import tensorflow as tf

    study = optuna.create_study(direction="maximize",
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=1, n_warmup_steps=0))
    dist = {"x": optuna.distributions.FloatDistribution(0, 1)}
    study.add_trial(optuna.trial.create_trial(params={"x": 0.5}, distributions=dist, value=0.9,
                                              intermediate_values={0: 0.9}))
    trial = study.ask(dist)
    cb = tune._pruning_callback(trial, "val_auc", prune=True)
    cb.set_model(tf.keras.Sequential([tf.keras.layers.Dense(1)]))
    cb.on_epoch_end(0, {"val_auc": 0.5})
    assert cb.pruned_at == 1 and cb.model.stop_training
    assert study.trials[-1].intermediate_values == {0: 0.5}


def test_retrieval_study_scores_recall_at_k(etl_out):
    root, out = etl_out
    cfg = small_config(root, model={"type": "mf"}, tune={
        "enabled": True, "n_trials": 2, "space": {"epochs": [1, 1], "batch_size": [256], "embedding_dim": [8, 16]}})
    result = tune.run_study(cfg, out, root / "tune-mf")
    assert result.metric == "recall" and len(result.trials) == 2 and set(result.trials["state"]) == {"COMPLETE"}
    assert result.trials["value"].between(0, 1).all() and result.best_value == result.trials["value"].max()
    assert "logq_correction" in result.trials.columns and result.best_model.type == "mf"
    assert not any(p.name.startswith("trial-") for p in result.out_dir.iterdir())  # scratch models removed


def test_run_summary_names_the_best_trial():
    from pipeline_lib import report

    s = {"tune": {"metric": "auc", "best_trial": 5, "best_value": 0.7123456, "n_trials": 8,
                  "best_params": {"learning_rate": 0.00123456, "embedding_dim": 16}}}
    assert report.tune_line(s) == ("tune: best of 8 trials is #5, validation auc 0.7123 "
                                   "(learning_rate=0.001235, embedding_dim=16); trained with it")
    assert report.tune_line({}) is None
