"""ETL peers: the pipeline's ETL against the tools a user could pick instead, same transforms, same data.

On the raw train/valid parquet of ``benchmarks/etl_bench.py`` (same generator, same split), each in
its own child process (``etl_bench.run_child``), fit on train, transform train and valid, write parquet:

- ``nvt``: the pipeline's ETL (``pipeline_lib.etl.workflow.fit_transform``: on CPU the fast path of
  ``pipeline_lib/etl/fast_etl.py``, verified against NVTabular at fit time);
- ``nvt_stock``: the same workflow with the project's fast paths off (``etl.fast_path: false`` and
  ``RECSYS_NVT_FAST_FLATTEN=0``), i.e. stock NVTabular 23.08;
- ``pandas``: ``etl_bench.PandasEtl``, the plain pandas/numpy reference;
- ``polars``: :class:`PolarsEtl` below, the same transforms written in polars.

Every peer's train and valid output is compared column by column with the pipeline's output
(``etl_bench.compare_outputs``): categorical and list columns identical, continuous columns within
``FLOAT_TOL``; a time ratio is only meaningful when they are equal.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from benchmarks import etl_bench

PEERS = ("pandas", "nvt_stock", "polars")
# equal = categorical and list columns identical, continuous columns within this absolute difference:
# float32 rounding (polars' float32 log and sum differ from numpy's in the last bit; NVTabular sums
# float32 columns per partition, so a multi-partition input moves its moments in the last digits)
FLOAT_TOL = 1e-4
TARGET_NVT_OVER_PANDAS = etl_bench.TARGET_NVT_OVER_PANDAS  # the target: at least as fast as plain pandas


class PolarsEtl(etl_bench.PandasEtl):
    """The pipeline workflow's transforms in polars (columns and fitted statistics as PandasEtl):
    Categorify through ``replace_strict`` (lists through ``list.eval``), FillMedian -> LogOp ->
    Normalize as expressions. The vocabulary *order* (NVTabular's frequency order and tie-breaking,
    a numpy quicksort) is computed by ``etl_bench.vocab_order`` on the distinct values only."""

    def fit(self, df) -> "PolarsEtl":
        import polars as pl

        for c in self.categorical + self.lists:
            values = df[c].explode() if c in self.lists else df[c]
            counts = values.drop_nulls().value_counts()
            self.vocabs[c] = etl_bench.vocab_order(counts[c].to_numpy(), counts["count"].to_numpy(),
                                                   self.thresholds.get(c, 0))
        for f in self.continuous:
            self.medians[f.name] = float(df[f.name].median())
            x = df.select(self._continuous_expr(f)).to_series()
            n = float(x.count())
            s, s2 = float(x.sum()), float((x.cast(pl.Float64) ** 2).sum())
            var = (s2 - s ** 2 / n) / max(n - 1, 1)
            self.moments[f.name] = (s / n, float(np.sqrt(var)))
        return self

    def _continuous_expr(self, f):
        import polars as pl

        x = pl.col(f.name).fill_null(self.medians[f.name])
        return (x.cast(pl.Float32) + 1).log() if f.log else x

    def _encode_expr(self, expr, name: str):
        import polars as pl

        vocab = self.vocabs[name]
        codes = pl.Series(np.arange(etl_bench.FIRST, etl_bench.FIRST + len(vocab), dtype=np.int64))
        mapped = expr.replace_strict(pl.Series(vocab.to_numpy()), codes, default=etl_bench.OOV,
                                     return_dtype=pl.Int64)
        return pl.when(expr.is_null()).then(pl.lit(etl_bench.NULL, pl.Int64)).otherwise(mapped)

    def transform(self, df):
        """-> polars DataFrame with the workflow's output columns, order and dtypes."""
        import polars as pl

        exprs = []
        for name in self.columns.input_columns:
            if name in self.lists:
                exprs.append(pl.col(name).list.eval(self._encode_expr(pl.element(), name)).alias(name))
            elif name in self.vocabs:
                exprs.append(self._encode_expr(pl.col(name), name).alias(name))
            elif name in self.moments:
                f = next(f for f in self.continuous if f.name == name)
                mean, std = self.moments[name]
                x = self._continuous_expr(f)
                x = (x - mean) / std if std > 0 else x - mean
                exprs.append(x.cast(pl.Float64).cast(pl.Float32).alias(name))
            else:  # label
                exprs.append(pl.col(name))
        return df.select(exprs)


def polars_fit_transform(columns, train: str, valid: str, out_dir: Path) -> dict:
    import polars as pl

    out_dir.mkdir(parents=True, exist_ok=True)
    cols = list(columns.input_columns)
    etl = PolarsEtl(columns).fit(pl.read_parquet(train, columns=cols))
    for split, path in (("train", train), ("valid", valid)):
        (out_dir / split).mkdir(parents=True, exist_ok=True)
        etl.transform(pl.read_parquet(path, columns=cols)).write_parquet(out_dir / split / "part_0.parquet")
    etl.save(out_dir / "workflow")
    return {"train_dir": str(out_dir / "train"), "valid_dir": str(out_dir / "valid")}


def _equality(nvt: dict, peer: dict) -> dict:
    """The peer's train and valid output against the pipeline's (NVTabular) output."""
    parts = [etl_bench.compare_outputs(nvt[k], peer[k]) for k in ("train_dir", "valid_dir")]
    same = all(p["categoricals_identical"] for p in parts)
    diff = max(p["max_float_abs_diff"] for p in parts)
    return {"categoricals_identical": same, "max_float_abs_diff": diff, "equal": bool(same and diff <= FLOAT_TOL)}


def bench(rows: int, work: Path, data_dir: Path, done: dict | None = None) -> dict:
    """The four ETLs on the same data. ``done``: the ETL section's entry for this size (its ``nvt`` and
    ``pandas`` sides are reused, so every ratio still comes from one run)."""
    d = etl_bench.prepare_data(rows, data_dir)
    n = d["n_train"] + d["n_valid"]
    out: dict = {"rows": rows, "n_train": d["n_train"], "n_valid": d["n_valid"]}
    for impl in ("nvt", *PEERS):
        if done and impl in done and "valid_dir" in done[impl]:
            out[impl] = dict(done[impl], reused_from_etl_section=True)
        else:
            out[impl] = etl_bench.side_summary(
                etl_bench.run_child(impl, d["train"], d["valid"], work / f"etl_{rows}"), n)
    for peer in PEERS:
        out[peer].update(_equality(out["nvt"], out[peer]))
        out[peer]["nvt_time_over_peer"] = round(out["nvt"]["seconds"] / out[peer]["seconds"], 2)
    out["outputs_equal"] = all(out[p]["equal"] for p in PEERS)
    return out


def ratio_lines(e: dict) -> list[str]:
    """One line per peer: the pipeline's ETL time over the peer's, with the target where the issue sets one."""
    lines = []
    for peer, label in (("pandas", "plain pandas"), ("nvt_stock", "stock NVTabular (fast paths off)"),
                        ("polars", "polars")):
        p = e[peer]
        ratio = p["nvt_time_over_peer"]
        target = (f"target <= {TARGET_NVT_OVER_PANDAS}: {'met' if ratio <= TARGET_NVT_OVER_PANDAS else 'NOT met'}"
                  if peer == "pandas" else "no target")
        lines.append(f"ETL {e['rows']:,} rows: pipeline time / {label} time = {ratio} ({target}); "
                     f"outputs equal: {'yes' if p['equal'] else 'NO'} (max float diff {p['max_float_abs_diff']:.1e})")
    return lines
