"""Candidates: config resolution and validation, training each in its own folder (a failure is a row),
the choice on validation (ties: the first listed) and the leaderboard (rows, table, chart, markdown).
A fake family trains instantly; the real competition runs in tests/integration/test_candidates.py."""
from __future__ import annotations

import itertools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pandas as pd
import pytest
from pydantic import ValidationError

from pipeline_lib.config import load_config
from pipeline_lib.families import RetrievalFamily, SessionFamily, Trained, get_family
from pipeline_lib.families import candidates as cands
from pipeline_lib.models.evaluation import BaselineReport
from pipeline_lib.paths import RunPaths


# -- config ---------------------------------------------------------------------------------------

def test_a_default_retrieval_and_session_run_compete_deep_against_classical():
    r = load_config(None, {"task": "retrieval"})
    assert r.family == "retrieval" and r.model.type == "two_tower"
    assert [c.type for c in r.candidates][:2] == ["two_tower", "mult_dae"]
    assert all(c.type not in ("youtube_dnn", "mult_vae") for c in r.candidates)
    s = load_config(None, {"task": "session"})
    assert s.family == "session" and [c.type for c in s.candidates][:2] == ["gru", "transformer"]
    # every type the config accepts beyond the deep ones joins by name (classical retrieval / session types)
    from pipeline_lib.config import (DEEP_RETRIEVAL_MODELS, DEEP_SESSION_MODELS, RETRIEVAL_MODELS, ModelConfig,
                                     SessionModelConfig, accepted_types)
    assert [c.type for c in r.candidates][2:] == [t for t in accepted_types(ModelConfig)
                                                  if t in RETRIEVAL_MODELS and t not in DEEP_RETRIEVAL_MODELS]
    assert [c.type for c in s.candidates][2:] == [t for t in accepted_types(SessionModelConfig)
                                                  if t not in DEEP_SESSION_MODELS]


@pytest.mark.parametrize("overrides", [
    {},                                                            # ranking default: one model
    {"model": {"type": "two_tower"}},                              # an explicit model.type: one model
    {"task": "retrieval", "model": {"type": "mf"}},
    {"task": "session", "session": {"model": {"type": "gru"}}},
])
def test_an_explicit_model_type_keeps_the_single_model_run(overrides):
    assert load_config(None, overrides).candidates is None


def test_candidates_are_resolved_once_and_survive_the_saved_config():
    cfg = load_config(None, {"model": {"candidates": [{"type": "mf"}, {"type": "mf", "overrides": {
        "embedding_dim": 32}}, {"type": "two_tower", "name": "tt"}]}})
    assert cfg.family == "retrieval" and cfg.model.type == "mf"                # the family follows the list
    fam = get_family(cfg)
    named = cands.candidate_families(fam)
    assert [n for n, _ in named] == ["mf", "mf_2", "tt"]
    assert [f.cfg.model.embedding_dim for _, f in named] == [16, 32, 16]
    assert all(f.cfg.candidates is None and type(f) is RetrievalFamily for _, f in named)
    again = load_config(None, cfg.model_dump(mode="json"))
    assert again.candidates == cfg.candidates and again.model.type == "mf"
    auto = load_config(None, {"model": {"type": "dcn", "candidates": "auto"}})
    assert [c.type for c in auto.candidates][0] == "dcn" and auto.family == "ranking"


def test_session_candidates_replace_the_session_model():
    cfg = load_config(None, {"task": "session", "session": {"model": {"candidates": [
        {"type": "gru", "overrides": {"hidden_dim": 8}}, {"type": "transformer"}]}}})
    named = cands.candidate_families(get_family(cfg))
    assert [(n, f.cfg.session.model.type, f.cfg.session.model.hidden_dim) for n, f in named] == [
        ("gru", "gru", 8), ("transformer", "transformer", 64)]
    assert all(type(f) is SessionFamily and f.selection_metric == "recall@10" for _, f in named)


@pytest.mark.parametrize("overrides, message", [
    ({"model": {"candidates": [{"type": "mf"}, {"type": "dlrm"}]}}, "mixes ranking and retrieval"),
    ({"model": {"candidates": [{"type": "mf", "overrides": {"embeding_dim": 8}}]}}, "candidate 'mf'.*embeding_dim"),
    ({"model": {"candidates": [{"type": "lightgcn"}]}}, "candidate 'lightgcn'"),
    ({"model": {"candidates": [{"type": "mf", "overrides": {"type": "dlrm"}}]}}, "may not set"),
    ({"model": {"candidates": []}}, "at least one candidate"),
    ({"model": {"type": "dlrm", "candidates": [{"type": "mf"}]}}, "different families"),
    ({"task": "retrieval", "model": {"type": "dcn"}}, "task: retrieval needs a retrieval model.type"),
    ({"model": {"candidates": [{"type": "youtube_dnn", "overrides": {"retrieval": {"history_length": 5}}}]}},
     "one ETL output serves every candidate"),
    ({"tune": {"enabled": True}, "model": {"candidates": [{"type": "dlrm"}, {"type": "dcn"}]}}, "tune searches one"),
    ({"task": "session", "session": {"model": {"candidates": [{"type": "gru", "overrides": {"dropout": 2}}]}}},
     "candidate 'gru'.*dropout"),
])
def test_bad_candidates_are_refused_naming_the_candidate(overrides, message):
    with pytest.raises(ValidationError, match=f"(?s){message}"):
        load_config(None, overrides)


