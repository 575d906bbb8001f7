"""ETL benchmark: the pipeline's NVTabular workflow against plain pandas doing the same transforms.

Both sides read the same raw train/valid parquet (the synthetic generator's data split like the
pipeline does), fit on train, transform train and valid, and write parquet. Each side runs in
its own child process (``python -m benchmarks.etl_bench --impl nvt|pandas ...``) so that its peak
memory (``ru_maxrss`` of that child) is not polluted by the other side or by the parent.

The pandas reference reproduces NVTabular 23.08's semantics exactly (a test checks equality on
a tiny input):

- Categorify: vocabulary = distinct non-null training values ordered by frequency (descending;
  ties broken exactly like NVTabular: values sorted ascending, then a quicksort on the count),
  dropping values rarer than ``freq_threshold``; index 0 = padding, 1 = null, 2 = out of
  vocabulary, vocabulary from 3. Lists: the same on the flattened values, offsets kept.
- continuous: FillMedian (the training median) -> optional LogOp (``log(float32(x) + 1)``) -> Normalize with the
  training mean and the sum-of-squares sample std (ddof=1) -> float32.
- the label passes through.
"""
from __future__ import annotations

import argparse
import functools
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
from pipeline_lib.data import synthetic

PAD, NULL, OOV, FIRST = 0, 1, 2, 3


# --- data -------------------------------------------------------------------------------------


