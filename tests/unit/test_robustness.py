"""benchmarks/robustness.py without a server: how answers are classed (Triton's documented front-end 500
kept apart from other 500s), when a probe passes, the matrix's tensors, and the report table."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks import robustness as rb


def test_answers_are_classed_with_the_upstream_500_apart():
    assert rb.classify("http", "400", "bad request: input 'k' is 11") == "4xx"
    assert rb.classify("http", "500", "failed to parse the request JSON buffer") == "upstream-500"
    assert rb.classify("http", "500", "Unable to parse 'data': attempt to access JSON non-number") == "upstream-500"
    assert rb.classify("http", "500", "inference failed: Stub process is not healthy") == "5xx"
    assert rb.classify("http", "", "ConnectionError") == "no answer"
    assert rb.classify("grpc", "StatusCode.INVALID_ARGUMENT", "bad request") == "4xx"
    assert rb.classify("grpc", "StatusCode.INTERNAL", "boom") == "5xx"
    assert rb.classify("grpc", "OK", "") == "2xx"


def test_a_probe_passes_only_with_the_expected_answer():
    assert rb.probe_passed("4xx", "4xx", None) and not rb.probe_passed("4xx", "2xx", None)
    assert not rb.probe_passed("4xx", "upstream-500", None)  # only parse failures may be the upstream 500
    assert rb.probe_passed("upstream", "upstream-500", None) and rb.probe_passed("upstream", "4xx", None)
    assert not rb.probe_passed("upstream", "5xx", None)
    assert rb.probe_passed("ok", "2xx", None) and not rb.probe_passed("ok", "2xx", "count 4 > 3")


def test_the_matrix_builds_its_tensors_from_a_valid_request():
    ctx = rb.Context(Path("."), k=10, catalogue=list(range(1, 21)), dtypes={"exclude_item_ids__offsets": np.int32})
    rank = {"user_id": np.array([1, 2], np.int64), "item_id": np.array([3, 4], np.int64),
            "user_age": np.array([30.0, 40.0]), "item_price": np.array([1.0, 2.0]),
            "device": np.array([b"m", b"d"], object), "item_tags__values": np.array([1, 2, 3], np.int64),
            "item_tags__offsets": np.array([0, 1, 3], np.int32)}
    ret = {"user_id": np.array([1, 2], np.int64)}
    probes = rb.matrix(ctx)
    assert len({(p.name, p.model) for p in probes}) == len(probes)
    assert {p.expect for p in probes} == {"4xx", "upstream", "ok"}
    body = rb._json_body(rank)
    for p in probes:
        base = rank if p.model == rb.RANK else ret
        if p.arrays is not None:
            out = p.arrays(base)
            assert all(isinstance(a, np.ndarray) for a in out.values()), p.name
        if p.raw is not None:
            assert isinstance(p.raw(rb._json_body(base)), bytes), p.name
    by = {p.name: p for p in probes}
    assert by["1e40 in a continuous feature"].arrays(rank)["item_price"].tolist() == [1e40, 1e40]
    assert b"Infinity" in by["inf in JSON (Infinity, not JSON)"].raw(body)
    three = by["exclusions leave fewer than k items"].arrays(ret)
    assert three["exclude_item_ids__offsets"].tolist() == [0, 17, 34]
    # the check refuses an excluded id, a padding id among the items, and accepts a clean answer
    ok = {"item_ids": np.array([[1, 2, -1]]), "scores": np.array([[0.5, 0.4, 0.0]], np.float32), "count": np.array([2])}
    assert ctx.check_leave_three(ok) is None
    assert "excluded" in ctx.check_leave_three({**ok, "item_ids": np.array([[1, 9, -1]])})
    assert "padding" in ctx.check_leave_three({**ok, "item_ids": np.array([[1, -1, -1]])})


def test_the_report_table_names_every_measure():
    res = {"matrix": {"probes": 60, "4xx": 50, "upstream-500": 10, "5xx": 0, "2xx_unexpected": 0,
                      "ok_total": 8, "ok_passed": 8},
           "totals": {"requests": 1234, "errors": 0, "wrong": 0, "non_finite": 0},
           "promote": {"cycles": 3, "errors": 0, "model_ready_not_200": 0, "supervisor_actions": []},
           "faults": [{"model": "rank", "target": "stub", "recovered_s": 3.2, "ready_truthful": False, "ready_lied_s": 2.1},
                      {"model": "rank", "target": "tritonserver", "recovered_s": None, "ready_truthful": True,
                       "ready_lied_s": 0.04}]}
    text = rb.format_table(res)
    for needle in ("1234", "Triton front-end 500 (upstream)", "3.2 s", "not back", "no (2.10 s 200 while failing)",
                   "yes (0.04 s 200 while failing)", "supervisor actions during them", "0 / 0"):
        assert needle in text, needle
    md = rb.markdown_table(res)
    assert md.startswith("| measure | value | target |") and md.count("\n") == len(rb.summary_rows(res)) + 1


def test_the_ready_lie_is_the_time_200_was_said_while_requests_failed():
    # killed at 0; the endpoint says 200 until 0.1, not ready until the reload at 1.5; back at 1.6
    ready = [(0.02, 200), (0.06, 200), (0.1, 503), (0.5, 503), (1.5, 200), (1.58, 200), (1.7, 200)]
    failed = [0.0, 0.2, 0.6, 1.2]
    assert rb.ready_lie(ready, failed, 1.6) == (0.1, 0.1)  # the 200 after the reload is not a lie
    # a request failing after the endpoint said 200 again: that stretch lied as well
    assert rb.ready_lie(ready, [*failed, 1.52], 1.6) == (0.18, 0.1)
    # never said anything but 200 while down (the probe-only supervisor of before)
    assert rb.ready_lie([(0.05, 200), (1.0, 200), (3.0, 200)], [0.0, 1.0, 2.0], 3.1) == (3.1, None)
    # a killed tritonserver: no answer (0) from the first sample on
    assert rb.ready_lie([(0.01, 0), (1.0, 0), (2.0, 200)], [0.0, 1.0], 2.0) == (0.0, 0.01)
