"""Zero-downtime promotion and rollback on a running Triton (explicit model control, restricted API).

Two clients (HTTP and gRPC) send requests continuously while version 2 is promoted and then
rolled back to version 1; not one request may fail, and the responding version must switch. The server
logs impressions (pipeline_lib.online.impressions) with a flush interval longer than the module, so every
record on disk was written by a version's unload (promotion, rollback) or by the clean stop at the end.
"""
import shutil
import threading
import time

import numpy as np
import pandas as pd
import pytest
import tritonclient.http as httpclient
from tritonclient.utils import InferenceServerException

from pipeline_lib.online import evaluation, feedback, impressions, simulate
from pipeline_lib.serving import repository
from pipeline_lib.serving.client import RecsysClient
from pipeline_lib.serving.repository import LiveServer
from pipeline_lib.serving.server import TritonServer

pytestmark = pytest.mark.integration
KEY = "test-admin-key"
SERVED: list[tuple[str, str]] = []  # (request id, answering version) of every request the Traffic sent
SIMULATED: list[dict] = []  # the simulator's feedback events


@pytest.fixture(scope="module")
def live(trained, untrained, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("promotion")
    rows = trained.valid_rows(16)
    repo = tmp / "model_repository"
    offline = {str(v): trained.publish(model_dir, rows, repo, "recsys", v, tmp / f"staged{v}")
               for v, model_dir in ((1, trained.model.model_dir), (2, untrained.model_dir))}
    assert np.max(np.abs(offline["1"] - offline["2"])) > 1e-3  # the two versions are distinguishable
    repository.promote(repo, "recsys", 1)
    log_env = impressions.server_env(tmp / "impressions", 3600.0, ["user_id"], "item_id")
    server = TritonServer.on_free_ports(repo, log_file=tmp / "triton.log", model_control="explicit", load_models=["recsys"],
                          admin_api_key=KEY, env=log_env)
    server.start(timeout_s=240, models=["recsys"])
    yield server, repo, rows, offline, tmp / "impressions"
    server.stop()


class Traffic:
    """Clients sending requests in a loop, recording (send time, protocol, version, scores) or the error."""

    def __init__(self, server, rows):
        self.rows, self.stop, self.log, self.errors = rows, threading.Event(), [], []
        self.threads = [threading.Thread(target=self._loop, args=(url, proto), daemon=True)
                        for url, proto in ((server.http_url, "http"), (server.grpc_url, "grpc"))]

    def _loop(self, url, proto):
        # generous timeout: on a loaded 2-core machine a request can wait while the new version's
        # python stub starts; slow is not failed, and every answer is still checked below
        with RecsysClient(url, proto, timeout_s=300) as client:
            while not self.stop.is_set():
                sent = time.monotonic()
                try:
                    scores, version = client.infer(self.rows)
                    self.log.append((sent, proto, version, scores))
                    SERVED.append((client.last_request_id, version))
                except Exception as exc:  # noqa: BLE001 - any failure is what we count
                    self.errors.append(f"{proto}: {exc}")

    def __enter__(self):
        for t in self.threads:
            t.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        for t in self.threads:
            t.join(timeout=60)


def _switch(server, repo, rows, offline, action, expect):
    with Traffic(server, rows) as traffic:
        time.sleep(1.0)
        t_switch = time.monotonic()
        ev = action()
        t_done = time.monotonic()
        time.sleep(1.0)
    assert traffic.errors == [], traffic.errors[:3]
    before = [v for t, _, v, _ in traffic.log if t < t_switch]
    after = [v for t, _, v, _ in traffic.log if t > t_done]  # sent after the switch returned
    assert before and after, "traffic did not flow before and after the switch"
    assert set(after) == {expect}
    assert {p for _, p, _, _ in traffic.log} == {"http", "grpc"}
    for _, _, version, scores in traffic.log:  # every answer is exactly one version's offline scores
        np.testing.assert_allclose(scores, offline[version], atol=1e-5, rtol=0)
    assert repository.served_version(repo, "recsys") == int(expect)
    return ev, before


def test_model_control_api_needs_the_admin_key(live):
    server, *_ = live
    with httpclient.InferenceServerClient(server.http_url) as c:
        with pytest.raises(InferenceServerException, match="(?i)unauthorized|restricted|not allowed"):
            c.load_model("recsys")
        assert c.is_model_ready("recsys", "1")


def test_promote_v2_then_roll_back_to_v1_without_failed_requests(live):
    server, repo, rows, offline, _ = live
    lv = LiveServer(server.http_url, KEY)
    ev, before = _switch(server, repo, rows, offline, lambda: repository.promote(repo, "recsys", 2, lv), "2")
    assert set(before) == {"1"} and ev["previous"] == 1
    ev, before = _switch(server, repo, rows, offline, lambda: repository.rollback(repo, "recsys", lv), "1")
    assert set(before) == {"2"} and (ev["action"], ev["previous"]) == ("rollback", 2)
    with httpclient.InferenceServerClient(server.http_url) as c:
        assert c.is_model_ready("recsys", "1") and not c.is_model_ready("recsys", "2")


def test_a_corrupt_version_or_a_failed_history_write_leaves_the_live_server_serving_the_same_version(live, tmp_path):
    """On a running Triton: a version whose model.onnx was truncated after publish is refused (naming the file)
    before anything switches; a promotion whose history.jsonl write fails after the live switch is undone --
    the pin and the live server go back to the previous version. Both messages say what is served."""
    from pipeline_lib.serving.repository import IntegrityError, RepositoryError

    server, repo, rows, offline, _ = live
    lv = LiveServer(server.http_url, KEY)
    before = repository.served_version(repo, "recsys")
    other = 2 if before == 1 else 1
    # a copy of the other version published as a new one, then corrupted on disk
    src = repo / "recsys" / str(other)
    corrupt, path = repository.publish(src, src / "model_config.pbtxt", repo, "recsys")
    onnx = next(path.rglob("model.onnx"))
    onnx.write_bytes(onnx.read_bytes()[:100])
    with pytest.raises(IntegrityError, match=rf"file '{onnx.relative_to(path)}' does not match its fingerprint.*"
                                             rf"nothing changed: version {before} is served"):
        repository.promote(repo, "recsys", corrupt, lv)
    with RecsysClient(server.grpc_url, "grpc") as client:
        scores, version = client.infer(rows)
    assert version == str(before)
    np.testing.assert_allclose(scores, offline[str(before)], atol=1e-5, rtol=0)
    # the history write fails after the switch: /dev/full accepts the open, refuses the write (ENOSPC)
    hist = repo / "recsys" / "history.jsonl"
    hist.rename(tmp_path / "history.jsonl")
    hist.symlink_to("/dev/full")
    try:
        with pytest.raises(RepositoryError, match=rf"promote of version {other} undone: .*No space left.*"
                                                  rf"the previous pin was put back: version {before} is served"):
            repository.promote(repo, "recsys", other, lv)
    finally:
        hist.unlink()
        (tmp_path / "history.jsonl").rename(hist)
    assert repository.served_version(repo, "recsys") == before
    with RecsysClient(server.grpc_url, "grpc") as client:
        scores, version = client.infer(rows)
    assert version == str(before)
    np.testing.assert_allclose(scores, offline[str(before)], atol=1e-5, rtol=0)
    with httpclient.InferenceServerClient(server.http_url) as c:
        assert c.is_model_ready("recsys", str(before)) and not c.is_model_ready("recsys", str(other))
    shutil.rmtree(path)  # the corrupt copy goes again (never served)


def test_the_simulated_users_query_the_live_server_and_their_clicks_name_served_requests(live, trained):
    server, repo, rows, offline, log_dir = live
    pop = simulate.population(pd.read_parquet(trained.raw), trained.cfg, 30, seed=3)
    always_first = simulate.ClickModel(base=1.0, lift=0.0, position_decay=30.0)  # rank 1 always, others ~never
    with RecsysClient(server.http_url, "http") as client:
        result = simulate.run_traffic(client, pop, requests=12, k=5, candidates=8, seed=0, clicks=always_first)
    version = str(repository.served_version(repo, "recsys"))
    assert (result.requests, result.failed, result.shown, result.versions) == (12, 0, 60, {version: 12})
    assert result.clicks == len(result.feedback) >= 12 and all(f["request_id"] for f in result.feedback)
    SIMULATED.extend(result.feedback)


def test_every_served_request_is_logged_once_with_the_version_that_answered_and_a_clean_stop_loses_nothing(live):
    """Across the promotion and the rollback under traffic: each request id the clients got back is in the
    impression log once per user of its rows, with the version that answered it and the rows' items ranked by
    the scores. The last request is still queued (the flush interval is an hour) until the clean stop."""
    server, repo, rows, offline, log_dir = live
    with RecsysClient(server.grpc_url, "grpc") as client:
        _, version = client.infer(rows)
        last = client.last_request_id
    assert last and len(SERVED) > 20 and {v for _, v in SERVED} == {"1", "2"}
    assert last not in set(impressions.read_impressions(log_dir).request_id)  # queued, not yet written
    server.stop()  # SIGTERM: Triton unloads the model, whose finalize() writes what is queued
    frame = impressions.read_impressions(log_dir)
    users = rows["user_id"].astype(str)
    per_request = frame.groupby("request_id")
    for request_id, answered in SERVED + [(last, version)]:
        records = per_request.get_group(request_id)
        assert sorted(records.user_id) == sorted(users.unique()), request_id  # once per user, never twice
        assert set(records.version) == {int(answered)}
    one = per_request.get_group(last).set_index("user_id")
    for user, group in rows.assign(score=offline[version], user=users).groupby("user"):
        want = group.sort_values("score", ascending=False, kind="stable")
        assert list(one.loc[user].item_ids) == [str(i) for i in want["item_id"]]
        np.testing.assert_allclose(one.loc[user].scores, want["score"], atol=1e-5)
    assert not frame.duplicated(["request_id", "user_id"]).any()  # no request logged twice, whoever sent it
    # the simulator's clicks join: half by request id, half by user + item only (no request id)
    events = pd.DataFrame(SIMULATED)
    events.loc[events.index % 2 == 1, "request_id"] = ""
    events.to_csv(log_dir.parent / "clicks.csv", index=False)
    assert feedback.ingest(log_dir.parent / "clicks.csv", log_dir.parent / "feedback").accepted == len(events)
    shown, unattributed = evaluation.attribute(frame, feedback.read_accepted(log_dir.parent / "feedback"), 5, 600)
    assert unattributed == 0  # a user clicking the same item in two requests: both count for the newest one
    assert shown.clicked.sum() == len(events) - events.duplicated(["user_id", "item_id"]).sum()
