"""ETL on a dask cluster (``etl.dask``): a real ``dask scheduler`` and two ``dask worker``
processes on 127.0.0.1, started here, must give the same transformed data, schema and fitted
workflow as the in-process run; an unreachable scheduler is a clear error."""
from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from pipeline_lib.data import sessions as session_data
from pipeline_lib.etl import workflow as etl
from pipeline_lib.etl import sessions
from pipeline_lib.config import DaskConfig, EtlConfig, load_config

# several partitions per split, so the work really spreads over both workers
PART_SIZE = "40KB"


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    """``dask scheduler`` + two ``dask worker`` processes (1 thread, 2 GB each), the same
    interpreter and environment as the tests, their working directory elsewhere than ours."""
    root = tmp_path_factory.mktemp("dask")
    sched_file = root / "scheduler.json"
    env = dict(os.environ, PYTHONWARNINGS="ignore", TF_CPP_MIN_LOG_LEVEL="2")
    logs, procs = [], []

    def start(args, name):
        log = open(root / f"{name}.log", "wb")
        logs.append(log)
        procs.append(subprocess.Popen([sys.executable, "-m", *args], cwd=root, env=env, stdout=log,
                                      stderr=subprocess.STDOUT))

    try:
        start(["distributed.cli.dask_scheduler", "--host", "127.0.0.1", "--port", "0", "--no-dashboard",
               "--scheduler-file", str(sched_file)], "scheduler")
        deadline = time.monotonic() + 120
        while not sched_file.exists() or not sched_file.read_text().strip():
            assert procs[0].poll() is None, (root / "scheduler.log").read_text()
            assert time.monotonic() < deadline, "dask scheduler did not start"
            time.sleep(0.2)
        time.sleep(0.2)  # the file is written in one go, but be sure it is complete
        address = json.loads(sched_file.read_text())["address"]
        for i in range(2):
            start(["distributed.cli.dask_worker", "--scheduler-file", str(sched_file), "--host", "127.0.0.1",
                   "--nthreads", "1", "--memory-limit", "2GB", "--no-dashboard", "--no-nanny",
                   "--name", f"w{i}"], f"worker{i}")
        from dask.distributed import Client

        with Client(address, timeout=30) as c:
            c.wait_for_workers(2, timeout=120)
        yield address
    finally:
        for p in reversed(procs):
            p.terminate()
        for p in reversed(procs):
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for log in logs:
            log.close()


@pytest.fixture(scope="module")
def small_split(tmp_path_factory):
    """The suite's small synthetic run (tests/conftest.py), raw data split only (no training)."""
    from .conftest import small_config
    from pipeline_lib.data import sources as data

    root = tmp_path_factory.mktemp("split")
    cfg = small_config(root)
    raw = data.write_raw(cfg.data, cfg.seed, root / "raw")
    split = etl.split_raw(raw, cfg.split, cfg.columns, cfg.seed, root / "split")
    # small row groups: NVTabular partitions by row group, so the data spans several partitions
    for path in (split.train, split.valid):
        pq.write_table(pq.read_table(path), path, row_group_size=500)
    return cfg, split