def test_one_etl_output_serves_every_candidate():
    """youtube_dnn among the candidates: the run's ETL adds the history list for all of them."""
    plain = get_family(load_config(None, {"model": {"candidates": [{"type": "mf"}, {"type": "two_tower"}]}}))
    mixed = get_family(load_config(None, {"model": {"candidates": [{"type": "mf"}, {"type": "youtube_dnn"}]}}))
    assert plain.history_length == 0 and mixed.history_length == 20
    assert plain.selection_metric == "user_recall@10" and get_family(load_config(None, {})).selection_metric == "auc"


# -- competition with a fake family -----------------------------------------------------------------

@dataclass
class FakeModel:
    model_dir: Path
    metrics: dict
    metrics_path: Path = None


class FakeFamily(RetrievalFamily):
    """Trains instantly: writes a model file and reports a preset validation score (or raises)."""

    scores: dict[str, Any] = {}
    intervals: dict[str, tuple[float, float]] = {}

    def train(self, paths: RunPaths, etl_out: Any) -> Trained:
        score = self.scores[self.cfg.model.type]
        if isinstance(score, Exception):
            raise score
        (paths.model / "model").mkdir(parents=True, exist_ok=True)
        (paths.model / "model" / "weights.bin").write_bytes(b"x" * 1234)
        baselines = BaselineReport("retrieval", self.cfg.model.type, "recall@10", True, {}, {}, "no baselines (fake)")
        return Trained(FakeModel(paths.model / "model", {"user_recall@10": score}), baselines)

    def smoke_rows(self, etl_out: Any, n: int) -> pd.DataFrame:
        return pd.DataFrame({"user_id": [1]}).head(n)

    def selection_interval(self, trained: Trained, etl_out: Any):
        return self.intervals.get(self.cfg.model.type)

    def latency_probe(self, paths, etl_out, trained):
        return lambda rows: len(rows)


def fake_family(scores: dict[str, Any], types: list[str], intervals: Optional[dict] = None) -> FakeFamily:
    FakeFamily.scores, FakeFamily.intervals = scores, intervals or {}
    return FakeFamily(load_config(None, {"model": {"candidates": [{"type": t} for t in types]}}))


def compete(tmp_path: Path, scores: dict[str, Any], types: list[str],
            intervals: Optional[dict] = None) -> cands.Competition:
    fam = fake_family(scores, types, intervals)
    ticks = itertools.count()
    clock = lambda: 0.5 * next(ticks)  # noqa: E731 - every call half a second later
    runs = [cands.train_candidate(n, f, RunPaths(tmp_path), None, clock) for n, f in cands.candidate_families(fam)]
    return cands.decide(fam.selection_metric, runs)


def test_the_best_on_validation_wins_each_in_its_own_folder(tmp_path):
    comp = compete(tmp_path, {"mf": 0.2, "two_tower": 0.3}, ["mf", "two_tower"])
    assert comp.winner.name == "two_tower" and comp.winner.family.cfg.model.type == "two_tower"
    assert comp.winner.trained.model.model_dir == tmp_path / "model" / "candidates" / "two_tower" / "model"
    rows = comp.rows()
    assert [(r["candidate"], r["value"], r["winner"]) for r in rows] == [("mf", 0.2, False), ("two_tower", 0.3, True)]
    assert rows[0]["size_bytes"] == 1234 and rows[0]["train_seconds"] == 0.5 and rows[0]["latency_ms"] == 500.0
    assert rows[0]["metric"] == "user_recall@10" and rows[0]["ci_low"] is None and rows[0]["error"] is None


def test_ties_go_to_the_first_listed_and_a_failure_is_a_row(tmp_path):
    comp = compete(tmp_path, {"mf": 0.3, "two_tower": 0.3, "youtube_dnn": RuntimeError("out of memory")},
                   ["youtube_dnn", "mf", "two_tower"])
    assert comp.winner.name == "mf"
    failed = comp.rows()[0]
    assert failed["error"] == "RuntimeError: out of memory" and failed["value"] is None and not failed["winner"]
    assert cands.leaderboard_table(comp)[0]["validation user_recall@10 (choice)"] == ""


def test_no_candidate_trained_names_every_error(tmp_path):
    with pytest.raises(cands.NoCandidateTrained, match="mf: ValueError: bad.*two_tower: KeyError"):
        compete(tmp_path, {"mf": ValueError("bad"), "two_tower": KeyError("x")}, ["mf", "two_tower"])


