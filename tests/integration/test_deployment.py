"""A real local Prefect server, the cron deployment registered by flows.deploy (a Prefect Runner), the run
that the server's scheduler creates executed to completion, and its artifacts read back from the API."""
import asyncio
import datetime
import json
import os
import subprocess
import sys
import time
import urllib.request

import pytest

from pipeline_lib.serving.server import free_port

from tests.conftest import SMALL
from tests.support import ROOT

pytestmark = pytest.mark.integration


def _wait_http(url, timeout, proc=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    raise TimeoutError(url)


@pytest.fixture(scope="module")
def prefect_server(tmp_path_factory):
    home = tmp_path_factory.mktemp("prefect-home")
    port = free_port()
    env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
           "PREFECT_UI_ENABLED": "false"}
    env.pop("PREFECT_API_URL", None)
    log = open(home / "server.log", "w")
    proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1",
                             "--port", str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
    api = f"http://127.0.0.1:{port}/api"
    try:
        _wait_http(f"{api}/health", 180, proc)
        yield api, home, env
    finally:
        proc.terminate()
        proc.wait(timeout=60)
        log.close()


def test_the_scheduler_itself_starts_the_cron_deployment_and_the_run_completes(prefect_server, tmp_path):
    """flows.deploy registers an every-minute cron deployment; nothing triggers it by hand. The Prefect
    server's scheduler service must create the flow run (with SQLAlchemy 2.1 it failed on every cycle
    and no run ever appeared), and the runner must execute it to completion, artifacts included. The
    runner prefetches: the run's process starts (imports) before the cron slot, the flow not before it."""
    api, home, env = prefect_server
    env = {**env, "PREFECT_API_URL": api, "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    # the smallest run that still passes every stage: half the SMALL data (as test_first_run)
    overrides = {**SMALL, "data": {"synthetic": {**SMALL["data"]["synthetic"], "n_interactions": 3000}},
                 "runs_dir": str(tmp_path / "runs"),
                 "export": {**SMALL["export"], "model_repository": str(tmp_path / "model_repository")},
                 "serving": {"notify_live_server": False}}
    runner_log = open(tmp_path / "runner.log", "w")
    runner = subprocess.Popen([sys.executable, "-m", "flows.deploy", "--name", "test-nightly", "--cron", "* * * * *",
                               "--overrides-json", json.dumps(overrides)],
                              cwd=ROOT, env=env, stdout=runner_log, stderr=subprocess.STDOUT)

    def logs() -> str:
        return ((tmp_path / "runner.log").read_text()[-3000:] + "\n--- server ---\n"
                + (home / "server.log").read_text()[-3000:])

    try:
        from prefect.client.orchestration import get_client
        from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId
        from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
        from prefect.settings import PREFECT_API_URL, temporary_settings

        async def scenario():
            async with get_client() as client:
                deadline = time.monotonic() + 180
                while True:
                    try:
                        dep = await client.read_deployment_by_name("recsys-pipeline/test-nightly")
                        break
                    except Exception:
                        assert runner.poll() is None, logs()
                        assert time.monotonic() < deadline, "deployment never registered\n" + logs()
                        await asyncio.sleep(1)
                crons = [s.schedule.cron for s in dep.schedules]
                # the scheduler service creates the runs; this test only waits for them
                deadline = time.monotonic() + 240
                while True:
                    scheduled = await client.read_flow_runs(
                        deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[dep.id])))
                    if scheduled:
                        break
                    assert time.monotonic() < deadline, "the scheduler created no run\n" + logs()
                    await asyncio.sleep(2)
                first = min(scheduled, key=lambda r: r.expected_start_time)
                deadline = time.monotonic() + 900
                while True:
                    fr = await client.read_flow_run(first.id)
                    if fr.state and fr.state.is_final():
                        break
                    assert runner.poll() is None, logs()
                    assert time.monotonic() < deadline, f"flow run stuck in {fr.state}\n" + logs()
                    await asyncio.sleep(2)
                arts = await client.read_artifacts(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[fr.id])))
                return dep, crons, scheduled, fr, arts

        with temporary_settings({PREFECT_API_URL: api}):
            dep, crons, scheduled, fr, arts = asyncio.run(scenario())
    finally:
        runner.terminate()
        runner.wait(timeout=60)
        runner_log.close()
    assert crons == ["* * * * *"]
    assert all(r.auto_scheduled for r in scheduled), [(r.name, r.auto_scheduled) for r in scheduled]
    assert dep.parameters["overrides"]["runs_dir"] == str(tmp_path / "runs")
    assert fr.state.is_completed(), logs()
    assert fr.expected_start_time.second == 0  # a cron slot, not a manual "now"
    # prefetched, yet the flow began at its slot, not before (the server holds a run until its time)
    assert fr.start_time >= fr.expected_start_time - datetime.timedelta(seconds=1), (fr.start_time, fr.expected_start_time)
    assert {"served-predictions", "run-summary", "metrics", "promotion"} <= {a.key for a in arts}
    promotion = next(a for a in arts if a.key == "promotion").data
    assert "promote** version **1**" in promotion and "data fingerprint: `sha256:" in promotion
    assert (tmp_path / "model_repository" / "recsys" / "1" / "lineage.json").exists()


def test_sigterm_pauses_the_schedule_as_ctrl_c_does(prefect_server, tmp_path):
    """A service manager's stop (SIGTERM) must leave the deployment paused, not scheduled with nobody
    to run it (Late runs piling up)."""
    import signal

    api, home, env = prefect_server
    env = {**env, "PREFECT_API_URL": api, "PREFECT_RUNNER_POLL_FREQUENCY": "2"}
    log = open(tmp_path / "runner.log", "w")
    runner = subprocess.Popen([sys.executable, "-m", "flows.deploy", "--name", "sigterm-test", "--cron", "0 3 1 1 *"],
                              cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def deployment() -> dict:
        req = urllib.request.Request(f"{api}/deployments/name/recsys-pipeline/sigterm-test")
        with urllib.request.urlopen(req, timeout=10) as r:
            return json.loads(r.read())

    try:
        deadline = time.monotonic() + 240
        while True:
            assert runner.poll() is None and time.monotonic() < deadline, (tmp_path / "runner.log").read_text()[-3000:]
            try:
                if "registered" in (tmp_path / "runner.log").read_text() and not deployment()["paused"]:
                    break
            except OSError:
                pass
            time.sleep(1)
        time.sleep(3)  # the runner's loops are running
        runner.send_signal(signal.SIGTERM)
        runner.wait(timeout=120)
    finally:
        if runner.poll() is None:
            runner.kill()
        log.close()
    out = (tmp_path / "runner.log").read_text()
    assert deployment()["paused"], out[-3000:]
    assert "schedule is paused" in out and "Traceback" not in out, out[-3000:]
