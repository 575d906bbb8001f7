"""ETL on a dask cluster (``etl.dask``): a real ``dask scheduler`` and two ``dask worker``
processes on 127.0.0.1, started here, must give the same transformed data, schema and fitted
workflow as the in-process run; an unreachable scheduler is a clear error."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pandas as pd
import pytest

from pipeline_lib.data import sessions as session_data
from pipeline_lib.etl import workflow as etl
from pipeline_lib.etl import sessions
from pipeline_lib.config import DaskConfig, EtlConfig, load_config
from tests.support import ROOT

pytestmark = pytest.mark.integration

# several partitions per split, so the work really spreads over both workers
PART_SIZE = "40KB"


@pytest.fixture(scope="module")
def dask_cluster(tmp_path_factory):
    """``dask scheduler`` + two ``dask worker`` processes (1 thread, 2 GB each), the same
    interpreter and environment as the tests, their working directory elsewhere than ours."""
    root = tmp_path_factory.mktemp("dask")
    sched_file = root / "scheduler.json"
    # the project root first: the workers run functions of this module (``tests.integration...``), and feast
    # installs a top-level ``tests`` package into site-packages that would shadow ours outside the root
    path = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH", "")) if p)
    env = dict(os.environ, PYTHONWARNINGS="ignore", TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=path)
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
            try:  # they exit in well under a second; one that hangs in its shutdown (seen on a loaded
                p.wait(timeout=5)  # machine: 20 s) is killed, which leaves nothing behind either
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()
        for log in logs:
            log.close()


@pytest.fixture(scope="module")
def in_process(small_split, tmp_path_factory):
    """The small split's ranking ETL in-process (the reference both cluster runs below must equal)."""
    cfg, split = small_split
    return etl.fit_transform(cfg.columns, EtlConfig(device="cpu", part_size=PART_SIZE), split,
                             tmp_path_factory.mktemp("in_process") / "a")


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


def test_ranking_etl_on_an_existing_cluster_equals_in_process(tmp_path_factory, small_split, in_process, dask_cluster):
    cfg, split = small_split
    cols = cfg.columns
    from dask.distributed import Client
    from merlin.io import Dataset

    assert Dataset(str(split.train), engine="parquet", part_size=PART_SIZE, cpu=True).npartitions > 1
    local = in_process
    with Client(dask_cluster, set_as_default=False) as c:
        before = c.run(_executed)
        on_cluster = etl.fit_transform(
            cols, EtlConfig(device="cpu", part_size=PART_SIZE, dask={"scheduler_address": dask_cluster}),
            split, tmp_path_factory.mktemp("on_cluster") / "a")  # as long as in_process's folder (_same_etl)
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


def test_local_workers_equal_in_process_and_leave_nothing_behind(tmp_path_factory, small_split, in_process):
    from merlin.core import dispatch
    from merlin.core.utils import global_dask_client

    cfg, split = small_split
    local = in_process
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
        cfg.columns, EtlConfig(device="cpu", part_size=PART_SIZE, dask={"local_workers": 2}), split,
        tmp_path_factory.mktemp("on_workers") / "a")  # as long as in_process's folder (_same_etl)
    _same_etl(local.workflow_dir.parent, on_workers.workflow_dir.parent)


def _flatten_is_patched() -> bool:
    from merlin.core import dispatch

    return dispatch.flatten_list_column_values.__module__ == "pipeline_lib.etl.workflow"