def test_the_family_interval_hook_fills_the_leaderboard(tmp_path):
    """TaskFamily.selection_interval (the protocol's bootstrap) gives each row its CI; the point estimate
    still picks the winner."""
    comp = compete(tmp_path, {"mf": 0.2, "two_tower": 0.3}, ["mf", "two_tower"], {"mf": (0.1, 0.35)})
    rows = comp.rows()
    assert (rows[0]["ci_low"], rows[0]["ci_high"], rows[1]["ci_low"]) == (0.1, 0.35, None) and rows[1]["winner"]


def test_pick_winner_ignores_nan():
    runs = [cands.CandidateRun("a", "mf", metric=math.nan), cands.CandidateRun("b", "mf", metric=0.1)]
    assert cands.pick_winner(runs) == 1


def test_latency_not_measured_when_the_probe_fails(tmp_path):
    fam = fake_family({"mf": 0.1}, ["mf"])
    fam.latency_probe = lambda *a: (lambda rows: 1 / 0)
    assert cands.measure_latency(fam, RunPaths(tmp_path), None, None) is None
    fam.latency_probe = lambda *a: None
    assert cands.measure_latency(fam, RunPaths(tmp_path), None, None) is None


def test_leaderboard_table_chart_and_intervals(tmp_path):
    comp = compete(tmp_path, {"mf": 0.2, "two_tower": 0.3, "youtube_dnn": RuntimeError("boom")},
                   ["mf", "two_tower", "youtube_dnn"])
    cands.set_intervals(comp, {"mf": (0.15, 0.25), "two_tower": (0.26, 0.34)})
    rows = comp.rows()
    assert (rows[0]["ci_low"], rows[0]["ci_high"], rows[2]["ci_low"]) == (0.15, 0.25, None)
    table = cands.leaderboard_table(comp)
    assert table[1]["candidate"] == "two_tower (winner)" and table[0]["test [95% CI] (reported)"] == ""
    assert table[0]["validation user_recall@10 (choice)"] == "0.2" and table[2]["error"] == "RuntimeError: boom"
    png = cands.plot_leaderboard(comp, tmp_path / "leaderboard.png")
    assert png.read_bytes()[:4] == b"\x89PNG"
    md = cands.leaderboard_markdown(comp, png)
    assert "| two_tower (winner) |" in md and "data:image/png;base64," in md and "winner (**two_tower**)" in md
    text = cands.leaderboard_text(comp)
    assert "winner: two_tower (two_tower)" in text and "boom" in text
    from pipeline_lib import report
    line = report.leaderboard_line({"leaderboard": rows})
    assert line == ("candidates, validation user_recall@10: mf 0.2 [0.15, 0.25], two_tower 0.3 [0.26, 0.34] "
                    "(winner), youtube_dnn failed (RuntimeError: boom)")
    assert report.leaderboard_line({}) is None


def test_ranking_latency_is_the_offline_path_on_one_row(trained):
    """The ranking probe scores like export's offline reference (workflow + SavedModel, loaded once)."""
    import nvtabular as nvt

    from pipeline_lib.export import ranking as export
    from pipeline_lib.families import RankingFamily

    fam, paths = RankingFamily(trained.cfg), RunPaths(trained.root)
    model = Trained(trained.model, baselines=None)
    rows = trained.valid_rows(3)
    expected = export.offline_scores(nvt.Workflow.load(str(trained.etl.workflow_dir)), trained.model.model_dir, rows,
                                     "click")
    assert abs(fam.latency_probe(paths, trained.etl, model)(rows) - expected).max() < 1e-6
    assert 0 < cands.measure_latency(fam, paths, trained.etl, model) < 10_000


def test_the_leaderboard_reports_each_candidates_test_figure_with_its_interval(tmp_path):
    """The choice is on validation; the row also shows the test figure and its bootstrap interval that the
    candidate's baseline report computed (what a user reads), in summary rows, the table and the chart."""
    from types import SimpleNamespace

    report = SimpleNamespace(metric="recall@10", intervals={"model": {"recall@10": {
        "value": 0.21, "lo": 0.19, "hi": 0.23, "n": 300, "level": 0.95}}})
    fig = cands.test_figure(SimpleNamespace(baselines=report))
    assert fig == {"metric": "recall@10", "value": 0.21, "lo": 0.19, "hi": 0.23, "level": 0.95}
    assert cands.test_figure(SimpleNamespace(baselines=SimpleNamespace(metric="auc", intervals={}))) is None
    comp = compete(tmp_path, {"mf": 0.2, "two_tower": 0.3}, ["mf", "two_tower"])
    comp.runs[1].test = fig
    row = comp.rows()[1]
    assert (row["test_metric"], row["test_value"], row["test_ci_low"], row["test_ci_high"]) == ("recall@10", 0.21, 0.19, 0.23)
    assert cands.leaderboard_table(comp)[1]["test [95% CI] (reported)"] == "recall@10 0.21 [0.19, 0.23]"
    assert cands.plot_leaderboard(comp, tmp_path / "lb.png").read_bytes()[:4] == b"\x89PNG"
