"""What a person reads: silenced library noise (and only that), per-epoch lines, rounded figures,
the CLI's closing summary and the markdown of the Prefect artifacts."""
import base64
import json
import logging
import warnings

import numpy as np
import pandas as pd

from pipeline_lib import progress, quiet, report


def _warn_from(module: str, message: str, category=UserWarning) -> None:
    """Raise ``message`` as if ``module`` called warnings.warn (the filters match on the module name)."""
    warnings.warn_explicit(message, category, filename=f"/site-packages/{module.replace('.', '/')}.py", lineno=1,
                           module=module)


def test_known_library_warnings_are_silenced_and_others_still_show():
    from pydantic.warnings import UnsupportedFieldAttributeWarning

    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        quiet.install()
        _warn_from("merlin.io.dataset", "Initializing an NVTabular Dataset in CPU mode.This is an experimental "
                                        "feature with extremely limited support!")
        _warn_from("merlin.dtypes.mappings.torch", "PyTorch dtype mappings did not load successfully due to an "
                                                   "error: No module named 'torch'")
        _warn_from("pydantic._internal._generate_schema", "The 'deprecated' attribute with value True was provided "
                   "to the `Field()` function, which has no effect in the context it was used.",
                   UnsupportedFieldAttributeWarning)
        # real warnings: another message from the same module, the same message from another module,
        # our own code
        _warn_from("merlin.io.dataset", "Dataset has 0 rows")
        _warn_from("mypackage.etl", "Initializing an NVTabular Dataset in CPU mode")
        warnings.warn("something the user should see", RuntimeWarning)
    assert [str(w.message) for w in seen] == ["Dataset has 0 rows", "Initializing an NVTabular Dataset in CPU mode",
                                              "something the user should see"]


def test_known_library_log_messages_are_dropped_and_others_kept(caplog):
    quiet.install()
    quiet.install()  # idempotent: one filter per logger
    assert len([f for f in logging.getLogger("absl").filters if isinstance(f, quiet.DropKnownMessages)]) == 1
    with caplog.at_level(logging.WARNING):
        logging.getLogger("tensorflow").warning("Please fix your imports. Module tensorflow.python.training.tracking."
                                                "data_structures has been moved to tensorflow.python.trackable")
        logging.getLogger("absl").warning("Found untraced functions such as %s while saving", "model_context_fn")
        logging.getLogger("tensorflow").warning("Gradients do not exist for variables ['x'] when minimizing the loss")
        logging.getLogger("absl").warning("a real absl warning")
    assert [r.getMessage() for r in caplog.records] == [
        "Gradients do not exist for variables ['x'] when minimizing the loss", "a real absl warning"]


def test_figures_are_rounded_to_four_significant_digits():
    assert report.num(0.7512345678) == "0.7512" and report.num(0.0312512345) == "0.03125"
    assert report.num(5.123456) == "5.123" and report.num(4759) == "4759" and report.num(np.int64(3)) == "3"
    assert report.num(float("nan")) == "n/a" and report.num(None) == "-"
    assert report.rounded({"auc": 0.529088934147, "hist": [0.12345678, 2], "n": 10}) == \
        {"auc": 0.5291, "hist": [0.1235, 2], "n": 10}
    rows = report.metric_rows({"auc": 0.5290889341479973, "logloss": 0.6727471912102039, "n_train": 4759})
    assert rows == [{"metric": "auc", "value": "0.5291"}, {"metric": "logloss", "value": "0.6727"},
                    {"metric": "n_train", "value": "4759"}]


