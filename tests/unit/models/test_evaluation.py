"""Baselines beside the model on the run's own split (pipeline_lib.models.evaluation)."""
import json
import shutil


import pandas as pd
import pytest
from sklearn.metrics import roc_auc_score

from pipeline_lib.etl import workflow as etl
from pipeline_lib.export import ranking as export
from pipeline_lib.models import evaluation
from pipeline_lib.models import ranking as train


def test_ranking_run_reports_baselines_next_to_the_model(trained, tmp_path):
    # a copy of the shared fixture's model output: the comparison rewrites metrics.json and the plot
    shutil.copy(trained.model.metrics_path, tmp_path / "metrics.json")
    model = train.TrainOutput(trained.model.model_dir, dict(trained.model.metrics), dict(trained.model.history),
                              tmp_path / "metrics.json")
    report = evaluation.compare_with_baselines(trained.cfg, trained.split.train, trained.split.test, model,
                                               trained.etl.workflow_dir)
    assert report.family == "ranking" and report.metric == "auc" and report.split == "test" and report.unit == "rows"
    assert set(report.baselines) == {"logistic_regression", "item_click_rate"}
    test = pd.read_parquet(trained.split.test)
    for r in report.baselines.values():  # fitted on train, scored on the test rows
        assert 0.0 <= r["auc"] <= 1.0 and r["logloss"] > 0 and r["n_valid"] == len(test)
    # the model scored on the same raw test rows (workflow + SavedModel): its AUC is sklearn's on them
    scores = export.offline_scores(etl.load_workflow(trained.etl.workflow_dir), trained.model.model_dir, test, "click")
    assert report.model["auc"] == pytest.approx(roc_auc_score(test["click"], scores), abs=1e-9)
    assert report.model["n_test"] == len(test) and report.model["auc"] != trained.model.metrics["auc"]  # not validation
    assert report.lift.startswith(f"dlrm auc {report.model['auc']:.4f} is ")
    assert "best baseline" in report.lift and "paired bootstrap over" in report.lift and "test split" in report.lift
    # every figure has its interval: the model and each baseline, on auc and log loss; the lift its paired one
    for method in ("model", "logistic_regression", "item_click_rate"):
        for m in ("auc", "logloss"):
            iv = report.intervals[method][m]
            assert iv["lo"] <= iv["value"] <= iv["hi"] and iv["n"] == len(test), (method, m)
    assert report.intervals["model"]["auc"]["value"] == pytest.approx(report.model["auc"])
    assert report.lift_interval["baseline"] == report.best()[0] and report.lift_interval["n"] == len(test)
    assert report.interval_text("model", "auc").count("[") == 1
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["metrics"]["baselines"]["logistic_regression"]["auc"] == report.baselines["logistic_regression"]["auc"]
    assert saved["metrics"]["lift"] == report.lift and saved["baseline_comparison"]["metric"] == "auc"
    assert saved["metrics"]["test"]["auc"] == report.model["auc"] and "auc" in saved["metrics"]["test_intervals"]
    assert "units" not in saved["baseline_comparison"]  # per-unit data stays in memory
    assert "history" in saved and (tmp_path / "learning_curve.png").stat().st_size > 0
    lines = evaluation.reference_lines(report, ("loss", "auc"))  # the learning curve's lines: test figures
    assert lines["auc"]["logistic_regression (test)"] == report.baselines["logistic_regression"]["auc"]
    assert lines["loss"]["item_click_rate (test)"] == report.baselines["item_click_rate"]["logloss"]
    assert lines["auc"]["dlrm (final, test)"] == report.model["auc"]
    assert report.best() == max(((n, r["auc"]) for n, r in report.baselines.items()), key=lambda x: x[1])
    rows = report.table()
    assert rows[0]["method"] == "dlrm (model)" and {r["method"] for r in rows[1:]} == set(report.baselines)


def test_plot_draws_reference_lines(tmp_path):
    import matplotlib.pyplot as plt

    calls = []
    real = plt.Axes.axhline

    def spy(self, y=0, *a, **kw):
        calls.append((y, kw.get("label")))
        return real(self, y, *a, **kw)

    plt.Axes.axhline = spy
    try:
        train.plot_learning_curve({"loss": [0.7, 0.6], "val_auc": [0.6, 0.7]}, tmp_path / "c.png",
                                  references={"auc": {"logistic_regression": 0.65}})
    finally:
        plt.Axes.axhline = real
    assert calls == [(0.65, "logistic_regression 0.6500")]
    assert (tmp_path / "c.png").stat().st_size > 0
