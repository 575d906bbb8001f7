"""prefect.yaml declares the scheduled deployment of the flow (no server)."""
import os
import yaml
from tests.support import ROOT


def test_prefect_yaml_declares_the_scheduled_deployment():
    spec = yaml.safe_load(open(os.path.join(ROOT, "prefect.yaml")))
    (dep,) = spec["deployments"]
    path, func = dep["entrypoint"].split(":")
    assert os.path.exists(os.path.join(ROOT, path))
    from prefect.flows import load_flow_from_entrypoint

    flow = load_flow_from_entrypoint(os.path.join(ROOT, dep["entrypoint"]))
    assert flow.name == "recsys-pipeline" and func == "pipeline"
    assert set(dep["parameters"]) == set(flow.parameters.properties)
    from prefect.client.schemas.schedules import CronSchedule

    assert [CronSchedule(cron=s["cron"], timezone=s["timezone"]).cron for s in dep["schedules"]] == ["0 3 * * *"]
    assert dep["work_pool"]["name"] == "recsys-gpu"


def test_the_online_evaluation_flow_is_schedulable_like_the_pipeline():
    from flows.deploy import FLOWS, main

    assert {k: f.name for k, (f, _) in FLOWS.items()} == {"pipeline": "recsys-pipeline",
                                                           "online": "recsys-online-evaluation"}
    import pytest

    with pytest.raises(SystemExit):  # argparse refuses an unknown flow by name
        main(["--flow", "nightly"])
