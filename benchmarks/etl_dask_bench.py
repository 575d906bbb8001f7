"""ETL on local dask worker processes (``etl.dask.local_workers``) against the default in-process
run, on CPU: the pipeline's ``etl.fit_transform`` on the ETL benchmark's data (``etl_bench.prepare_data``).

Each configuration runs in its own fresh interpreter; its time includes starting and stopping the
local cluster (what a run pays). The outputs must be identical (transformed parquet compared
column by column; vocabularies are checked by tests/test_etl_dask.py).

    python -m benchmarks.etl_dask_bench --rows 1000000 --workers 2
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def child_main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--train", required=True)
    p.add_argument("--valid", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--result", required=True)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--part-size", default="256MB")
    a = p.parse_args(argv)
    import nvtabular  # noqa: F401  (imports are not part of the measured time)

    from pipeline_lib.etl import workflow as etl
    from pipeline_lib.config import ColumnsConfig, EtlConfig

    cfg = EtlConfig(device="cpu", part_size=a.part_size,
                    dask={"local_workers": a.workers or None, "memory_limit": "0"})
    t0 = time.perf_counter()
    out = etl.fit_transform(ColumnsConfig(), cfg, etl.SplitPaths(Path(a.train), Path(a.valid)), Path(a.out))
    seconds = time.perf_counter() - t0
    Path(a.result).write_text(json.dumps({"seconds": seconds, "train_dir": str(out.train_dir)}))


def _child(d: dict, out: Path, workers: int, part_size: str, timeout_s: float) -> dict:
    out.mkdir(parents=True, exist_ok=True)
    result = out / "result.json"
    cmd = [sys.executable, "-m", "benchmarks.etl_dask_bench", "--train", d["train"], "--valid", d["valid"],
           "--out", str(out / "etl"), "--result", str(result), "--workers", str(workers), "--part-size", part_size]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONWARNINGS="ignore")
    with open(out / "log.txt", "wb") as log:
        rc = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT, timeout=timeout_s).returncode
    if rc:
        raise RuntimeError(f"ETL child (workers={workers}) failed ({rc}):\n{(out / 'log.txt').read_text()[-3000:]}")
    return json.loads(result.read_text())


def _with_row_groups(d: dict, rows_per_group: int, out: Path) -> dict:
    """The same train/valid tables rewritten in row groups of ``rows_per_group`` rows: NVTabular
    splits a parquet file into partitions only at row-group boundaries, and ``split_raw`` (pandas'
    defaults) writes up to 1Mi rows per group, i.e. one partition per split at 1M rows."""
    import pyarrow.parquet as pq

    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for split in ("train", "valid"):
        paths[split] = str(out / f"{split}.parquet")
        if not Path(paths[split]).exists():
            pq.write_table(pq.read_table(d[split]), paths[split], row_group_size=rows_per_group)
    return {**d, **paths}


def bench(rows: int, workers: int, work: Path, data_dir: Path, part_size: str = "64MB",
          row_group_rows: int = 0, timeout_s: float = 1800) -> dict:
    from benchmarks import etl_bench

    d = etl_bench.prepare_data(rows, data_dir)
    if row_group_rows:
        d = _with_row_groups(d, row_group_rows, data_dir / f"rows{rows}_rg{row_group_rows}")
    tag = f"rg{row_group_rows}" if row_group_rows else "as_split"
    base = _child(d, work / tag / "in_process", 0, part_size, timeout_s)
    dist = _child(d, work / tag / f"local_workers_{workers}", workers, part_size, timeout_s)
    cmp = etl_bench.compare_outputs(base["train_dir"], dist["train_dir"])
    import pyarrow.parquet as pq

    return {
        "rows": rows, "train_row_groups": pq.ParquetFile(d["train"]).metadata.num_row_groups,
        "part_size": part_size, "cpus": os.cpu_count(), "load_avg_1m": round(os.getloadavg()[0], 2),
        "in_process_s": round(base["seconds"], 2), "workers": workers, "local_workers_s": round(dist["seconds"], 2),
        "ratio_in_process_over_workers": round(base["seconds"] / dist["seconds"], 2),
        "outputs_equal": bool(cmp["categoricals_identical"] and cmp["max_float_abs_diff"] == 0.0),
    }


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description="in-process ETL vs etl.dask.local_workers (CPU)")
    p.add_argument("--rows", type=float, default=1e6)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--part-size", default="64MB", help="NVTabular partition size (both runs)")
    p.add_argument("--row-groups", default="0,100000",
                   help="input layouts, rows per parquet row group (0 = as split_raw writes it)")
    p.add_argument("--work", default=str(ROOT / "benchmarks" / "results" / "etl_dask"))
    p.add_argument("--data", default=str(ROOT / "benchmarks" / "results" / ".data"))
    a = p.parse_args(argv)
    results = []
    for rg in (int(float(x)) for x in a.row_groups.split(",")):
        r = bench(int(a.rows), a.workers, Path(a.work), Path(a.data), a.part_size, rg)
        results.append(r)
        print(json.dumps(r), flush=True)
    for r in results:
        print(f"ETL {r['rows']:,} rows ({r['train_row_groups']} train row groups, part_size {r['part_size']}): "
              f"in-process {r['in_process_s']} s, {r['workers']} local workers {r['local_workers_s']} s "
              f"-> in-process/workers = {r['ratio_in_process_over_workers']} (outputs equal: {r['outputs_equal']}, "
              f"load {r['load_avg_1m']} on {r['cpus']} cpus)")


if __name__ == "__main__":
    if "--result" in sys.argv:
        child_main()
    else:
        main()