def _same_etl(a_root: Path, b_root: Path, data_dirs=("train", "valid")) -> None:
    """Transformed parquet, schema.pbtxt (run folder names aside) and the fitted workflow equal."""
    import nvtabular as nvt

    for d in data_dirs:
        x = pd.read_parquet(a_root / d / "part_0.parquet")
        y = pd.read_parquet(b_root / d / "part_0.parquet")
        assert len(x) > 0
        pd.testing.assert_frame_equal(x, y)  # same rows in the same order, values and dtypes
        # the text holds the run folder in serialized properties (length-prefixed): the two runs
        # use folders of equal length, so the texts match byte for byte once the folder is replaced
        assert len(str(a_root)) == len(str(b_root))
        sa = (a_root / d / "schema.pbtxt").read_text().replace(str(a_root), "<run>")
        sb = (b_root / d / "schema.pbtxt").read_text().replace(str(b_root), "<run>")
        assert sa == sb
    # Categorify vocabularies, as fitted (fit/) and as saved with the workflow (workflow/categories/)
    for sub in ("fit/categories", "workflow/categories"):
        names = sorted(p.name for p in (a_root / sub).glob("*.parquet"))
        assert names and names == sorted(p.name for p in (b_root / sub).glob("*.parquet")), sub
        for n in names:
            pd.testing.assert_frame_equal(pd.read_parquet(a_root / sub / n), pd.read_parquet(b_root / sub / n))
    wa, wb = nvt.Workflow.load(str(a_root / "workflow")), nvt.Workflow.load(str(b_root / "workflow"))
    assert wa.output_schema.column_names == wb.output_schema.column_names
    for col in wa.output_schema.column_names:
        pa = {k: v for k, v in wa.output_schema[col].properties.items() if k != "cat_path"}
        pb = {k: v for k, v in wb.output_schema[col].properties.items() if k != "cat_path"}
        assert pa == pb, col
    # fitted statistics of every op (Normalize's means/stds, ...)
    assert _fitted_stats(wa) == _fitted_stats(wb)


def _executed(dask_worker) -> int:
    return dask_worker.state.executed_count


def _fitted_stats(workflow) -> list:
    from merlin.dag.node import postorder_iter_nodes

    return [(type(n.op).__name__, getattr(n.op, "means", None), getattr(n.op, "stds", None))
            for n in postorder_iter_nodes(workflow.output_node)]


def test_ranking_etl_on_an_existing_cluster_equals_in_process(tmp_path, small_split, dask_cluster):
    cfg, split = small_split
    cols = cfg.columns
    from dask.distributed import Client
    from merlin.io import Dataset

    assert Dataset(str(split.train), engine="parquet", part_size=PART_SIZE, cpu=True).npartitions > 1
    local = etl.fit_transform(cols, EtlConfig(device="cpu", part_size=PART_SIZE), split, tmp_path / "a")
    with Client(dask_cluster, set_as_default=False) as c:
        before = c.run(_executed)
        on_cluster = etl.fit_transform(
            cols, EtlConfig(device="cpu", part_size=PART_SIZE, dask={"scheduler_address": dask_cluster}),
            split, tmp_path / "b")
        after = c.run(_executed)
    assert len(after) == 2 and all(after[w] > before[w] for w in after), (before, after)  # both workers worked
    _same_etl(local.workflow_dir.parent, on_cluster.workflow_dir.parent)
    # the client was ours only: nothing of it is left as a default or merlin client
    from merlin.core.utils import global_dask_client

    assert global_dask_client() is None


def test_session_etl_on_an_existing_cluster_equals_in_process(tmp_path, dask_cluster):
    over = {"task": "session", "etl": {"device": "cpu", "part_size": "20KB"},
            "session": {"synthetic": {"n_sessions": 400, "n_items": 60, "n_categories": 5}}}
    cfg = load_config(None, over)
    raw = session_data.write_raw_events(cfg.data, cfg.session, cfg.seed, tmp_path / "raw")
    local = sessions.run_session_etl(raw, cfg, tmp_path / "a", tmp_path / "split_a")
    cfg_c = load_config(None, {**over, "etl": {**over["etl"], "dask": {"scheduler_address": dask_cluster}}})
    on_cluster = sessions.run_session_etl(raw, cfg_c, tmp_path / "b", tmp_path / "split_b")
    pd.testing.assert_frame_equal(pd.read_parquet(local.sessions_path), pd.read_parquet(on_cluster.sessions_path))
    _same_etl(tmp_path / "a", tmp_path / "b")


def test_unreachable_scheduler_is_a_clear_error(tmp_path, small_split):
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    address = f"tcp://127.0.0.1:{port}"
    cfg = EtlConfig(device="cpu", dask={"scheduler_address": address, "connect_timeout_s": 2})
    t0 = time.monotonic()
    with pytest.raises(RuntimeError, match=r"127\.0\.0\.1:%d.*docs/scale\.md" % port):
        etl.fit_transform(small_split[0].columns, cfg, small_split[1], tmp_path / "t")
    assert time.monotonic() - t0 < 30


