"""Online evaluation: attribution by request id and by user + item inside the window; CTR per version."""
import numpy as np
import pandas as pd

from pipeline_lib.online import evaluation as ev

T0 = pd.Timestamp("2026-12-07T06:00:00Z")


def _imp(request_id, user, version, items, seconds=0):
    return {"request_id": request_id, "ts": T0 + pd.Timedelta(seconds=seconds), "model": "m", "version": version,
            "user_id": user, "item_ids": [str(i) for i in items], "ranks": list(range(1, len(items) + 1)),
            "scores": [1.0] * len(items)}


def _fb(item, seconds, request_id="", user=""):
    return {"request_id": request_id, "user_id": user, "item_id": str(item), "event": "click",
            "ts": T0 + pd.Timedelta(seconds=seconds)}


def test_feedback_joins_by_request_id_and_by_user_and_item_inside_the_window_only():
    imps = pd.DataFrame([_imp("r1", "u1", 1, [1, 2, 3]), _imp("r2", "u2", 1, [4, 5, 6], seconds=10),
                         _imp("r3", "u2", 2, [5, 7, 8], seconds=100)])
    fb = pd.DataFrame([_fb(2, 5, request_id="r1"),        # by request id
                       _fb(5, 150, user="u2"),            # by user + item: the latest impression before it (r3)
                       _fb(3, 5000, request_id="r1"),     # outside the window
                       _fb(9, 20, user="u2"),             # never shown
                       _fb(3, 5, request_id="nope")])     # unknown request
    shown, unattributed = ev.attribute(imps, fb, k=3, window_s=600)
    clicked = set(map(tuple, shown.loc[shown.clicked, ["request_id", "item_id"]].to_numpy()))
    assert clicked == {("r1", "2"), ("r3", "5")} and unattributed == 3
    report = ev.evaluate(imps, fb, k=2, window_s=600, resamples=200)
    by_version = {v["version"]: v for v in report["versions"]}
    assert by_version[1]["ctr"]["value"] == 1 / 4 and by_version[2]["ctr"]["value"] == 1 / 2  # @2: r1's 2, r3's 5
    assert by_version[1]["hit_rate"]["value"] == 0.5 and by_version[1]["impressions"] == 2
    assert [(d["version"], d["day"]) for d in report["daily"]] == [(1, "2026-12-07"), (2, "2026-12-07")]
    assert report["comparisons"][0]["previous"] == 1 and not report["regressions"]


def test_a_version_significantly_worse_than_the_one_before_is_named():
    rng = np.random.default_rng(0)
    imps, fb = [], []
    for i in range(400):
        version = 1 if i < 200 else 2
        imps.append(_imp(f"r{i}", f"u{i}", version, [1, 2, 3, 4], seconds=i))
        if rng.random() < (0.6 if version == 1 else 0.1):
            fb.append(_fb(2, i + 1, request_id=f"r{i}"))
    report = ev.evaluate(pd.DataFrame(imps), pd.DataFrame(fb), k=4, window_s=600, resamples=300)
    assert [(r["version"], r["previous"]) for r in report["regressions"]] == [(2, 1)]
    text = ev.markdown(report)
    assert "regression: version 2 has a lower online CTR than version 1" in text and "| 2 |" in text
