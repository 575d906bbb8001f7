"""The promotion gate on real exported ensembles, scored from raw test rows: promoted / refused /
inconclusive by paired bootstrap intervals, and failing closed."""
import math

import pandas as pd
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
    # the flows score the test split (test_first_version_promotes); its ~600 rows cannot tell this
    # 1-epoch model (AUC ~0.58) from the untrained one (~0.51) with confidence, so the decisions below
    # score every raw row of the run (6,000): the gate's logic is the same for any rows
    raw = pd.read_parquet(trained.raw)
    score = functools.cache(lambda version_dir: gate.score_version(version_dir, raw, "click"))
    return good, worse, raw, gate.Scorer(score, len(raw))


def _decide(candidate, served_dir, served_version, scorer, metric, tolerance, baselines=None,
            model_name="candidate", baseline_metric=None, baseline_candidate=None, options=None, **units):
    """``gate.decide`` for ranking versions (the baseline value defaults to the candidate's score)."""
    value = scorer(candidate)[metric] if baseline_candidate is None else baseline_candidate
    baseline = None if baselines is None else gate.BaselineArgs(baselines, value, baseline_metric or metric,
                                                                model_name=model_name, **units)
    return gate.decide(candidate, served_dir, served_version, scorer, metric, tolerance, baseline,
                       options or gate.GateOptions(n_resamples=300, seed=1))


def test_first_version_promotes(versions, trained):
    good, _, _, _ = versions
    raw = pd.read_parquet(trained.split.test)
    scores = gate.ranking_scorer(raw, "click")  # the flows' scorer, on the test split
    d = _decide(good, None, None, scores, "auc", 0.0)
    assert d.promote and d.outcome == "promoted" and d.served is None and "first version" in d.reason
    assert d.n_rows == len(raw) and d.candidate == scores(good)["auc"]
    iv = d.candidate_interval  # the candidate's AUC on the test rows, with its bootstrap interval
    assert iv["lo"] < d.candidate < iv["hi"] and iv["n"] == len(raw) and iv["level"] == 0.95


def test_worse_candidate_is_refused_and_better_one_promoted(versions):
    good, worse, raw, scores = versions
    refused = _decide(worse, good, 1, scores, "auc", 0.0)
    assert not refused.promote and refused.outcome == "refused" and refused.candidate < refused.served
    assert refused.served == scores(good)["auc"] and "worse than served v1" in refused.reason
    # the paired interval of candidate - served lies below zero; "version 1 keeps serving"
    diff = refused.served_difference
    assert diff["hi"] < 0 and diff["n"] == len(raw) and "version 1 keeps serving" in refused.reason
    accepted = _decide(good, worse, 1, scores, "auc", 0.0)
    assert accepted.promote and accepted.outcome == "promoted" and "not worse than" in accepted.reason
    assert accepted.served_difference["lo"] > 0


def test_a_difference_inside_the_noise_is_inconclusive(versions):
    good, worse, _, scores = versions
    gap = scores(good)["auc"] - scores(worse)["auc"]
    # a tolerance at the observed gap: the interval of the difference spans -tolerance
    d = _decide(worse, good, 1, scores, "auc", tolerance=gap)
    assert d.outcome == "inconclusive" and not d.promote
    assert d.served_difference["lo"] < -gap < d.served_difference["hi"]
    assert "inside the noise" in d.reason and "version 1 keeps serving (gate.on_inconclusive: keep)" in d.reason
    anyway = _decide(worse, good, 1, scores, "auc", tolerance=gap, options=gate.GateOptions("promote", 300, 1))
    assert anyway.outcome == "inconclusive" and anyway.promote and "gate.on_inconclusive: promote" in anyway.reason
    # a tolerance beyond the whole interval promotes
    wide = _decide(worse, good, 1, scores, "auc", tolerance=-d.served_difference["lo"] + 1e-6)
    assert wide.outcome == "promoted" and wide.promote
    # the same version against itself: a difference of exactly zero (every resample) is not a regression
    same = _decide(good, good, 1, scores, "auc", 0.0)
    assert same.served_difference["lo"] == same.served_difference["hi"] == 0.0 and same.outcome == "promoted"


def test_tolerance_and_logloss_direction(versions):
    good, worse, _, scores = versions
    ll = _decide(worse, good, 1, scores, "logloss", 0.0)
    assert ll.candidate > ll.served and not ll.promote and ll.outcome == "refused" and not math.isnan(ll.served)
    assert ll.served_difference["hi"] < 0  # oriented: positive = the candidate is better (lower log loss)
    assert _decide(good, worse, 1, scores, "logloss", 0.0).outcome == "promoted"