def test_served_predictions_table_stays_narrow():
    df = pd.DataFrame({"user_id": [260, 183], "item_tags": [np.array([16, 18, 19, 20, 21, 22]), [20]],
                       "top_scores": [[0.123456789, 0.0987654321], []],
                       "served_http": [np.float32(0.33459878), 0.2], "served_grpc": [0.334598779678345, 0.2],
                       "offline": [0.334598779678345, 0.2012]})
    first, second = report.compact_table(df, merge=("score", report.SCORE_COLUMNS))
    assert first == {"user_id": "260", "item_tags": "[16, 18, 19, 20, … +2]", "top_scores": "[0.123, 0.0988]",
                     "score": "0.3346"}
    assert second["score"] == "0.2 / 0.2 / 0.2012" and second["item_tags"] == "[20]"  # they differ: all three shown
    (row,) = report.compact_table(df.head(1), tail=["item_tags"])
    assert row["item_tags"] == "[+2 …, 19, 20, 21, 22]" and row["served_http"] == "0.3346"


def test_effective_config_markdown_is_yaml_with_the_admin_key_redacted():
    from pipeline_lib.config import load_config

    cfg = load_config(None, {"serving": {"admin_api_key": "s3cret"}, "model": {"epochs": 3}})
    md = report.config_markdown(cfg.model_dump(mode="json"))
    assert md.startswith("# effective config") and "```yaml\n" in md and "epochs: 3" in md
    assert "s3cret" not in md and "admin_api_key: '***'" in md


def test_learning_curve_is_embedded_as_a_data_uri(tmp_path):
    from pipeline_lib.models.ranking import plot_learning_curve

    png = plot_learning_curve({"loss": [0.7, 0.6], "val_loss": [0.71, 0.65], "auc": [0.6, 0.7]}, tmp_path / "lc.png")
    md = report.learning_curve_markdown([("dlrm", png), ("missing", tmp_path / "nope.png")])
    data = md.split("(data:image/png;base64,", 1)[1].split(")", 1)[0]
    assert base64.b64decode(data) == png.read_bytes() and "missing" not in md


CONFIG_PBTXT = """name: "recsys"
platform: "merlin_executor"
max_batch_size: 0
input { name: "user_id" data_type: TYPE_INT64 dims: -1 }
input { name: "user_country" data_type: TYPE_STRING dims: -1 }
input { name: "user_age" data_type: TYPE_FP64 dims: -1 }
input { name: "item_tags__values" data_type: TYPE_INT64 dims: -1 }
input { name: "item_tags__offsets" data_type: TYPE_INT32 dims: -1 }
output { name: "click/binary_output" data_type: TYPE_FP32 dims: -1 dims: 1 }
"""


def test_curl_body_and_commands_for_the_served_model(tmp_path):
    (tmp_path / "config.pbtxt").write_text(CONFIG_PBTXT)
    row = {"user_id": np.int64(42), "user_country": "C03", "user_age": 31.0, "item_tags": np.array([4, 17]),
           "click": 1}
    body = report.request_body(tmp_path / "config.pbtxt", row)
    assert body == {"inputs": [
        {"name": "user_id", "shape": [1], "datatype": "INT64", "data": [42]},
        {"name": "user_country", "shape": [1], "datatype": "BYTES", "data": ["C03"]},
        {"name": "user_age", "shape": [1], "datatype": "FP64", "data": [31.0]},
        {"name": "item_tags__values", "shape": [2], "datatype": "INT64", "data": [4, 17]},
        {"name": "item_tags__offsets", "shape": [2], "datatype": "INT32", "data": [0, 2]}]}
    args = report.cli_args("configs/small.yaml", {"model": {"epochs": 3}, "serving": {"http_port": 9000},
                                                  "export": {"model_repository": "/tmp/my repo"}})
    assert args == ["--config", "configs/small.yaml", "--set", "serving.http_port=9000",
                    "--set", "export.model_repository=/tmp/my repo"]
    q = report.query_commands("recsys", "127.0.0.1", 9000, 9001, args, tmp_path / "request.json", body)
    uv = report.uv_command()  # "uv", or the bootstrapped .tools/bin/uv where none is on PATH
    assert q["serve"] == (f"{uv} run recsys serve --config configs/small.yaml --set serving.http_port=9000 "
                          "--set 'export.model_repository=/tmp/my repo'")
    assert q["predict"].startswith(f"{uv} run recsys predict --config configs/small.yaml") and q["http"] == "127.0.0.1:9000"
    assert q["curl"].startswith("curl -s 127.0.0.1:9000/v2/models/recsys/infer ") and q["curl"].endswith("request.json")
    assert json.loads(q["curl_inline"].split(" -d ", 1)[1].strip("'")) == body