def test_dask_settings_validate():
    assert EtlConfig().dask == DaskConfig()  # nothing set: in-process on CPU, as before
    with pytest.raises(ValueError, match="not both"):
        DaskConfig(scheduler_address="tcp://h:8786", local_workers=2)
    with pytest.raises(ValueError):
        DaskConfig(local_workers=0)


def test_local_workers_equal_in_process_and_leave_nothing_behind(tmp_path, small_split):
    from merlin.core import dispatch
    from merlin.core.utils import global_dask_client

    cfg, split = small_split
    local = etl.fit_transform(cfg.columns, EtlConfig(device="cpu", part_size=PART_SIZE), split, tmp_path / "a")
    original = dispatch.flatten_list_column_values
    seen = {}
    with etl.dask_context("cpu", DaskConfig(local_workers=2, memory_limit="1GB")):
        client = global_dask_client()
        seen["workers"] = len(client.scheduler_info()["workers"])
        # the faster list flattening is installed in the worker processes too
        seen["patched"] = set(client.run(_flatten_is_patched).values())
    assert seen == {"workers": 2, "patched": {True}}
    assert global_dask_client() is None and dispatch.flatten_list_column_values is original
    on_workers = etl.fit_transform(
        cfg.columns, EtlConfig(device="cpu", part_size=PART_SIZE, dask={"local_workers": 2}), split, tmp_path / "b")
    _same_etl(local.workflow_dir.parent, on_workers.workflow_dir.parent)


def _flatten_is_patched() -> bool:
    from merlin.core import dispatch

    return dispatch.flatten_list_column_values.__module__ == "pipeline_lib.etl.workflow"


def test_gpu_context_builds_a_local_cuda_cluster_from_the_settings(monkeypatch):
    """No GPU here: dask_cuda.LocalCUDACluster is replaced by an in-process LocalCluster that records
    its arguments; the wiring (one worker per GPU unless local_workers, the RMM pool, the client
    current only inside) is what is checked."""
    import dask_cuda
    from dask.distributed import LocalCluster
    from merlin.core.utils import global_dask_client

    calls = []

    def fake(**kw):
        calls.append(kw)
        return LocalCluster(n_workers=1, processes=False, dashboard_address=None)

    monkeypatch.setattr(dask_cuda, "LocalCUDACluster", fake)
    with etl.dask_context("gpu", DaskConfig()):
        assert global_dask_client() is not None
    assert global_dask_client() is None
    with etl.dask_context("gpu", DaskConfig(local_workers=2, rmm_pool_size="20GB")):
        pass
    assert [(c["n_workers"], c["rmm_pool_size"]) for c in calls] == [(None, "0.8"), (2, "20GB")]


def test_gpu_check_dry_run_pieces(tmp_path):
    """The GPU check script parses, and its GPU-vs-CPU output comparison works (the whole dry run,
    ~1-2 min, is run by hand: scripts/gpu_check.sh --device cpu)."""
    import numpy as np

    from benchmarks import gpu_check

    root = Path(__file__).resolve().parent.parent
    assert subprocess.run(["bash", "-n", str(root / "scripts" / "gpu_check.sh")]).returncode == 0
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir(), b.mkdir()
    df = pd.DataFrame({"x": [3, 4], "f": np.array([0.5, 1.0], np.float32), "l": [np.array([3, 4]), np.array([5])]})
    df.to_parquet(a / "part_0.parquet")
    df.to_parquet(b / "part_0.parquet")
    assert gpu_check._compare(a, b)["equal"]
    df.assign(l=[np.array([3, 4]), np.array([6])]).to_parquet(b / "part_0.parquet")
    assert not gpu_check._compare(a, b)["equal"]
