"""Training benchmark: DLRM fed by the Merlin loader (as pipeline_lib.models.ranking does) against the same
Keras model fed by a tf.data pipeline built here from the same transformed parquet.

The tf.data side reads the parquet with pyarrow into memory once, builds the list feature as a
``tf.RaggedTensor`` (row splits = the parquet offsets), cuts batches out of those tensors in a
``tf.data`` map (vectorised slice/gather per batch) and hands the model exactly what the Merlin
loader hands it: one ``(batch,)`` tensor per scalar feature,
``item_tags__values`` / ``item_tags__offsets`` for the ragged list, and the label tensor.

Throughput is samples per second over one epoch, excluding the first batch (graph tracing);
both sides use a freshly built model with the same seed, optimizer and batch size.
"""
from __future__ import annotations

import os
import time
from pathlib import Path

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")


def _first_parquet(d: Path) -> Path:
    return sorted(Path(d).glob("*.parquet"))[0]


def tf_dataset(train_dir: Path, schema, label: str, batch_size: int, shuffle: bool, seed: int = 42):
    """tf.data from the transformed parquet, matching the Merlin loader's output structure.

    The columns are read once (pyarrow) into tensors; the dataset yields batch indices and each
    batch is cut out with vectorised ops (dense: slice/gather; list feature: ``tf.RaggedTensor`` row
    slice/gather), so no per-row work happens in tf.data. ``shuffle``: one random permutation of
    all rows per epoch (a full row shuffle; Merlin's loader shuffles within partitions).
    """
    import pyarrow.parquet as pq
    import tensorflow as tf

    table = pq.read_table(_first_parquet(train_dir))
    dense, ragged, n = {}, {}, table.num_rows
    for col in schema:
        if col.name == label:
            continue
        arr = table.column(col.name).combine_chunks()
        if col.is_list:
            offsets = arr.offsets.to_numpy().astype(np.int64)
            values = arr.values.to_numpy(zero_copy_only=False)[offsets[0]: offsets[-1]]
            ragged[col.name] = tf.RaggedTensor.from_row_splits(values, offsets - offsets[0])
        else:
            dense[col.name] = tf.constant(arr.to_numpy(zero_copy_only=False))
    labels = tf.constant(table.column(label).to_numpy())
    n_batches = -(-n // batch_size)

    def take(batch_index, order):
        start = batch_index * batch_size
        idx = order[start:tf.minimum(start + batch_size, n)]
        x = {k: tf.gather(v, idx) for k, v in dense.items()}
        for k, v in ragged.items():
            rt = tf.gather(v, idx)
            x[f"{k}__values"] = rt.values
            x[f"{k}__offsets"] = rt.row_splits
        return x, tf.gather(labels, idx)

    def take_in_order(batch_index):
        start = batch_index * batch_size
        stop = tf.minimum(start + batch_size, n)
        x = {k: v[start:stop] for k, v in dense.items()}
        for k, v in ragged.items():
            rt = v[start:stop]
            x[f"{k}__values"] = rt.values
            x[f"{k}__offsets"] = rt.row_splits
        return x, labels[start:stop]

    batches = tf.data.Dataset.range(n_batches)
    if shuffle:
        order = tf.random.stateless_shuffle(tf.range(n, dtype=tf.int64), seed=[seed, 0]) if hasattr(
            tf.random, "stateless_shuffle") else tf.random.shuffle(tf.range(n, dtype=tf.int64), seed=seed)
        ds = batches.map(lambda i: take(i, order), num_parallel_calls=tf.data.AUTOTUNE)
    else:
        ds = batches.map(take_in_order, num_parallel_calls=tf.data.AUTOTUNE)
    return ds.prefetch(tf.data.AUTOTUNE), n


class _Clock:
    """Keras callback: time from the end of the first batch to the end of the epoch."""

    def __new__(cls):
        import tensorflow as tf

        class Clock(tf.keras.callbacks.Callback):
            def on_epoch_begin(self, epoch, logs=None):
                self.t_begin, self.t_first, self.batches = time.perf_counter(), None, 0

            def on_train_batch_end(self, batch, logs=None):
                self.batches += 1
                if self.t_first is None:
                    self.t_first = time.perf_counter()

            def on_epoch_end(self, epoch, logs=None):
                self.t_end = time.perf_counter()

        return Clock()


def _fit_one_epoch(train_dir: Path, feed: str, batch_size: int, shuffle: bool, seed: int = 42) -> dict:
    import merlin.models.tf as mm
    import tensorflow as tf
    from merlin.io import Dataset

    from pipeline_lib.config import ModelConfig
    from pipeline_lib.models.ranking import build_model

    cfg = ModelConfig(batch_size=batch_size, epochs=1)
    tf.keras.utils.set_random_seed(seed)
    mds = Dataset(str(train_dir), engine="parquet")
    schema = mds.schema
    label = schema.select_by_tag(__import__("merlin.schema", fromlist=["Tags"]).Tags.TARGET).column_names[0]
    model = build_model(schema, cfg, label)
    model.compile(optimizer=tf.keras.optimizers.Adam(learning_rate=cfg.learning_rate), run_eagerly=False,
                  metrics=[tf.keras.metrics.AUC(name="auc")])
    t0 = time.perf_counter()
    if feed == "merlin":
        data, n = mm.Loader(mds, batch_size=batch_size, shuffle=shuffle), int(mds.num_rows)
    else:
        data, n = tf_dataset(train_dir, schema, label, batch_size, shuffle, seed)
    build_s = time.perf_counter() - t0
    clock = _Clock()
    hist = model.fit(data, epochs=1, verbose=0, callbacks=[clock])
    total = clock.t_end - clock.t_begin
    steady = clock.t_end - clock.t_first
    n_steady = n - batch_size
    return {
        "feed": feed, "shuffle": shuffle, "rows": n, "batch_size": batch_size, "batches": clock.batches,
        "input_build_seconds": round(build_s, 3), "epoch_seconds": round(total, 3),
        "samples_per_s": round(n_steady / steady) if steady > 0 else None,
        "samples_per_s_incl_first_batch": round(n / total),
        "loss": float(hist.history["loss"][-1]), "auc": float(hist.history.get("auc", [float("nan")])[-1]),
    }


RUNS = tuple((feed, shuffle) for shuffle in (False, True) for feed in ("merlin", "tfdata"))


def _fit_subprocess(train_dir: Path, runs: list[tuple[str, bool]], batch_size: int) -> list[dict]:
    """``runs`` ((feed, shuffle) pairs) one after the other in one fresh interpreter."""
    import json
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "r.json"
        spec = ",".join(f"{feed}:{int(shuffle)}" for feed, shuffle in runs)
        cmd = [sys.executable, "-m", "benchmarks.train_bench", "--train-dir", str(train_dir), "--runs", spec,
               "--batch-size", str(batch_size), "--result", str(result)]
        env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONWARNINGS="ignore")
        p = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=1800,
                           cwd=Path(__file__).resolve().parent.parent)
        if p.returncode != 0:
            raise RuntimeError(f"training runs {spec} failed ({p.returncode}):\n{(p.stdout + p.stderr)[-3000:]}")
        return json.loads(result.read_text())