def _summary(**extra) -> dict:
    base = {
        "run_dir": "/somewhere/runs/it", "model": "dlrm",
        "metrics_split": "test",
        "metrics": {"auc": 0.7612345, "logloss": 0.5123456, "n_train": 48000, "n_test": 6000},
        "intervals": {"auc": "0.7612 [0.7501, 0.7723]"},
        "validation_metrics": {"auc": 0.7701234, "logloss": 0.50001, "n_valid": 6000},
        "gate": {"outcome": "promoted", "promote": True, "metric": "auc", "candidate": 0.7612345, "served": None,
                 "served_version": None, "reason": "nothing served yet: first version promotes"},
        "stage_seconds": {"etl": 10.0, "train": 40.04, "serving-smoke-test": 50.0},
        "model_version": 3, "served_version": 3, "previous_version": 2, "served_dir": "model_repository/recsys/3",
        "max_abs_diff_served_vs_offline": 0.0, "live_server": None,
        "query": report.query_commands("recsys", "127.0.0.1", 8000, 8001, [], None, {"inputs": []}),
    }
    return base | extra


def test_cli_summary_names_metric_gate_version_folder_and_how_to_query():
    text = report.cli_summary(_summary())
    lines = text.splitlines()
    assert 6 <= len(lines) <= 11, text
    # the test figures with their interval head the summary; the validation ones follow, labelled
    assert lines[0] == "dlrm: test auc 0.7612 [0.7501, 0.7723], logloss 0.5123 (48,000 train / 6,000 test rows)"
    assert lines[1] == "validation (model choice only): auc 0.7701, logloss 0.5"
    assert "gate (test split): promoted; nothing served yet" in text
    assert "model 'recsys' version 3 (previously 2)" in text and "/somewhere/runs/it" in text and "1 min 40 s" in text
    assert "uv run recsys serve" in text and "uv run recsys predict --protocol grpc" in text
    assert "0.761234" not in text


def test_cli_summary_when_the_gate_refuses():
    s = _summary(model_version=None, served_version=2,
                 gate={"outcome": "refused", "promote": False, "metric": "auc", "candidate": 0.5012345,
                       "served": 0.7612345, "served_version": 2,
                       "reason": "candidate auc 0.50123 is worse than served v2 0.76123; not promoted; version 2 "
                                 "keeps serving"},
                 warnings=["the test split holds only 12 positive labels (fewer than 30, ...)"],
                 split={"method": "time", "train": {"rows": 800, "positives": 80},
                        "valid": {"rows": 100, "positives": 10}, "test": {"rows": 100, "positives": 12}})
    text = report.cli_summary(s)
    assert ("gate (test split): REFUSED: candidate auc 0.50123 is worse than served v2 0.76123; not promoted; "
            "version 2 keeps serving") in text
    assert "warning: the test split holds only 12 positive labels" in text
    assert "split (time): 800 train rows (80 positive), 100 validation rows (10 positive), 100 test rows" in text
    inconclusive = _summary(model_version=None, served_version=2, gate={
        "outcome": "inconclusive", "promote": False, "metric": "auc", "candidate": 0.76, "served": 0.7612345,
        "served_version": 2, "reason": "inside the noise; inconclusive: version 2 keeps serving"})
    assert "gate (test split): INCONCLUSIVE, not promoted: inside the noise" in report.cli_summary(inconclusive)
    assert "model 'recsys' version 2 (unchanged)" in text and "uv run recsys serve" in text