def test_served_version_of_another_family_or_columns_is_the_one_case_that_promotes(versions, tmp_path):
    good, _, raw, scores = versions
    with pytest.raises(gate.CannotCompare, match="lacks column.*device"):
        gate.score_version(good, raw.drop(columns=["device"]), "click")
    # another family: a top-k (retrieval) version is served under this model name
    other = tmp_path / "3"
    (other / "topk").mkdir(parents=True)
    (other / "topk" / "spec.json").write_text('{"kind": "retrieval", "k": 10}')
    assert gate.version_kind(other) == "retrieval" and gate.version_kind(good) == "ranking"
    d = _decide(good, other, 3, gate.ranking_scorer(raw, "click"), "auc", 0.0)
    assert d.promote and d.outcome == "promoted" and d.served is None
    assert "served version 3 cannot be compared" in d.reason and "another family or other columns" in d.reason
    assert "is a retrieval model, this run's candidate a ranking one" in d.reason
    # other columns: the served version needs a column the test rows lack
    narrow = gate.Scorer(lambda v: scores(v) if v == good else gate.score_version(v, raw.drop(columns=["device"]),
                                                                                   "click"), len(raw))
    d = gate.decide(good, _copy(good, tmp_path / "4"), 4, narrow, "auc", 0.0)
    assert d.promote and "lacks column(s) ['device']" in d.reason


def _copy(version_dir, dest):
    import shutil

    shutil.copytree(version_dir, dest)
    return dest


def test_the_gate_fails_closed_on_any_other_error(versions, tmp_path):
    good, _, raw, scores = versions
    # a served folder that holds no version (deleted, or a half-written one)
    gone = _decide(good, tmp_path / "gone", 7, scores, "auc", 0.0)
    assert not gone.promote and gone.outcome == "refused" and gone.served is None
    assert "scoring served version 7 failed (FileNotFoundError" in gone.reason and "fails closed" in gone.reason
    # a corrupted served version: its ensemble does not load
    broken = _copy(good, tmp_path / "8")
    for f in (broken / "ensemble").rglob("*.pkl"):
        f.write_bytes(b"truncated")
    d = gate.decide(good, broken, 8, gate.ranking_scorer(raw, "click"), "auc", 0.0)
    assert not d.promote and d.outcome == "refused" and "scoring served version 8 failed" in d.reason
    # any exception from the scorer
    def flaky(v):
        if v != good:
            raise RuntimeError("disk on fire")
        return scores(v)
    d = gate.decide(good, tmp_path / "1", 1, gate.Scorer(flaky, len(raw)), "auc", 0.0)
    assert not d.promote and "RuntimeError: disk on fire" in d.reason and "version 1 keeps serving" in d.reason


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


def test_baselines_compared_by_a_paired_bootstrap_on_the_same_units(versions):
    """With per-unit data (the report's test rows), the baseline comparison is a paired interval:
    clearly better promotes, clearly worse refuses, inside the noise with nothing served promotes
    (a run ends serving something) and with a served version keeps it."""
    import numpy as np

    from pipeline_lib.models import intervals

    good, worse, raw, scores = versions
    u_good, u_worse = scores(good)["units"]["auc"], scores(worse)["units"]["auc"]
    cand, bad = scores(good)["auc"], scores(worse)["auc"]
    # the good model against a weak baseline (the untrained model's scores) and a strong one
    beats = _decide(good, None, None, scores, "auc", 0.0, baselines={"weak": {"auc": bad}}, model_name="dlrm",
                    model_units=u_good, baseline_units={"weak": u_worse}, unit="rows")
    assert beats.promote and beats.outcome == "promoted" and beats.baseline_check["difference"]["lo"] > 0
    assert "beats the best baseline weak" in beats.reason and "paired over" in beats.reason
    loses = _decide(worse, None, None, scores, "auc", 0.0, baselines={"strong": {"auc": cand}}, model_name="dlrm",
                    model_units=u_worse, baseline_units={"strong": u_good})
    assert not loses.promote and loses.outcome == "refused" and loses.reason.startswith("dlrm auc")
    assert "does not beat strong" in loses.reason
    # a baseline within noise of the model: per-unit hits of two draws of the same rate (seeded)
    rng = np.random.default_rng(1)
    u_model, u_near = (intervals.MeanUnits((rng.random(500) < 0.3).astype(float)) for _ in range(2))
    near = {"near": {"auc": intervals.point(u_near)}}
    first = _decide(good, None, None, scores, "auc", 0.0, baselines=near, baseline_candidate=intervals.point(u_model),
                    model_units=u_model, baseline_units={"near": u_near})
    assert first.baseline_check["passed"]  # ahead on the point values (0.318 vs 0.288) ...
    assert first.outcome == "inconclusive" and first.promote, first.reason  # ... but not beyond the noise
    assert "inside the noise" in first.reason
    assert "nothing is served yet: promoted, since a run must end serving something" in first.reason
    later = _decide(good, worse, 1, scores, "auc", 0.0, baselines=near, baseline_candidate=intervals.point(u_model),
                    model_units=u_model, baseline_units={"near": u_near})
    assert later.outcome == "inconclusive" and not later.promote and "version 1 keeps serving" in later.reason


def test_a_small_test_split_is_named_in_the_reason(versions):
    good, _, raw, scores = versions
    note = "the test split holds only 12 positive labels (fewer than 30, evaluation.min_positives): ..."
    d = gate.decide(good, None, None, scores, "auc", 0.0, None, gate.GateOptions(n_resamples=100), [note])
    assert d.reason.endswith(note) and d.warnings == [note]
