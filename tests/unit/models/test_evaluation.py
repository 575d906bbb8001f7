"""Baselines beside the model on the run's own split (pipeline_lib.models.evaluation)."""
import json
import shutil


from pipeline_lib.models import evaluation
from pipeline_lib.models import ranking as train


def test_ranking_run_reports_baselines_next_to_the_model(trained, tmp_path):
    # a copy of the shared fixture's model output: the comparison rewrites metrics.json and the plot
    shutil.copy(trained.model.metrics_path, tmp_path / "metrics.json")
    model = train.TrainOutput(trained.model.model_dir, dict(trained.model.metrics), dict(trained.model.history),
                              tmp_path / "metrics.json")
    report = evaluation.compare_with_baselines(trained.cfg, trained.split.train, trained.split.valid, model)
    assert report.family == "ranking" and report.metric == "auc"
    assert set(report.baselines) == {"logistic_regression", "item_click_rate"}
    for r in report.baselines.values():
        assert 0.0 <= r["auc"] <= 1.0 and r["logloss"] > 0 and r["n_valid"] == trained.model.metrics["n_valid"]
    assert report.model["auc"] == trained.model.metrics["auc"]
    assert report.lift.startswith(f"dlrm auc {trained.model.metrics['auc']:.4f} is ")
    assert "best baseline" in report.lift
    saved = json.loads((tmp_path / "metrics.json").read_text())
    assert saved["metrics"]["baselines"]["logistic_regression"]["auc"] == report.baselines["logistic_regression"]["auc"]
    assert saved["metrics"]["lift"] == report.lift and saved["baseline_comparison"]["metric"] == "auc"
    assert "history" in saved and (tmp_path / "learning_curve.png").stat().st_size > 0
    lines = evaluation.reference_lines(report, ("loss", "auc"))
    assert lines["auc"]["logistic_regression"] == report.baselines["logistic_regression"]["auc"]
    assert lines["loss"]["item_click_rate"] == report.baselines["item_click_rate"]["logloss"]
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