def test_headlines_and_the_lift_over_the_baselines():
    s = _summary(model="session_gru", metrics={"recall@10": 0.31234, "ndcg@10": 0.1712345, "mrr@10": 0.12345,
                                               "n_train": 9600, "n_test": 1200}, intervals={}, validation_metrics={},
                 lift="session_gru recall@10 0.3123 is 11.5% above the best baseline (cooccurrence 0.2801)")
    assert report.headline(s) == "test recall@10 0.3123, ndcg@10 0.1712, mrr@10 0.1235"
    lines = report.cli_summary(s).splitlines()
    assert lines[1] == "baselines: session_gru recall@10 0.3123 is 11.5% above the best baseline (cooccurrence 0.2801)"
    assert "- baselines: session_gru recall@10" in report.run_summary_markdown(s)
    assert not any(line.startswith("baselines:") for line in report.cli_summary(_summary()).splitlines())
    r = _summary(model="two_tower", metrics={"recall@10": 0.1469, "ndcg@10": 0.0576, "n_train": 2508,
                                             "n_test_users": 250},
                 intervals={"recall@10": "0.1469 [0.1201, 0.1755]"})
    assert report.headline(r) == "test per user recall@10 0.1469 [0.1201, 0.1755], ndcg@10 0.0576"


def test_a_refused_first_run_says_nothing_is_served():
    s = _summary(model_version=None, served_version=None,
                 gate={"outcome": "refused", "promote": False, "metric": "auc", "candidate": 0.52, "served": None,
                       "served_version": None,
                       "reason": "dlrm auc 0.52 does not beat logistic_regression 0.63: not promoted "
                                 "(gate.require_beat_baseline); nothing is served"})
    assert ("gate (test split): REFUSED: dlrm auc 0.52 does not beat logistic_regression 0.63: not promoted "
            "(gate.require_beat_baseline); nothing is served") in report.cli_summary(s)


def test_run_summary_markdown_names_model_version_endpoints_and_query():
    md = report.run_summary_markdown(_summary(live_server="127.0.0.1:8000"))
    assert "model **recsys** version **3**" in md and "HTTP `127.0.0.1:8000`, gRPC `127.0.0.1:8001`" in md
    assert "uv run recsys predict" in md and "curl -s 127.0.0.1:8000/v2/models/recsys/infer" in md
    assert "| test auc | 0.7612 [0.7501, 0.7723] |" in md and "| validation auc | 0.7701 |" in md
    assert "| train | 40.0 |" in md
    assert "switched to this version" in md


def test_epoch_line_rounds_and_separates_validation():
    line = progress.epoch_line(2, 5, {"loss": 0.512345, "auc": 0.701234, "regularization_loss": 0.0,
                                      "val_loss": 0.53012, "val_auc": 0.751234, "val_regularization_loss": 0.0},
                               12.34)
    assert line == "epoch 2/5: loss 0.5123, auc 0.7012; validation: loss 0.5301, auc 0.7512 (12.3 s)"
    session = progress.epoch_line(1, 3, {"loss": 5.5761, "recall_at_10": 0.32041, "map_at_10": 0.1896,
                                         "precision_at_10": 0.032041})
    assert session == "epoch 1/3: loss 5.576, recall@10 0.3204"