def synthetic_config(rows: int):
    """The embedded default generator, scaled: ~100 interactions per user, ~200 per item."""
    from pipeline_lib.config import SyntheticConfig

    return SyntheticConfig(n_interactions=rows, n_users=max(2_000, rows // 100), n_items=max(1_000, rows // 200))


def prepare_data(rows: int, data_dir: Path, seed: int = 42) -> dict:
    """Raw interactions (pipeline_lib.data.sources.generate_interactions) split like the pipeline
    (pipeline_lib.etl.workflow.split_raw). Cached per size/seed under ``data_dir``."""
    from pipeline_lib.etl import workflow as etl
    from pipeline_lib.config import ColumnsConfig, SplitConfig

    d = data_dir / f"rows{rows}_seed{seed}"
    train, valid = d / "split" / "train.parquet", d / "split" / "valid.parquet"
    if not (train.exists() and valid.exists()):
        d.mkdir(parents=True, exist_ok=True)
        t0 = time.perf_counter()
        df = synthetic.generate_interactions(synthetic_config(rows), seed)
        raw = d / "interactions.parquet"
        df.to_parquet(raw, index=False)
        del df
        paths = etl.split_raw(raw, SplitConfig(), ColumnsConfig(), seed, d / "split")
        # the benchmark transforms train and every held-out row (validation + test): the rows it
        # generated, as with the former two-way split
        pd.concat([pd.read_parquet(paths.valid), pd.read_parquet(paths.test)],
                  ignore_index=True).to_parquet(paths.valid, index=False)
        paths.test.unlink()
        raw.unlink()
        (d / "generated_seconds.txt").write_text(f"{time.perf_counter() - t0:.2f}\n")
    import pyarrow.parquet as pq

    n_train, n_valid = pq.ParquetFile(train).metadata.num_rows, pq.ParquetFile(valid).metadata.num_rows
    return {"train": str(train), "valid": str(valid), "n_train": n_train, "n_valid": n_valid,
            "bytes": train.stat().st_size + valid.stat().st_size}


# --- the pandas reference -----------------------------------------------------------------------


def _vocab(values: pd.Series, freq_threshold: int = 0) -> pd.Index:
    """Distinct non-null values in NVTabular's order (frequency descending, same tie-breaking)."""
    counts = values.value_counts(dropna=True, sort=False)
    return vocab_order(counts.index, counts.to_numpy(), freq_threshold)


def vocab_order(values, sizes: np.ndarray, freq_threshold: int = 0) -> pd.Index:
    """Distinct values and their training counts -> NVTabular's vocabulary order: values sorted
    ascending, then a quicksort on the count, descending (NVTabular's tie-breaking); rare values dropped."""
    df = pd.DataFrame({"v": values, "size": sizes})
    df = df.sort_values("v", na_position="first", ignore_index=True)
    df = df.sort_values("size", ascending=False, ignore_index=True)
    if freq_threshold:
        df = df[df["size"] >= freq_threshold]
    return pd.Index(df["v"])


def _encode(values: pd.Series, vocab: pd.Index) -> np.ndarray:
    codes = vocab.get_indexer(values)
    out = np.where(codes < 0, OOV, codes + FIRST).astype(np.int64)
    if values.hasnans:
        out[values.isna().to_numpy()] = NULL
    return out


def _list_parts(table, name: str) -> tuple[np.ndarray, np.ndarray]:
    """Flat values and row offsets of a list column of a pyarrow table (no per-row Python)."""
    arr = table.column(name).combine_chunks()
    offsets = arr.offsets.to_numpy().astype(np.int64)
    values = arr.values.to_numpy(zero_copy_only=False)
    base = offsets[0]
    return values[base: offsets[-1]] if base else values, offsets - base


def _read(path: str, columns):
    import pyarrow.parquet as pq

    return pq.read_table(path, columns=list(columns.input_columns))


class PandasEtl:
    """fit() on the training table, transform() any table: the pipeline workflow's transforms."""

    def __init__(self, columns):
        from pipeline_lib.config import FeatureKind

        self.columns = columns
        self.categorical = [columns.user_id, columns.item_id] + [
            f.name for f in columns.features if f.kind == FeatureKind.categorical]
        self.lists = [f.name for f in columns.features if f.kind == FeatureKind.list]
        self.continuous = [f for f in columns.features if f.kind == FeatureKind.continuous]
        self.thresholds = {f.name: f.freq_threshold for f in columns.features}
        self.vocabs: dict[str, pd.Index] = {}
        self.moments: dict[str, tuple[float, float]] = {}
        self.medians: dict[str, float] = {}

    def _continuous(self, s: pd.Series, log: bool) -> pd.Series:
        s = s.fillna(self.medians[s.name])
        if log:
            s = np.log(s.astype(np.float32) + 1)
        return s

    def fit(self, table) -> "PandasEtl":
        df = table.drop([*self.lists]).to_pandas() if self.lists else table.to_pandas()
        for c in self.categorical:
            self.vocabs[c] = _vocab(df[c], self.thresholds.get(c, 0))
        for c in self.lists:
            values, _ = _list_parts(table, c)
            self.vocabs[c] = _vocab(pd.Series(values), self.thresholds.get(c, 0))
        for f in self.continuous:
            self.medians[f.name] = float(df[f.name].median())
            x = self._continuous(df[f.name], f.log)
            n = float(x.count())
            s, s2 = float(x.sum().astype("float64")), float(x.astype("float64").pow(2).sum())
            var = (s2 - s ** 2 / n) / max(n - 1, 1)
            self.moments[f.name] = (s / n, float(np.sqrt(var)))
        return self

    def transform(self, table):
        """-> pyarrow table with the workflow's output columns, order and dtypes."""
        import pyarrow as pa

        df = table.drop([*self.lists]).to_pandas() if self.lists else table.to_pandas()
        cols: dict[str, pa.Array] = {}
        for name in self.columns.input_columns:
            if name in self.lists:
                values, offsets = _list_parts(table, name)
                codes = _encode(pd.Series(values), self.vocabs[name])
                cols[name] = pa.ListArray.from_arrays(pa.array(offsets.astype(np.int32)), pa.array(codes))
            elif name in self.vocabs:
                cols[name] = pa.array(_encode(df[name], self.vocabs[name]))
            elif name in self.moments:
                f = next(f for f in self.continuous if f.name == name)
                mean, std = self.moments[name]
                x = self._continuous(df[name], f.log)
                x = (x - mean) / std if std > 0 else x - mean
                cols[name] = pa.array(x.astype(np.float64).astype(np.float32).to_numpy())
            else:  # label
                cols[name] = pa.array(df[name].to_numpy())
        return pa.table(cols)

    def save(self, out_dir: Path) -> None:
        out_dir.mkdir(parents=True, exist_ok=True)
        for name, vocab in self.vocabs.items():
            pd.DataFrame({name: vocab}).to_parquet(out_dir / f"unique.{name}.parquet", index=False)
        (out_dir / "moments.json").write_text(json.dumps(self.moments))


def pandas_fit_transform(columns, train: str, valid: str, out_dir: Path) -> dict:
    import pyarrow.parquet as pq

    out_dir.mkdir(parents=True, exist_ok=True)
    etl = PandasEtl(columns).fit(_read(train, columns))
    for split, path in (("train", train), ("valid", valid)):
        (out_dir / split).mkdir(parents=True, exist_ok=True)
        pq.write_table(etl.transform(_read(path, columns)), out_dir / split / "part_0.parquet")
    etl.save(out_dir / "workflow")
    return {"train_dir": str(out_dir / "train"), "valid_dir": str(out_dir / "valid")}


def nvt_fit_transform(columns, train: str, valid: str, out_dir: Path, fast_path: bool = True) -> dict:
    """The pipeline's ETL (``etl.fit_transform``); ``fast_path=False``: NVTabular itself (``etl.fast_path``)."""
    from pipeline_lib.etl import workflow as etl
    from pipeline_lib.config import EtlConfig

    out = etl.fit_transform(columns, EtlConfig(device="cpu", fast_path=fast_path),
                            etl.SplitPaths(Path(train), Path(valid)), out_dir)
    return {"train_dir": str(out.train_dir), "valid_dir": str(out.valid_dir), "etl_path": out.etl_path}


# --- child process --------------------------------------------------------------------------------

# nvt: the pipeline's ETL (the fast CPU path, etl.fast_path, verified against NVTabular; NVTabular with
# fast_list_flatten where it falls back); nvt_stock: NVTabular with the project's fast paths off (etl.fast_path
# and RECSYS_NVT_FAST_FLATTEN); pandas: the reference above; polars: benchmarks/etl_peers.py
IMPLS = ("nvt", "pandas", "nvt_stock", "polars")


def _implementation(impl: str):
    if impl == "polars":
        from benchmarks.etl_peers import polars_fit_transform

        return polars_fit_transform
    if impl == "nvt_stock":
        return functools.partial(nvt_fit_transform, fast_path=False)
    return pandas_fit_transform if impl == "pandas" else nvt_fit_transform


def _rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def _peak_rss_mb() -> float:
    """Peak resident memory of this process image: VmHWM, the high-water mark of the address space
    created at exec. (``ru_maxrss`` is not used: Linux carries the forking parent's peak across
    fork + exec into the child's ru_maxrss, so a parent holding the generated data would show up.)"""
    try:
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child_main(argv=None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--impl", choices=IMPLS, required=True)
    p.add_argument("--train", required=True)
    p.add_argument("--valid", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--result", required=True)
    a = p.parse_args(argv)
    t0 = time.perf_counter()
    from pipeline_lib.config import ColumnsConfig

    if a.impl.startswith("nvt"):
        import nvtabular  # noqa: F401  (imports are not part of the measured ETL time)
        from merlin.io import Dataset  # noqa: F401
    if a.impl == "nvt_stock":  # stock NVTabular: the project's fast paths off (benchmarks/etl_peers.py)
        os.environ["RECSYS_NVT_FAST_FLATTEN"] = "0"
    if a.impl == "polars":
        import polars  # noqa: F401
    import pyarrow.parquet  # noqa: F401

    import_s = time.perf_counter() - t0
    rss_after_imports = _rss_mb()
    fn = _implementation(a.impl)
    t1 = time.perf_counter()
    out = fn(ColumnsConfig(), a.train, a.valid, Path(a.out))
    seconds = time.perf_counter() - t1
    peak_mb = _peak_rss_mb()
    Path(a.result).write_text(json.dumps({
        "impl": a.impl, "seconds": seconds, "import_seconds": import_s,
        "rss_after_imports_mb": rss_after_imports, "peak_rss_mb": peak_mb, **out,
    }))


def run_child(impl: str, train: str, valid: str, out_dir: Path, timeout_s: float = 1800) -> dict:
    """One side in a fresh interpreter, which reports its own peak memory (VmHWM)."""
    import subprocess

    out_dir.mkdir(parents=True, exist_ok=True)
    result = out_dir / f"{impl}.json"
    cmd = [sys.executable, "-m", "benchmarks.etl_bench", "--impl", impl, "--train", train, "--valid", valid,
           "--out", str(out_dir / impl), "--result", str(result)]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONWARNINGS="ignore")
    log = open(out_dir / f"{impl}.log", "wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env,
                            cwd=Path(__file__).resolve().parent.parent)
    deadline = time.monotonic() + timeout_s
    while True:
        pid, status, _ = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if time.monotonic() > deadline:
            proc.kill()
            os.wait4(proc.pid, 0)
            raise TimeoutError(f"ETL {impl} child ran past {timeout_s:.0f} s")
        time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    log.close()
    if proc.returncode != 0:
        tail = (out_dir / f"{impl}.log").read_text(errors="replace")[-3000:]
        raise RuntimeError(f"ETL {impl} child failed ({proc.returncode}):\n{tail}")
    return json.loads(result.read_text())


def compare_outputs(nvt_dir: str, pandas_dir: str) -> dict:
    """Column-by-column comparison of two transformed parquet folders (part_0.parquet each)."""
    import pyarrow.parquet as pq

    a = pq.read_table(Path(nvt_dir) / "part_0.parquet")
    b = pq.read_table(Path(pandas_dir) / "part_0.parquet")
    report = {"columns_nvt": a.column_names, "columns_pandas": b.column_names, "rows": [a.num_rows, b.num_rows],
              "max_abs_diff": {}, "dtypes_equal": {}}
    for c in a.column_names:
        if c not in b.column_names:
            report["max_abs_diff"][c] = None
            continue
        if str(a.schema.field(c).type).startswith(("list", "large_list")):
            xv, xo = _list_parts(a, c)
            yv, yo = _list_parts(b, c)
            if not np.array_equal(xo, yo):
                report["max_abs_diff"][c] = float("inf")
                continue
        else:
            xv = a.column(c).to_numpy()
            yv = b.column(c).to_numpy()
        report["dtypes_equal"][c] = bool(xv.dtype == yv.dtype)
        diff = np.abs(xv.astype(np.float64) - yv.astype(np.float64))
        report["max_abs_diff"][c] = float(diff.max()) if len(diff) else 0.0
    same_shape = a.column_names == b.column_names and a.num_rows == b.num_rows and all(report["dtypes_equal"].values())
    floats = [c for c in a.column_names if str(a.schema.field(c).type).startswith(("float", "double"))]
    others = [c for c in a.column_names if c not in floats]
    report["categoricals_identical"] = bool(same_shape and all(report["max_abs_diff"].get(c) == 0.0 for c in others))
    report["max_float_abs_diff"] = max((report["max_abs_diff"].get(c) or 0.0 for c in floats), default=0.0)
    report["equal"] = bool(report["categoricals_identical"] and report["max_float_abs_diff"] <= 1e-6)
    return report


def side_summary(r: dict, n_rows: int) -> dict:
    """A child's result (run_child) -> the figures the report keeps; rows/s over ``n_rows``."""
    return {
        "seconds": round(r["seconds"], 3), "rows_per_s": round(n_rows / r["seconds"]),
        "peak_rss_mb": round(r["peak_rss_mb"], 1), "rss_after_imports_mb": round(r["rss_after_imports_mb"], 1),
        "import_seconds": round(r["import_seconds"], 2), "train_dir": r["train_dir"], "valid_dir": r["valid_dir"],
        **({"etl_path": r["etl_path"]} if "etl_path" in r else {}),
    }


def bench(rows: int, work: Path, data_dir: Path) -> dict:
    """Both sides on the same data; ratio = NVTabular pipeline time / pandas time."""
    d = prepare_data(rows, data_dir)
    out = {"rows": rows, "n_train": d["n_train"], "n_valid": d["n_valid"], "input_mb": d["bytes"] / 2**20}
    n = d["n_train"] + d["n_valid"]
    for impl in ("nvt", "pandas"):
        out[impl] = side_summary(run_child(impl, d["train"], d["valid"], work / f"etl_{rows}"), n)
    out["time_ratio_nvt_over_pandas"] = round(out["nvt"]["seconds"] / out["pandas"]["seconds"], 2)
    out["peak_mem_ratio_nvt_over_pandas"] = round(out["nvt"]["peak_rss_mb"] / out["pandas"]["peak_rss_mb"], 2)
    cmp = compare_outputs(out["nvt"]["train_dir"], out["pandas"]["train_dir"])
    out["outputs_equal"] = bool(cmp["equal"])
    # NVTabular sums float32 columns per partition for Normalize's moments, so once the input spans
    # several partitions its mean/std differ from a single-pass sum in the last float32 digits
    out["categoricals_identical"] = cmp["categoricals_identical"]
    out["max_float_abs_diff"] = cmp["max_float_abs_diff"]
    out["max_abs_diff"] = cmp["max_abs_diff"]
    return out


# the issue's target for the pipeline's CPU ETL (issue 14 item 5): at 10M rows at least as fast as plain pandas
TARGET_NVT_OVER_PANDAS, TARGET_ROWS = 1.0, 10_000_000


def target_line(e: dict) -> str:
    """The ETL section's headline for one size: pipeline time / pandas time, against the target at 10M rows."""
    ratio = e["time_ratio_nvt_over_pandas"]
    verdict = "met" if ratio <= TARGET_NVT_OVER_PANDAS else "NOT met"
    target = (f"target <= {TARGET_NVT_OVER_PANDAS:g} at {TARGET_ROWS:,} rows: {verdict}" if e["rows"] >= TARGET_ROWS
              else f"target <= {TARGET_NVT_OVER_PANDAS:g} applies at {TARGET_ROWS:,} rows; here {verdict}")
    # floats: NVTabular's float32 moment sums per partition differ from pandas's single pass by < 1e-4
    return (f"ETL {e['rows']:,} rows: pipeline time / plain pandas time = {ratio} ({target}); categoricals "
            f"identical: {'yes' if e['categoricals_identical'] else 'NO'}, max float diff "
            f"{e['max_float_abs_diff']:.1e}; pipeline path: {e['nvt'].get('etl_path', '?')}")


if __name__ == "__main__":
    child_main()
