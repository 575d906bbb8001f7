"""The `recsys` CLI as a subprocess: a bad config or bad data ends in one error line, no stack trace."""
import os
import shutil
import subprocess
import sys

import pytest

from tests.support import ML, ML_EXAMPLE, ROOT

pytestmark = pytest.mark.integration
CSV_EXAMPLE = ROOT / "configs" / "examples" / "csv_users_items.yaml"


def test_cli_reports_a_bad_config_without_a_stack_trace(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(CSV_EXAMPLE.read_text().replace('"rating >= 4"', '"rating => 4"'))
    out = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--config", str(bad)],
                         capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert out.returncode == 2
    assert "label_rule 'rating => 4' is not" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.integration
def test_cli_run_on_bad_data_prints_one_error_without_a_stack_trace(prefect_harness, tmp_path):
    """`recsys run` (real Prefect flow): bad ratings stop it with file, column, count and example.
    The run reports to the session's Prefect API (a temporary server of its own is test_first_run's case)."""
    import subprocess
    import sys

    bad = tmp_path / "ml"
    shutil.copytree(ML, bad)
    lines = (bad / "u.data").read_text().splitlines()
    lines[5] = lines[5].rsplit("\t", 2)[0] + "\tfive\t" + lines[5].rsplit("\t", 1)[1]
    (bad / "u.data").write_text("\n".join(lines) + "\n")
    out = subprocess.run([sys.executable, "-m", "flows.cli", "run", "--config", str(ML_EXAMPLE),
                          "--set", f"data.path={bad}", "--set", f"runs_dir={tmp_path / 'runs'}"],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path,
                         env={**os.environ, "PREFECT_API_URL": prefect_harness})
    assert out.returncode == 2, out.stdout + out.stderr
    assert "Traceback" not in out.stdout + out.stderr
    assert (f"error: raw data failed validation (1 problem(s)):\n  - {bad}/u.data: column 'rating': "
            f"label_rule 'rating >= 4': value missing or not a number [1 rows] (e.g. 'five')") in out.stderr


def _recsys(*args, cwd=ROOT, timeout=120):
    return subprocess.run([sys.executable, "-m", "flows.cli", *args], capture_output=True, text=True,
                          timeout=timeout, cwd=cwd)


def test_a_run_into_an_unwritable_folder_fails_at_once_naming_it(tmp_path):
    """root ignores permission bits, so the folder sits under a regular file (a read-only mount answers alike)."""
    (tmp_path / "a_file").write_text("")
    for key in ("runs_dir", "export.model_repository"):
        out = _recsys("run", "--set", f"{key}={tmp_path / 'a_file' / 'out'}")
        assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
        assert f"error: {key} {tmp_path / 'a_file' / 'out'} is not writable ({tmp_path / 'a_file'} is a file" in out.stderr
    assert not (tmp_path / "runs").exists()


def test_a_run_whose_redis_store_does_not_answer_fails_at_once_naming_it(tmp_path):
    from pipeline_lib.serving.server import free_port

    port = free_port()  # nothing listens there
    out = _recsys("run", "--set", f"runs_dir={tmp_path / 'runs'}", "--set", f"export.model_repository={tmp_path / 'repo'}",
                  "--set", "features.online_store=redis",
                  "--set", f"features.redis_connection=127.0.0.1:{port},password=s3cret")
    assert out.returncode == 2 and "Traceback" not in out.stderr, out.stderr
    assert f"error: the redis online store at 127.0.0.1:{port} (Feast repo" in out.stderr and "s3cret" not in out.stderr
    assert "nothing was run" in out.stderr and not list((tmp_path / "runs").glob("*"))  # no run folder


def test_a_failing_promote_rollback_prune_prints_one_line_and_debug_the_traceback(tmp_path):
    from pipeline_lib.serving import repository

    repo = tmp_path / "repo"
    (repo / "m" / "1").mkdir(parents=True)
    (repo / "m" / "1" / repository.VERSION_CONFIG).write_text('name: "m"\nbackend: "python"\n')
    repository.write_served_config(repo, "m", 1)
    common = ["--set", f"export.model_repository={repo}", "--set", "export.model_name=m",
              "--set", "serving.notify_live_server=false"]
    out = _recsys("promote", "7", *common)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "promote to v7 failed: version 7 of model 'm' not found" in lines[0]
    assert "v1 of 'm' is still served" in lines[0] and "recsys versions" in lines[0]
    out = _recsys("rollback", *common)
    assert out.returncode == 2 and "rollback failed: no version older than 1" in out.stderr
    (tmp_path / "a_file").write_text("")
    out = _recsys("prune", "--set", f"export.model_repository={tmp_path / 'a_file' / 'repo'}")
    assert out.returncode == 2 and "prune failed:" in out.stderr and "Traceback" not in out.stderr
    out = _recsys("--debug", "promote", "7", *common)
    assert out.returncode != 0 and "Traceback" in out.stderr and "RepositoryError" in out.stderr