def test_keras_epoch_logger_logs_one_line_per_epoch(caplog):
    import tensorflow as tf

    tf.keras.utils.set_random_seed(0)
    model = tf.keras.Sequential([tf.keras.layers.Dense(1, activation="sigmoid", input_shape=(3,))])
    model.compile(optimizer="adam", loss="binary_crossentropy", metrics=[tf.keras.metrics.AUC(name="auc")])
    x = np.random.default_rng(0).normal(size=(64, 3)).astype("float32")
    y = (x[:, 0] > 0).astype("float32")
    logger = logging.getLogger("pipeline_lib.test_progress")
    with caplog.at_level(logging.INFO, logger="pipeline_lib.test_progress"):
        model.fit(x, y, validation_data=(x, y), epochs=3, batch_size=16, verbose=0,
                  callbacks=[progress.epoch_logger(3, logger)])
    lines = [r.getMessage() for r in caplog.records if r.name == "pipeline_lib.test_progress"]
    assert len(lines) == 3
    for i, line in enumerate(lines, 1):
        assert line.startswith(f"epoch {i}/3: loss 0.") and "; validation: loss 0." in line and ", auc " in line
        assert line.endswith(" s)")
        for figure in line.replace(";", ",").replace("(", ",").split(","):  # 4 significant digits at most
            digits = [c for c in figure.split()[-1].lstrip("0.") if c.isdigit()] if "." in figure else []
            assert len(digits) <= 4, line


def test_child_processes_get_the_known_warnings_silenced_too(monkeypatch):
    """Prefect's temporary API server is a child process: it inherits PYTHONWARNINGS entries that
    match only the known messages; Triton's python backend still gets its blanket 'ignore'."""
    import subprocess
    import sys

    from pipeline_lib.serving.server import TritonPaths, server_env

    monkeypatch.delenv("PYTHONWARNINGS", raising=False)
    quiet.install()
    quiet.install()
    import os

    assert os.environ["PYTHONWARNINGS"] == quiet.CHILD_WARNINGS
    code = ("import warnings\n"
            "m = \"The 'deprecated' attribute with value True was provided to the `Field()` function, which has no\"\n"
            "warnings.warn_explicit(m, UserWarning, 'g.py', 1, module='pydantic._internal._generate_schema')\n"
            "warnings.warn_explicit('a real one', UserWarning, 'g.py', 2, module='pydantic._internal._generate_schema')\n")
    err = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60).stderr
    assert "a real one" in err and "deprecated" not in err and "Invalid -W option" not in err
    assert server_env(TritonPaths("tritonserver", "backends", []))["PYTHONWARNINGS"] == "ignore"


def test_recsys_run_prints_the_summary_and_json_only_on_request(monkeypatch, tmp_path):
    """The CLI's closing output (the flow itself is replaced: tests/test_flow.py runs the real one)."""
    from typer.testing import CliRunner

    import flows.pipeline
    from flows.cli import app

    summary = _summary(run_dir=str(tmp_path / "runs" / "it"))
    monkeypatch.setattr(flows.pipeline, "pipeline", lambda **kw: dict(summary, predictions=pd.DataFrame({"x": [1]})))
    runner = CliRunner()
    out = runner.invoke(app, ["run", "--set", "model.epochs=1"])
    assert out.exit_code == 0, out.output
    assert "dlrm: test auc 0.7612 [0.7501, 0.7723]" in out.output and "version 3" in out.output and "{" not in out.output
    out = runner.invoke(app, ["run", "--set", "model.epochs=1", "--json"])
    assert out.exit_code == 0, out.output
    printed = json.loads(out.output)
    assert printed["metrics"]["auc"] == 0.7612345 and "predictions" not in printed


def test_query_commands_use_the_bootstrapped_uv_when_none_is_on_path(monkeypatch, tmp_path):
    import shutil

    from pipeline_lib import report

    monkeypatch.setenv("PATH", str(tmp_path))  # no uv on PATH (a fresh machine where make bootstrapped it)
    local = report.Path(report.__file__).resolve().parents[1] / ".tools" / "bin" / "uv"
    q = report.query_commands("recsys", "127.0.0.1", 8000, 8001, [])
    if local.exists():
        assert q["serve"] == f"{local} run recsys serve" and q["predict"].startswith(f"{local} run recsys predict")
    else:
        assert q["serve"] == "uv run recsys serve"
    monkeypatch.setattr(shutil, "which", lambda name: "/usr/bin/uv")
    assert report.query_commands("recsys", "127.0.0.1", 8000, 8001, [])["serve"] == "uv run recsys serve"
