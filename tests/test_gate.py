"""The promotion gate on real exported ensembles, scored from raw validation rows."""
import math

import pytest

from pipeline_lib import export, gate, train


@pytest.fixture(scope="module")
def versions(trained, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("gate")
    rows = trained.valid_rows(32)
    good = export.export_ensemble(trained.etl.workflow_dir, trained.model.model_dir, rows, "click",
                                  tmp / "good", "recsys", 1).version_dir
    worse_cfg = trained.cfg.model.model_copy(update={"learning_rate": 1e-9})
    worse_model = train.train(trained.etl.train_dir, trained.etl.valid_dir, worse_cfg, "click", 3, tmp / "m").model_dir
    worse = export.export_ensemble(trained.etl.workflow_dir, worse_model, rows, "click", tmp / "worse", "recsys", 1).version_dir
    import pandas as pd

    raw = pd.read_parquet(trained.split.valid)
    return good, worse, raw


def test_first_version_promotes(versions):
    good, _, raw = versions
    d = gate.decide(good, None, None, raw, "click", "auc", 0.0)
    assert d.promote and d.served is None and "first version" in d.reason and d.n_rows == len(raw)


def test_worse_candidate_is_refused_and_better_one_promoted(versions, trained):
    good, worse, raw = versions
    refused = gate.decide(worse, good, 1, raw, "click", "auc", 0.0)
    assert not refused.promote and refused.candidate < refused.served
    # the served score is the served ensemble's AUC on these raw rows == offline metrics of that model
    assert refused.served == pytest.approx(trained.model.metrics["auc"], abs=1e-6)
    accepted = gate.decide(good, worse, 1, raw, "click", "auc", 0.0)
    assert accepted.promote and "not worse than" in accepted.reason


def test_tolerance_and_logloss_direction(versions):
    good, worse, raw = versions
    gap = gate.score_version(good, raw, "click")["auc"] - gate.score_version(worse, raw, "click")["auc"]
    assert gate.decide(worse, good, 1, raw, "click", "auc", tolerance=gap + 1e-6).promote
    ll = gate.decide(worse, good, 1, raw, "click", "logloss", 0.0)
    assert ll.candidate > ll.served and not ll.promote and not math.isnan(ll.served)


def test_served_version_that_cannot_score_the_data_does_not_block(versions, tmp_path):
    good, _, raw = versions
    with pytest.raises(KeyError, match="lacks column.*device"):
        gate.score_version(good, raw.drop(columns=["device"]), "click")
    d = gate.decide(good, tmp_path / "gone", 7, raw, "click", "auc", 0.0)
    assert d.promote and d.served is None and "served version 7 cannot score this data" in d.reason