def bench(train_dir: Path, batch_size: int = 1024, one_interpreter: bool = False, shuffled: bool = True) -> dict:
    """Merlin loader vs tf.data, both unshuffled (like for like: same rows, same order, same model ->
    same loss) and shuffled (the pipeline's setting; Merlin shuffles within partitions, tf.data here
    draws one permutation of all rows). Each run in a fresh interpreter, so that no run inherits the
    previous run's graphs, threads or garbage; ``one_interpreter``: the runs in one (tests);
    ``shuffled=False``: the two unshuffled runs only (tests)."""
    todo = [r for r in RUNS if shuffled or not r[1]]
    if one_interpreter:
        runs = _fit_subprocess(train_dir, todo, batch_size)
    else:
        runs = [r for run in todo for r in _fit_subprocess(train_dir, [run], batch_size)]
    return summary(train_dir, batch_size, runs)


def summary(train_dir: Path, batch_size: int, runs: list[dict]) -> dict:
    """The runs and the Merlin / tf.data samples-per-second ratios, unshuffled and shuffled (None
    where a run is missing or has no figure)."""
    out = {"train_dir": str(train_dir), "batch_size": batch_size, "runs": runs}
    by = {(r["feed"], r["shuffle"]): r for r in runs}
    for shuffle in (False, True):
        m, t = (by.get((feed, shuffle), {}).get("samples_per_s") for feed in ("merlin", "tfdata"))
        out["ratio_merlin_over_tfdata" + ("_shuffled" if shuffle else "")] = round(m / t, 2) if m and t else None
    return out


def main(argv=None) -> None:
    import argparse
    import json

    p = argparse.ArgumentParser()
    p.add_argument("--train-dir", required=True)
    p.add_argument("--runs", required=True, help="comma-separated feed:shuffle pairs, e.g. merlin:0,tfdata:1")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--result", required=True)
    a = p.parse_args(argv)
    runs = [(feed, bool(int(shuffle))) for feed, shuffle in (x.split(":") for x in a.runs.split(","))]
    out = [_fit_one_epoch(Path(a.train_dir), feed, a.batch_size, shuffle) for feed, shuffle in runs]
    Path(a.result).write_text(json.dumps(out))


if __name__ == "__main__":
    main()
