"""The serving benchmark's served / in-process ratios for the default and the shared-memory client,
as computed, reported and printed (figures made up; the measured run is tests/integration/test_benchmarks.py)."""
from benchmarks import report, serving_bench, serving_peers


def _point(protocol: str, batch: int, p50: float, rows_per_s: float) -> dict:
    return {"protocol": protocol, "batch": batch, "clients": 1, "p50_ms": p50, "rows_per_s": rows_per_s}


def test_targets_hold_the_ratios_of_both_clients_against_the_faster_in_process_pass():
    out = {"in_process": [_point("in-process", 1, 0.5, 2000.0), _point("in-process", 1, 0.4, 2500.0),
                          _point("in-process", 1024, 3.0, 300_000.0), _point("in-process", 1024, 4.0, 250_000.0)],
           "served": [_point("grpc", 1, 1.0, 1000.0), _point("grpc", 1024, 8.0, 120_000.0)],
           "served_shared_memory": [_point("grpc+shm", 1, 0.5, 2000.0), _point("grpc+shm", 1024, 4.0, 250_000.0)]}
    t = serving_bench.targets(out)
    assert t["grpc_batch1_p50_over_inprocess"] == 2.5 and t["grpc_batch1_p50_le_1.5_inprocess"] is False
    assert t["grpc+shm_batch1_p50_over_inprocess"] == 1.25 and t["grpc+shm_batch1_p50_le_1.5_inprocess"] is True
    assert t["grpc_batch1024_throughput_over_inprocess"] == 0.4
    assert t["grpc+shm_batch1024_throughput_over_inprocess"] == 0.833
    assert t["grpc+shm_batch1024_throughput_ge_0.8_inprocess"] is True
    rows = report.inprocess_target_rows(t)
    assert ["served rows/s >= 0.8 x in-process, batch 1024, gRPC, shared-memory client, 1 client", "0.833 x in-process",
            "1.04", True] in rows
    assert ["served p50 <= 1.5 x in-process, batch 1, gRPC, default client, 1 client", "2.5 x in-process", "1.67",
            False] in rows


def test_peer_lines_name_the_shared_memory_client():
    served = {m: [_point("grpc", 1, p50, 0.0), _point("grpc", 1024, 0.0, rows)]
              for m, p50, rows in (("recsys", 1.0, 100_000.0), ("stock", 50.0, 4000.0), ("echo", 0.6, 300_000.0),
                                   ("recsys+shm", 0.9, 200_000.0), ("echo+shm", 0.5, 400_000.0))}
    s = {"served": served, "in_process": {"p50_ms": 0.5, "rows_per_s": 200_000.0},
         "max_abs_diff_served_vs_inprocess": {"recsys": 0.0, "stock": 1e-7}}
    s["ratios"] = serving_peers.ratios(s)
    lines = serving_peers.ratio_lines(s)
    assert lines[1].startswith("serving project ensemble: gRPC batch-1 p50 1.0 ms = 2.0 x in-process")
    assert lines[3].startswith("serving echo floor: ")
    assert lines[4] == ("serving project ensemble, shared-memory client: gRPC batch-1 p50 0.9 ms = 1.8 x in-process "
                        "(target <= 1.5: NOT met); batch-1024 200,000 rows/s = 1.0 x in-process (target >= 0.8: met)")
    assert lines[5].startswith("serving echo floor, shared-memory client: gRPC batch-1 p50 0.5 ms = 1.0 x in-process "
                               "(no target)")
