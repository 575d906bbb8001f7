"""The honest protocol: every choice (early stopping, best epoch, tuning trials) sees validation
data only; the reported figures and the gate see test data only (docs/evaluation.md)."""
import dataclasses
from pathlib import Path

import pandas as pd
import pytest

from pipeline_lib.etl import workflow as etl
from pipeline_lib.families import get_family
from pipeline_lib.models import ranking as ranking_model
from pipeline_lib.models import classical, retrieval, tune


class Spy:
    def __init__(self, result=None):
        self.calls, self.result = [], result

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.result


def _paths(call) -> set:
    args, kwargs = call
    return {str(Path(a)) for a in list(args) + list(kwargs.values()) if isinstance(a, (str, Path))}


@pytest.fixture
def poisoned(trained, tmp_path):
    """The shared run's ETL output whose test split is a file any reader fails on."""
    test = tmp_path / "test.parquet"
    test.write_bytes(b"not parquet: the test split must not be read while choosing")
    split = dataclasses.replace(trained.etl.split, test=test)
    return dataclasses.replace(trained.etl, split=split)


def test_ranking_and_retrieval_training_see_validation_only(trained, poisoned, monkeypatch, tmp_path):
    from pipeline_lib.paths import new_run

    spy = Spy()
    monkeypatch.setattr(ranking_model, "train", spy)
    fam = get_family(trained.cfg)
    fam.fit(new_run(trained.cfg.model_copy(update={"runs_dir": tmp_path})), poisoned)
    (args, _), = spy.calls
    assert args[0] == poisoned.train_dir and args[1] == poisoned.valid_dir  # early stopping / best epoch on valid
    assert str(poisoned.split.test) not in _paths(spy.calls[0])

    rspy = Spy()
    monkeypatch.setattr(retrieval, "train", rspy)
    rcfg = trained.cfg.model_copy(update={"model": trained.cfg.model.model_copy(update={"type": "two_tower"}),
                                          "runs_dir": tmp_path})
    get_family(rcfg).fit(new_run(rcfg), poisoned)
    (args, _), = rspy.calls
    assert Path(args[3]) == Path(poisoned.split.valid) and Path(args[2]) == Path(poisoned.split.train)
    assert str(poisoned.split.test) not in _paths(rspy.calls[0])

    cspy = Spy()  # mult_dae: its best epoch on the raw validation split (classical.train's protocol)
    monkeypatch.setattr(classical, "train", cspy)
    dcfg = rcfg.model_copy(update={"model": rcfg.model.model_copy(update={"type": "mult_dae"})})
    get_family(dcfg).fit(new_run(dcfg), poisoned)
    (args, _), = cspy.calls
    assert Path(args[0]) == Path(poisoned.split.train) and Path(args[1]) == Path(poisoned.split.valid)
    assert str(poisoned.split.test) not in _paths(cspy.calls[0])


def test_tuning_trials_read_validation_only(trained, poisoned, monkeypatch, tmp_path):
    """A real one-trial study on the shared run: it never opens the test split (poisoned), and every
    dataset it reads is train or validation."""
    read = []
    real = tune.parquet_dataset
    monkeypatch.setattr(tune, "parquet_dataset", lambda p: read.append(Path(p)) or real(p))
    cfg = trained.cfg.model_copy(update={"tune": trained.cfg.tune.model_copy(update={"enabled": True, "n_trials": 1})})
    result = tune.run_study(cfg, poisoned, tmp_path / "tune")
    assert len(result.trials) == 1 and set(read) == {Path(poisoned.train_dir), Path(poisoned.valid_dir)}


def test_reported_figures_and_the_gate_use_the_test_split(trained, poisoned):
    fam = get_family(trained.cfg)
    rows = fam.gate_rows(trained.etl)
    test = pd.read_parquet(trained.split.test)
    assert len(rows) == len(test) and rows.equals(test.head(len(rows)))
    with pytest.raises(Exception):  # the gate reads the test split: the poisoned one fails
        fam.gate_rows(poisoned)
    sizes = fam.split_report(trained.etl)
    n = len(pd.read_parquet(trained.raw))
    assert sizes["train"]["rows"] + sizes["valid"]["rows"] + sizes["test"]["rows"] == n
    assert sizes["test"]["rows"] == len(test) and sizes["test"]["positives"] == int((test["click"] > 0).sum())
    assert sizes["warnings"] == []  # hundreds of positives in each held-out split of the small run


def test_a_held_out_split_too_small_is_named(trained, tmp_path):
    tiny = tmp_path / "tiny.parquet"
    pd.read_parquet(trained.split.test).head(20).to_parquet(tiny)
    out = dataclasses.replace(trained.etl, split=dataclasses.replace(trained.etl.split, test=tiny))
    warnings = get_family(trained.cfg).split_report(out)["warnings"]
    assert len(warnings) == 1 and warnings[0].startswith("the test split holds only ")
    assert "positive labels (fewer than 30, evaluation.min_positives)" in warnings[0]


def test_etl_output_carries_the_raw_test_split(trained):
    assert isinstance(trained.etl.split, etl.SplitPaths) and Path(trained.etl.split.test).is_file()
    assert not (Path(trained.etl.workflow_dir).parent / "test").exists()  # test rows are never transformed


def test_candidate_choice_reads_validation_only(trained, tmp_path):
    """Two real classical candidates (closed form, no TensorFlow) trained on the shared run, twice: with the
    run's test split, then with a test split of fewer rows. Each candidate's choice figure is its validation
    per-user recall and does not move with the test split; only the reported test figure does."""
    from pipeline_lib.families import candidates
    from pipeline_lib.paths import new_run

    def compete(etl_out, sub: str) -> list:
        runs = []
        for kind in ("ease", "item_knn"):
            cfg = trained.cfg.model_copy(update={"model": trained.cfg.model.model_copy(update={"type": kind}),
                                                 "runs_dir": tmp_path / sub})
            fam = get_family(cfg)
            fam.latency_probe = lambda *a: None  # not what this test is about
            runs.append(candidates.train_candidate(kind, fam, new_run(cfg), etl_out))
        return runs

    first = compete(trained.etl, "a")
    other = tmp_path / "other_test.parquet"  # half of the test rows in the test split's place: other figures
    test = pd.read_parquet(trained.split.test)  # (not the validation rows: they are the test-time history)
    test.head(len(test) // 2).to_parquet(other)
    swapped = dataclasses.replace(trained.etl, split=dataclasses.replace(trained.etl.split, test=other))
    second = compete(swapped, "b")
    for a, b in zip(first, second):
        assert a.error is None and b.error is None, (a.error, b.error)
        assert a.metric == b.metric  # the choice figure: validation only
        assert a.metric == a.trained.model.metrics["user_recall@10"]  # what training measured on validation
        assert a.test["value"] != b.test["value"]  # the test figure follows the test split
    assert candidates.decide("user_recall@10", first).winner.name == candidates.decide("user_recall@10", second).winner.name
