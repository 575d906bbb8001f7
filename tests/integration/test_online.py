"""The online evaluation flow (a real Prefect flow run): dropped feedback ingested, impressions joined,
per-version report with artifacts, and the served version rolled back when its online CTR regressed."""
import json

import numpy as np
import pandas as pd
import pytest

from pipeline_lib.config import load_config
from pipeline_lib.online import impressions
from pipeline_lib.serving import repository

pytestmark = pytest.mark.integration


def _traffic(log_dir, inbox, rng):
    """v1 served first, then v2; users click v1's answers far more often. Half the clicks name the request id,
    half only user + item; a few feedback rows are bad."""
    rows = []
    t0 = pd.Timestamp.now(tz="UTC").floor("h") - pd.Timedelta(hours=3)
    for version, p_click, start in ((1, 0.5, 0), (2, 0.05, 3600)):
        log = impressions.ImpressionLog(impressions.ImpressionSettings(log_dir, 3600.0), "recsys", version)
        for i in range(150):
            ts = t0 + pd.Timedelta(seconds=start + i * 10)
            rid, user = f"v{version}-r{i}", f"u{i % 40}"
            items = rng.choice(200, 10, replace=False)
            log.log(rid, np.array([user]), items[None, :], np.linspace(1, 0, 10)[None, :], ts=ts.timestamp())
            if rng.random() < p_click:
                item = str(items[rng.integers(3)])
                by_id = i % 2 == 0
                rows.append({"request_id": rid if by_id else "", "user_id": "" if by_id else user, "item_id": item,
                             "event": "click", "ts": (ts + pd.Timedelta(seconds=30)).isoformat()})
        log.close()
    rows.append({"request_id": "x", "user_id": "", "item_id": "", "event": "click", "ts": t0.isoformat()})
    rows.append({"request_id": "x", "user_id": "", "item_id": "3", "event": "view", "ts": t0.isoformat()})
    inbox.mkdir(parents=True)
    pd.DataFrame(rows).to_csv(inbox / "clicks.csv", index=False)
    return len(rows) - 2


def test_the_online_flow_reports_each_version_and_rolls_back_a_regression(prefect_harness, exported, tmp_path):
    from prefect.artifacts import Artifact

    from flows.online import online_evaluation

    staged, _ = exported
    cfg = load_config(None, {"runs_dir": str(tmp_path / "runs"), "export": {"model_repository": str(tmp_path / "repo")},
                             "serving": {"notify_live_server": False},
                             "online": {"auto_rollback": True, "k": 5},
                             "evaluation": {"bootstrap_resamples": 300}})
    for v in (1, 2):
        assert repository.publish(staged.version_dir, staged.config_path, cfg.export.model_repository, "recsys")[0] == v
    repository.promote(cfg.export.model_repository, "recsys", 2)
    good = _traffic(tmp_path / "runs" / "online" / "impressions", tmp_path / "runs" / "online" / "feedback" / "inbox",
                    np.random.default_rng(0))

    result = online_evaluation(overrides=cfg.model_dump(mode="json"))

    assert [v["version"] for v in result["versions"]] == [1, 2]
    v1, v2 = result["versions"]
    assert v1["impressions"] == v2["impressions"] == 150 and v1["ctr"]["value"] > v2["ctr"]["value"]
    assert v1["ctr"]["lo"] < v1["ctr"]["value"] < v1["ctr"]["hi"]
    assert result["feedback_events"] == good and result["unattributed_feedback"] == 0
    assert [(r["version"], r["previous"]) for r in result["regressions"]] == [(2, 1)]
    assert result["rollback"].startswith("rolled back from version 2 to version 1")
    assert repository.served_version(cfg.export.model_repository, "recsys") == 1
    reports = tmp_path / "runs" / "online" / "reports"
    assert json.loads((reports / "latest.json").read_text())["regressions"][0]["version"] == 2
    assert (reports / result["plot"].split("/")[-1]).stat().st_size > 1000
    rejected = list((tmp_path / "runs" / "online" / "feedback" / "rejected").glob("*.csv"))
    assert len(rejected) == 1 and len(pd.read_csv(rejected[0])) == 2  # the bad rows, kept aside
    table = Artifact.get("online-evaluation")
    md = Artifact.get("online-ctr")
    assert table is not None and "CTR@5" in str(table.data)
    assert md is not None and "data:image/png;base64," in str(md.data) and "rolled back" in str(md.data)
