"""The promotion gate on real exported ensembles, scored from raw validation rows."""
import math

import pytest

from pipeline_lib.export import ranking as export
from pipeline_lib.release import gate


@pytest.fixture(scope="module")
def versions(trained, untrained, exported, tmp_path_factory):
    """The shared run's exported version (tests/conftest.py `exported`) and the untrained model's, the
    raw validation rows, and a scorer that scores each version once for the module: the gate's decisions
    below differ in metric, tolerance and baselines, not in the scores (gate.ranking_scorer's own scoring
    is checked in test_first_version_promotes). The worse version is exported without the compiled model:
    the gate scores whole validation splits, which the SavedModel serves."""
    import functools

    import pandas as pd

    good = exported[0].version_dir
    worse = export.export_ensemble(trained.etl.workflow_dir, untrained.model_dir, trained.valid_rows(32), "click",
                                   tmp_path_factory.mktemp("gate") / "worse", "recsys", 1,
                                   export.ExportOptions(compiled_model="off")).version_dir
    raw = pd.read_parquet(trained.split.valid)
    score = functools.cache(lambda version_dir: gate.score_version(version_dir, raw, "click"))
    return good, worse, raw, gate.Scorer(score, len(raw))


def _decide(candidate, served_dir, served_version, scorer, metric, tolerance, baselines=None,
            model_name="candidate", baseline_metric=None, baseline_candidate=None):
    """``gate.decide`` for ranking versions (the baseline value defaults to the candidate's score)."""
    value = scorer(candidate)[metric] if baseline_candidate is None else baseline_candidate
    baseline = None if baselines is None else gate.BaselineArgs(baselines, value, baseline_metric or metric,
                                                                model_name=model_name)
    return gate.decide(candidate, served_dir, served_version, scorer, metric, tolerance, baseline)


def test_first_version_promotes(versions):
    good, _, raw, scores = versions
    d = _decide(good, None, None, gate.ranking_scorer(raw, "click"), "auc", 0.0)  # the flows' scorer
    assert d.promote and d.served is None and "first version" in d.reason and d.n_rows == len(raw)
    assert d.candidate == scores(good)["auc"]


def test_worse_candidate_is_refused_and_better_one_promoted(versions, trained):
    good, worse, _, scores = versions
    refused = _decide(worse, good, 1, scores, "auc", 0.0)
    assert not refused.promote and refused.candidate < refused.served
    # the served score is the served ensemble's AUC on these raw rows == offline metrics of that model
    assert refused.served == pytest.approx(trained.model.metrics["auc"], abs=1e-6)
    accepted = _decide(good, worse, 1, scores, "auc", 0.0)
    assert accepted.promote and "not worse than" in accepted.reason


def test_tolerance_and_logloss_direction(versions):
    good, worse, _, scores = versions
    gap = scores(good)["auc"] - scores(worse)["auc"]
    assert _decide(worse, good, 1, scores, "auc", tolerance=gap + 1e-6).promote
    ll = _decide(worse, good, 1, scores, "logloss", 0.0)
    assert ll.candidate > ll.served and not ll.promote and not math.isnan(ll.served)


def test_served_version_that_cannot_score_the_data_does_not_block(versions, tmp_path):
    good, _, raw, scores = versions
    with pytest.raises(KeyError, match="lacks column.*device"):
        gate.score_version(good, raw.drop(columns=["device"]), "click")
    d = _decide(good, tmp_path / "gone", 7, scores, "auc", 0.0)
    assert d.promote and d.served is None and "served version 7 cannot score this data" in d.reason


# -- the baselines: a candidate that does not beat the best one is refused, first run included ------


def test_check_baselines_directions_margin_and_skipped_entries():
    b = {"logistic_regression": {"auc": 0.71, "logloss": 0.60}, "item_click_rate": {"auc": 0.65, "logloss": 0.64},
         "broken": {"skipped": "no item column"}}
    no = gate.check_baselines("dlrm", "auc", 0.70, b)
    assert not no["passed"] and no["best"] == "logistic_regression"
    assert no["reason"].startswith("dlrm auc 0.70000 does not beat logistic_regression 0.71000")
    yes = gate.check_baselines("dlrm", "auc", 0.75, b)
    assert yes["passed"] and "beats the best baseline logistic_regression" in yes["reason"]
    assert not gate.check_baselines("dlrm", "auc", 0.71, b)["passed"]              # a tie does not beat
    assert not gate.check_baselines("dlrm", "auc", 0.75, b, min_lift=0.10)["passed"]  # needs > 0.781
    assert gate.check_baselines("dlrm", "logloss", 0.59, b)["passed"]              # lower is better
    assert not gate.check_baselines("dlrm", "logloss", 0.61, b)["passed"]
    assert not gate.check_baselines("dlrm", "auc", float("nan"), b)["passed"]
    assert gate.check_baselines("dlrm", "auc", 0.5, {"x": {"skipped": "why"}})["passed"]  # nothing to compare
    assert gate.check_baselines("m", "recall@10", 0.2, {"ease": {"recall@10": 0.1}})["passed"]


def test_first_version_that_does_not_beat_the_best_baseline_is_refused(versions):
    good, worse, _, scores = versions
    cand = scores(good)["auc"]
    baselines = {"logistic_regression": {"auc": cand + 0.01}, "item_click_rate": {"auc": cand - 0.05}}
    d = _decide(good, None, None, scores, "auc", 0.0, baselines=baselines, model_name="dlrm")
    assert not d.promote and d.served is None
    assert d.reason.startswith(f"dlrm auc {cand:.5f} does not beat logistic_regression {cand + 0.01:.5f}")
    assert d.baseline_check["best"] == "logistic_regression" and not d.baseline_check["passed"]
    # beating it: the first version promotes, and the reason says both
    ok = _decide(good, None, None, scores, "auc", 0.0, baselines={"lr": {"auc": cand - 0.01}},
                     model_name="dlrm")
    assert ok.promote and "beats the best baseline lr" in ok.reason and "first version promotes" in ok.reason
    # a candidate better than the served version is still refused when a baseline is better than both
    refused = _decide(good, worse, 1, scores, "auc", 0.0, baselines=baselines)
    assert not refused.promote and refused.served is not None and "does not beat" in refused.reason
    # the value compared with the baselines can come from the baselines' own protocol
    other = _decide(good, None, None, scores, "auc", 0.0, baselines={"lr": {"recall@10": 0.3}},
                        baseline_metric="recall@10", baseline_candidate=0.2)
    assert not other.promote and "recall@10 0.20000 does not beat lr 0.30000" in other.reason


def test_a_refused_first_run_says_nothing_is_served_without_contradiction():
    from pipeline_lib.release.gate import GateDecision, with_baselines

    d = GateDecision(promote=True, served=None, reason="nothing served yet: first version promotes", metric="auc",
                     candidate=0.6, served_version=None, tolerance=0.0, n_rows=10)
    d = with_baselines(d, {"lr": {"auc": 0.7}}, 0.6, "auc")
    assert not d.promote and "promotes" not in d.reason and "nothing is served yet" in d.reason
