"""Serving benchmark: latency and throughput through the real Triton server, against the same
ensemble run in this process.

A small model is trained on the synthetic default (reduced size) with the pipeline's own
functions, exported with ``pipeline_lib.export.ranking.export_ensemble``, published and promoted into a
temporary repository with ``pipeline_lib.serving.repository``, and served by
``pipeline_lib.serving.server.TritonServer`` on free loopback ports. Clients are threads, each with its
own ``pipeline_lib.serving.client.RecsysClient`` (tritonclient underneath); request tensors are built once
per client, so the timed part is one ``infer`` call (tritonclient input encoding + network +
Triton + python backend + workflow + TensorFlow + response decoding).

The in-process reference loads the *published* version with ``merlin.systems.dag.Ensemble.load``
+ ``load_artifacts`` (as export.py and the served model.py do), and runs, per request, what the
served ``model.py`` runs: ``check_request`` -> ``TensorTable`` -> ``ensemble.transform``.
"""
from __future__ import annotations

import json
import os
import shutil
import threading
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Callable, Protocol

import numpy as np
import pandas as pd

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

MODEL = "recsys"
# the dynamically batched variant's name when it shares the main variant's server (``one_triton``)
MODEL_BATCHED = "recsys_batched"
WARMUP = 3  # requests per client before the timed ones (never more than the timed ones)
SHM = "+shm"  # a protocol with this suffix: RecsysClient(shared_memory=True), the same-host fast client
# issue 14 item 4, each against the in-process path of the same run
TARGET_P50_RATIO, TARGET_ROWS_RATIO = 1.5, 0.8
# the dynamically batched variant served in a second pass (8 clients)
BATCHING = {"enabled": True, "max_batch_size": 16, "max_queue_delay_microseconds": 0}


@dataclass
class ModelSource:
    """A trained ranking model and what it was trained from: the fitted NVTabular workflow, the SavedModel
    and the raw rows (a validation split) that requests are drawn from."""
    workflow_dir: Path
    model_dir: Path
    raw_rows: Path

    @classmethod
    def of_flow_run(cls, run_dir: Path) -> "ModelSource":
        """The re-ranker (a DLRM) of a two-stage flow run, with the run's fitted workflow and validation split."""
        etl_dir = Path(json.loads((run_dir / "summary.json").read_text())["etl_from"])
        return cls(etl_dir / "workflow", run_dir / "model" / "ranker" / "model", etl_dir.parent / "split" / "valid.parquet")

    def to_json(self) -> dict:
        return {k: str(v) for k, v in asdict(self).items()}

    @classmethod
    def from_json(cls, d: dict) -> "ModelSource":
        return cls(**{k: Path(v) for k, v in d.items()})


@dataclass
class ServedModel:
    repo: Path
    version: int
    ensemble_dir: Path
    rows: pd.DataFrame  # raw request rows (serving columns)
    prepare_seconds: dict
    source: ModelSource | None = None  # what the version was exported from


def train_model(work: Path, data_dir: Path, rows: int, t: dict) -> ModelSource:
    """A small DLRM (one epoch) trained with the pipeline's functions on ``rows`` synthetic rows; ``t``
    gets the seconds of the ETL and the training."""
    from pipeline_lib.models import ranking as train
    from pipeline_lib.config import ColumnsConfig, ModelConfig

    from benchmarks import etl_bench

    t0 = time.perf_counter()
    d = etl_bench.prepare_data(rows, data_dir)
    columns = ColumnsConfig()
    etl_out = etl_bench.nvt_fit_transform(columns, d["train"], d["valid"], work / "etl")
    t["etl"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    model = train.train(Path(etl_out["train_dir"]), Path(etl_out["valid_dir"]), ModelConfig(epochs=1),
                        columns.label, 42, work / "model")
    t["train"] = time.perf_counter() - t0
    return ModelSource(work / "etl" / "workflow", model.model_dir, Path(d["valid"]))


def prepare_model(work: Path, data_dir: Path, rows: int = 20_000, n_request_rows: int = 1024,
                  batched: bool = True, source: ModelSource | None = None) -> ServedModel:
    """Train a small DLRM with the pipeline's functions (:func:`train_model`; or serve ``source``, a model
    trained elsewhere), export, publish and promote it; with ``batched`` also export it with Triton's
    dynamic batcher on, into ``model_repository_batched``."""
    from pipeline_lib.export import ranking as export
    from pipeline_lib.serving import repository
    from pipeline_lib.config import ColumnsConfig

    t: dict = {}
    source = source or train_model(work, data_dir, rows, t)
    t0 = time.perf_counter()
    columns = ColumnsConfig()
    valid = pd.read_parquet(source.raw_rows)[columns.serving_columns]
    request_rows = valid.sample(n=n_request_rows, random_state=0, replace=len(valid) < n_request_rows)
    request_rows = request_rows.reset_index(drop=True)
    exp = export.export_ensemble(source.workflow_dir, source.model_dir, request_rows.head(64), columns.label,
                                 work / "staging", MODEL, 1)
    t["export"] = time.perf_counter() - t0
    repo = work / "model_repository"
    version, path = repository.publish(exp.version_dir, exp.config_path, repo, MODEL)
    repository.promote(repo, MODEL, version)
    if batched:
        _export_batched(work, source, request_rows, columns.label)
    return ServedModel(repo, version, path / "ensemble", request_rows, {k: round(v, 2) for k, v in t.items()}, source)


def _export_batched(work: Path, source: ModelSource, request_rows: pd.DataFrame, label: str) -> None:
    """The same model with Triton's dynamic batcher on (serving.dynamic_batching), in its own repository."""
    from pipeline_lib.config import DynamicBatchingConfig
    from pipeline_lib.export import ranking as export
    from pipeline_lib.serving import repository

    exp_b = export.export_ensemble(source.workflow_dir, source.model_dir, request_rows.head(64), label,
                                   work / "staging_batched", MODEL, 1,
                                   export.ExportOptions(dynamic_batching=DynamicBatchingConfig(**BATCHING)))
    repo_b = work / "model_repository_batched"
    version_b, _ = repository.publish(exp_b.version_dir, exp_b.config_path, repo_b, MODEL)
    repository.promote(repo_b, MODEL, version_b)


def _pcts(lat_s: list[float]) -> dict:
    a = np.asarray(lat_s) * 1000.0
    return {"p50_ms": round(float(np.percentile(a, 50)), 3), "p95_ms": round(float(np.percentile(a, 95)), 3),
            "p99_ms": round(float(np.percentile(a, 99)), 3), "mean_ms": round(float(a.mean()), 3)}


def _budget(batch: int, quick: bool) -> tuple[int, float]:
    """(requests per client, seconds per configuration): bounded whatever the server's speed."""
    n = {1: 300, 64: 200, 1024: 40}.get(batch, 50)
    return (max(10, n // 5), 4.0) if quick else (n, 8.0)


@dataclass
class Plan:
    """What the serving section measures: batch sizes, client counts, protocols, the protocols also
    measured with the shared-memory client (one client, every batch size), and the budget of each point
    (requests per client, seconds), ``_budget`` unless capped; ``model_from_run``: serve the re-ranker of
    this two-stage flow run (:meth:`ModelSource.of_flow_run`) instead of training a model."""
    batches: tuple = (1, 64, 1024)
    concurrency: tuple = (1, 8)
    protocols: tuple = ("grpc", "http")
    shared_memory: tuple = ("grpc",)
    quick: bool = False
    requests_cap: int | None = None
    seconds_cap: float | None = None
    model_from_run: str | None = None

    def budget(self, batch: int) -> tuple[int, float]:
        n, secs = _budget(batch, self.quick)
        return (min(n, self.requests_cap) if self.requests_cap else n), (self.seconds_cap or secs)

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in json.loads(text).items()})

    def breakdown_calls(self) -> int:
        """Calls per part in ``breakdown`` (its median skips three warm-up calls)."""
        n = 10 if self.quick else 30
        return min(n, max(3, self.requests_cap)) if self.requests_cap else n


def load_clients(url: str, protocol: str, rows: pd.DataFrame, batch: int, clients: int,
                 n_requests: int, max_seconds: float, model: str = MODEL) -> dict:
    """``clients`` threads, each sending up to ``n_requests`` requests of ``batch`` rows (stopping
    at ``max_seconds``) to ``model``; per-request latency percentiles and served rows/s. ``protocol``
    ``grpc`` or ``http``, with the suffix ``+shm``: the shared-memory client (``RecsysClient(...,
    shared_memory=True)``), else the default client."""
    from pipeline_lib.serving.client import RecsysClient

    proto, shared_memory = protocol.removesuffix(SHM), protocol.endswith(SHM)
    barrier = threading.Barrier(clients + 1)
    lat: list[list[float]] = [[] for _ in range(clients)]
    errors: list[str] = []

    def worker(k: int) -> None:
        try:
            with RecsysClient(url, proto, model, shared_memory=shared_memory) as c:
                start = (k * batch) % max(1, len(rows) - batch + 1)
                arrays = c.to_arrays(rows.iloc[start:start + batch])
                for _ in range(min(WARMUP, n_requests)):
                    c.infer_arrays(arrays)
                barrier.wait()
                deadline = time.perf_counter() + max_seconds
                for _ in range(n_requests):
                    t0 = time.perf_counter()
                    scores, _ = c.infer_arrays(arrays)
                    lat[k].append(time.perf_counter() - t0)
                    assert len(scores) == batch
                    if t0 > deadline:
                        break
        except threading.BrokenBarrierError:
            pass
        except Exception as exc:  # noqa: BLE001 - reported in the results
            errors.append(f"{type(exc).__name__}: {exc}")
            barrier.abort()

    threads = [threading.Thread(target=worker, args=(k,), daemon=True) for k in range(clients)]
    for th in threads:
        th.start()
    try:
        barrier.wait(timeout=300)
    except threading.BrokenBarrierError:
        pass
    t0 = time.perf_counter()
    for th in threads:
        th.join(timeout=max_seconds + 120)
    wall = time.perf_counter() - t0
    all_lat = [x for per in lat for x in per]
    out = {"protocol": protocol, "batch": batch, "clients": clients, "requests": len(all_lat),
           "errors": errors[:3], "wall_s": round(wall, 3)}
    if all_lat:
        out.update(_pcts(all_lat))
        out["rows_per_s"] = round(len(all_lat) * batch / wall, 1)
        out["requests_per_s"] = round(len(all_lat) / wall, 1)
    return out


class InProcess:
    """The published ensemble loaded in this process, run like the served model.py."""

    def __init__(self, ensemble_dir: Path):
        from merlin.dag import postorder_iter_nodes
        from merlin.dag.runtime import Runtime
        from merlin.systems.dag import Ensemble

        self.ensemble = Ensemble.load(str(ensemble_dir))
        for node in postorder_iter_nodes(self.ensemble.graph.output_node, flatten_subgraphs=True):
            node.op.load_artifacts(str(ensemble_dir))
        from pipeline_lib.export.ranking import DirectPredictor

        self.ragged = {c.name for c in self.ensemble.input_schema.column_schemas.values() if c.is_ragged}
        self.runtime = Runtime()
        self.output = self.ensemble.output_schema.column_names[0]
        self.direct = DirectPredictor.from_ensemble(self.ensemble)  # model.py's per-request path

    def arrays(self, rows: pd.DataFrame) -> dict:
        """The request tensors as Triton hands them to model.py (bytes strings, values/offsets)."""
        from pipeline_lib.serving.client import _ragged

        out = {}
        for c in self.ensemble.input_schema:
            s = rows[c.name]
            if c.is_ragged:
                v, o = _ragged(s, c.name)
                out[f"{c.name}__values"], out[f"{c.name}__offsets"] = v.astype(np.int64), o.astype(np.int32)
            elif s.dtype == object:
                out[c.name] = np.array([str(x).encode() for x in s], dtype=object)
            else:
                out[c.name] = s.to_numpy()
        return out

    def __call__(self, arrays: dict) -> np.ndarray:
        from merlin.table import TensorTable

        from pipeline_lib.validate.requests import check_request

        checked = check_request(arrays, self.ragged, 65536)
        if self.direct is not None:
            return np.asarray(self.direct(checked)[self.output]).reshape(-1)
        out = self.ensemble.transform(TensorTable(checked), runtime=self.runtime)
        return np.asarray(out[self.output].values).reshape(-1)


def bench_inprocess(inproc: InProcess, rows: pd.DataFrame, batch: int, n: int, max_seconds: float) -> dict:
    arrays = inproc.arrays(rows.iloc[:batch])
    for _ in range(min(WARMUP, n)):
        inproc(arrays)
    lat = []
    t_end = time.perf_counter() + max_seconds
    t0 = time.perf_counter()
    for _ in range(n):
        t = time.perf_counter()
        scores = inproc(arrays)
        lat.append(time.perf_counter() - t)
        assert len(scores) == batch
        if t > t_end:
            break
    wall = time.perf_counter() - t0
    return {"protocol": "in-process", "batch": batch, "clients": 1, "requests": len(lat), **_pcts(lat),
            "rows_per_s": round(len(lat) * batch / wall, 1), "wall_s": round(wall, 3)}


def breakdown(inproc: InProcess, rows: pd.DataFrame, batch: int, n: int = 30) -> dict:
    """Median time of the parts of model.py's request path, called directly: request checks, the
    workflow op (compiled numpy transform when enabled), the model op (the compiled ONNX model when enabled
    for this batch size, else the TF SavedModel signature call); and, for comparison in the same run, the
    same workflow op executed by NVTabular (the path before the compiled transform: TensorTable -> pandas,
    bytes decode, Workflow._transform_df) and the SavedModel call on the same model inputs."""
    from pipeline_lib.etl.fast_transform import columns_from_tensors, tensors_from_columns
    from pipeline_lib.validate.requests import check_request

    arrays = inproc.arrays(rows.iloc[:batch])
    direct = inproc.direct
    times = {"request": [], "checks": [], "workflow_op": [], "tensorflow_op": [], "nvtabular_workflow_op": [],
             "savedmodel_op": []}
    for _ in range(n + 3):
        t0 = time.perf_counter()
        inproc(arrays)
        t1 = time.perf_counter()
        checked = check_request(arrays, inproc.ragged, 65536)
        t2 = time.perf_counter()
        cols = direct.wf_op.transform_columns(columns_from_tensors(checked, inproc.ragged))
        model_inputs = tensors_from_columns(cols)
        t3 = time.perf_counter()
        direct.tf_op.predict_tensors(model_inputs)  # the model op as served: compiled (ONNX) when enabled
        t4 = time.perf_counter()
        fast, direct.wf_op._fast = direct.wf_op.fast, None
        try:
            direct.wf_op.transform_columns(columns_from_tensors(checked, inproc.ragged))
        finally:
            direct.wf_op._fast = fast
        t5 = time.perf_counter()
        direct.tf_op.savedmodel_tensors(model_inputs)  # the SavedModel call, for the compiled model's ratio
        t6 = time.perf_counter()
        for k, v in zip(times, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)):
            times[k].append(v)
    med = {k: round(float(np.median(v[3:])) * 1000, 3) for k, v in times.items()}
    med["other"] = round(med["request"] - med["checks"] - med["workflow_op"] - med["tensorflow_op"], 3)
    compiled = direct.tf_op.compiled is not None and batch <= direct.tf_op.compiled_status["max_rows"]
    return {"batch": batch, "fast_transform": direct.wf_op.fast is not None, "compiled_model": compiled,
            "median_ms": med}


def _stats(url: str, model: str = MODEL) -> dict:
    """Triton's cumulative per-model statistics (ns), through the HTTP API."""
    import tritonclient.http as httpclient

    with httpclient.InferenceServerClient(url) as c:
        s = c.get_inference_statistics(model)["model_stats"]
    keys = ("success", "queue", "compute_input", "compute_infer", "compute_output")
    tot = {k: (0, 0) for k in keys}
    for m in s:
        inf = m.get("inference_stats", {})
        for k in keys:
            c, ns = tot[k]
            tot[k] = (c + int(inf.get(k, {}).get("count", 0)), ns + int(inf.get(k, {}).get("ns", 0)))
    tot["executions"] = sum(int(m.get("execution_count", 0)) for m in s)
    return tot


def _executions_per_request(before: dict, after: dict) -> float | None:
    """Model executions per request between two ``_stats`` (< 1: the dynamic batcher combined requests)."""
    n = after["success"][0] - before["success"][0]
    return round((after["executions"] - before["executions"]) / n, 3) if n > 0 else None


def _stats_delta(before: dict, after: dict) -> dict:
    n = after["success"][0] - before["success"][0]
    if n <= 0:
        return {}
    return {f"server_{k}_ms": round((after[k][1] - before[k][1]) / n / 1e6, 3)
            for k in ("success", "queue", "compute_input", "compute_infer", "compute_output")}


def edit_config(src: Path, dst: Path, edit) -> None:
    """``src`` config.pbtxt -> ``edit(ModelConfig)`` -> ``dst``."""
    import tritonclient.grpc.model_config_pb2 as mc
    from google.protobuf import text_format

    cfg = text_format.Parse(src.read_text(), mc.ModelConfig())
    edit(cfg)
    dst.write_text(text_format.MessageToString(cfg))


def one_repository(sm: ServedModel, work: Path, batched: bool) -> Path:
    """The published model in a repository of its own, for one server (``one_triton``); with ``batched``
    also the same version as ``MODEL_BATCHED`` with Triton's dynamic batcher on (``BATCHING``, set by the
    export's own ``install_serving_model``, as ``prepare_model`` exports the variant)."""
    import tritonclient.grpc.model_config_pb2 as mc
    from google.protobuf import text_format

    from pipeline_lib.config import DynamicBatchingConfig
    from pipeline_lib.export.ranking import install_serving_model

    repo = work / "model_repository_both"
    shutil.rmtree(repo, ignore_errors=True)
    shutil.copytree(sm.repo / MODEL, repo / MODEL)
    if not batched:
        return repo
    shutil.copytree(sm.repo / MODEL, repo / MODEL_BATCHED)
    cfg_path = repo / MODEL_BATCHED / "config.pbtxt"
    max_rows = text_format.Parse(cfg_path.read_text(), mc.ModelConfig()).parameters["max_request_rows"].string_value
    install_serving_model(repo / MODEL_BATCHED, sm.version, int(max_rows), DynamicBatchingConfig(**BATCHING))

    def rename(cfg) -> None:
        cfg.name = MODEL_BATCHED

    edit_config(cfg_path, cfg_path, rename)
    return repo


def served_runs(server, model: str, plan: Plan, rows: pd.DataFrame, protocols: tuple | None = None) -> list[dict]:
    """Every (protocol, batch, clients) point of ``plan`` against ``model`` on ``server``, with
    Triton's own per-request statistics and model executions per request."""
    out = []
    for proto in protocols or plan.protocols:
        url = server.grpc_url if proto.startswith("grpc") else server.http_url
        for b in plan.batches:
            n, secs = plan.budget(b)
            for k in plan.concurrency:
                before = _stats(server.http_url, model)
                r = load_clients(url, proto, rows, b, k, n, secs, model=model)
                after = _stats(server.http_url, model)
                r.update(_stats_delta(before, after))
                r["executions_per_request"] = _executions_per_request(before, after)
                out.append(r)
    return out


def start_server(repo: Path, log: Path, models: list[str], timeout_s: float = 300) -> tuple:
    """A Triton on free ports serving ``models`` of ``repo``, started; -> (server, seconds to ready)."""
    from pipeline_lib.serving.server import TritonServer

    server = TritonServer.on_free_ports(repo, log_file=log, model_control="explicit", load_models=models)
    t0 = time.perf_counter()
    server.start(timeout_s=timeout_s, models=models)
    return server, round(time.perf_counter() - t0, 2)


def _parity(inproc: "InProcess", server, rows: pd.DataFrame) -> dict:
    """Served scores against the in-process scores for the same request, both protocols."""
    from pipeline_lib.serving.client import RecsysClient

    want = inproc(inproc.arrays(rows))
    out = {}
    for proto, url in (("grpc", server.grpc_url), ("http", server.http_url), ("grpc" + SHM, server.grpc_url)):
        with RecsysClient(url, proto.removesuffix(SHM), MODEL, shared_memory=proto.endswith(SHM)) as c:
            out[f"max_abs_diff_served_vs_inprocess_{proto}"] = float(np.max(np.abs(c.predict(rows) - want)))
    return out


class Guest(Protocol):
    """Models served beside the serving section's on its server (``one_triton``), measured while it runs."""

    def install(self, repo: Path) -> list[str]: ...  # adds its models to the repository; -> their names

    def measure(self, server, start_seconds: float) -> None: ...

    def finish(self) -> dict: ...  # after the server stopped; -> its results


def serve(sm: ServedModel, work: Path, plan: Plan, inproc: "InProcess", one_triton: bool = False,
          guest: Guest | None = None) -> dict:
    """Parity, then every point of ``plan`` on Triton; then the dynamically batched variant (8 clients,
    gRPC; one instance, requests queued together) on a second server, or with ``one_triton`` on the
    same server under the name ``MODEL_BATCHED``, with ``guest``'s models too (key ``guest``)."""
    if guest and not one_triton:
        raise ValueError("a guest is served on the section's own server: one_triton=True")
    out: dict = {"one_triton": one_triton}
    batched = 8 in plan.concurrency and (one_triton or (sm.repo.parent / "model_repository_batched").is_dir())
    repo = one_repository(sm, work, batched) if one_triton else sm.repo
    models = [MODEL] + ([MODEL_BATCHED] if one_triton and batched else [])
    models += guest.install(repo) if guest else []
    server, out["server_start_seconds"] = start_server(repo, work / "triton.log", models, 600 if guest else 300)
    with server:
        out.update(_parity(inproc, server, sm.rows.iloc[:64]))
        out["served"] = served_runs(server, MODEL, plan, sm.rows)
        # the same-host fast client, one client per point
        out["served_shared_memory"] = served_runs(server, MODEL, replace(plan, concurrency=(1,)), sm.rows,
                                                  tuple(p + SHM for p in plan.shared_memory))
        if MODEL_BATCHED in models:
            out["dynamic_batching"] = {"config": BATCHING, "served": served_runs(server, MODEL_BATCHED, plan, sm.rows,
                                                                                  ("grpc",))}
        if guest:
            guest.measure(server, out["server_start_seconds"])
    if batched and MODEL_BATCHED not in models:
        server, _ = start_server(sm.repo.parent / "model_repository_batched", work / "triton_batched.log", [MODEL])
        with server:
            out["dynamic_batching"] = {"config": BATCHING, "served": served_runs(server, MODEL, plan, sm.rows, ("grpc",))}
    return out | ({"guest": guest.finish() | {"on_serving_server": True}} if guest else {})


def bench(work: Path, data_dir: Path, plan: Plan | None = None, model_rows: int = 20_000,
          one_triton: bool = False, guest: Callable[[ServedModel, "InProcess"], Guest] | None = None,
          prepare: Callable[..., ServedModel] | None = None) -> dict:
    """The serving section: train and publish the model (:func:`prepare_model`, in a child), the
    in-process reference and breakdown, the served runs (:func:`serve`), the reference again.
    ``guest``: builds the :class:`Guest` served beside the model (needs ``one_triton``); ``prepare``:
    what prepares the model (default :func:`prepare_model_subprocess`, same signature)."""
    plan = plan or Plan()
    t0 = time.perf_counter()
    source = ModelSource.of_flow_run(Path(plan.model_from_run)) if plan.model_from_run else None
    sm = (prepare or prepare_model_subprocess)(work, data_dir, model_rows, max(plan.batches), not one_triton, source)
    prep = time.perf_counter() - t0
    out: dict = {"model_rows": None if source else model_rows, "model_from_run": plan.model_from_run,
                 "requests_cap": plan.requests_cap, "seconds_cap": plan.seconds_cap,
                 "prepare_seconds": sm.prepare_seconds,
                 "published_version": sm.version, "in_process": [], "breakdown": []}
    inproc = InProcess(sm.ensemble_dir)
    t0 = time.perf_counter()
    for b in plan.batches:
        out["in_process"].append(bench_inprocess(inproc, sm.rows, b, *plan.budget(b)) | {"pass": "before server"})
    for b in plan.batches:
        out["breakdown"].append(breakdown(inproc, sm.rows, b, n=plan.breakdown_calls()))
    out.update(serve(sm, work, plan, inproc, one_triton, guest(sm, inproc) if guest else None))
    # the reference again, now that the served runs are done (the machine is shared and noisy:
    # the targets use the faster of the two passes, i.e. the stricter reference)
    for b in plan.batches:
        out["in_process"].append(bench_inprocess(inproc, sm.rows, b, *plan.budget(b)) | {"pass": "after served runs"})
    out["targets"] = targets(out)
    out["total_seconds"] = round(time.perf_counter() - t0 + prep, 1)
    return out


def _find(rows, **kw):
    return next((r for r in rows if all(r.get(k) == v for k, v in kw.items())), None)


def targets(out: dict) -> dict:
    """The performance targets, as ratios (measured / target) and booleans."""
    t: dict = {}
    g1 = _find(out["served"], protocol="grpc", batch=1, clients=1)
    if g1 and "p50_ms" in g1:
        t["grpc_batch1_p50_ms"] = g1["p50_ms"]
        t["grpc_batch1_p50_over_3ms"] = round(g1["p50_ms"] / 3.0, 2)
        t["grpc_batch1_p50_le_3ms"] = g1["p50_ms"] <= 3.0
    t.update(inprocess_ratios(out))
    b1 = _find(out.get("breakdown", []), batch=1)
    if b1:  # the model part of a batch-1 request: SavedModel call / the model op as served (compiled when enabled)
        ratio = b1["median_ms"]["savedmodel_op"] / max(b1["median_ms"]["tensorflow_op"], 1e-9)
        t["model_batch1_savedmodel_over_served_op"] = round(ratio, 2)
        t["model_batch1_ge_3x_faster_than_savedmodel"] = ratio >= 3.0
    for r in out["served"]:
        if r["clients"] == 8 and "p99_ms" in r:
            key = f"{r['protocol']}_batch{r['batch']}_8clients"
            t[f"{key}_p99_over_p50"] = round(r["p99_ms"] / r["p50_ms"], 2)
            t[f"{key}_p99_le_2x_p50"] = r["p99_ms"] <= 2 * r["p50_ms"]
    return t


def inprocess_ratios(out: dict) -> dict:
    """Served over in-process, one client, for each protocol and client (``grpc+shm``: the shared-memory
    client): batch-1 p50 (target <= 1.5) and batch-1024 rows/s (target >= 0.8), against the faster of
    the two in-process passes."""
    t: dict = {}
    ips = {b: [r for r in out["in_process"] if r["batch"] == b] for b in (1, 1024)}
    ip1 = min(ips[1], key=lambda r: r["p50_ms"]) if ips[1] else None
    ip1024 = max(ips[1024], key=lambda r: r["rows_per_s"]) if ips[1024] else None
    served = out["served"] + out.get("served_shared_memory", [])
    for proto in sorted({r["protocol"] for r in served}):
        s1 = _find(served, protocol=proto, batch=1, clients=1)
        if ip1 and s1 and "p50_ms" in s1:
            ratio = s1["p50_ms"] / ip1["p50_ms"]
            t[f"{proto}_batch1_p50_over_inprocess"] = round(ratio, 2)
            t[f"{proto}_batch1_p50_le_{TARGET_P50_RATIO}_inprocess"] = ratio <= TARGET_P50_RATIO
        s = _find(served, protocol=proto, batch=1024, clients=1)
        if ip1024 and s and "rows_per_s" in s:
            ratio = s["rows_per_s"] / ip1024["rows_per_s"]
            t[f"{proto}_batch1024_throughput_over_inprocess"] = round(ratio, 3)
            t[f"{proto}_batch1024_throughput_ge_{TARGET_ROWS_RATIO}_inprocess"] = ratio >= TARGET_ROWS_RATIO
    return t


def _child(args: list[str], result: Path, log: Path, timeout_s: float = 1800) -> dict:
    import subprocess
    import sys

    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONWARNINGS="ignore")
    with open(log, "wb") as fh:
        rc = subprocess.run([sys.executable, "-m", "benchmarks.serving_bench", *args, "--result", str(result)],
                            stdout=fh, stderr=subprocess.STDOUT, env=env, timeout=timeout_s,
                            cwd=Path(__file__).resolve().parent.parent).returncode
    if rc != 0:
        raise RuntimeError(f"serving benchmark child failed ({rc}):\n{log.read_text(errors='replace')[-3000:]}")
    return json.loads(result.read_text())


def load_prepared(folder: Path) -> ServedModel | None:
    """The model :func:`prepare_model_subprocess` left in ``folder`` (its prepare.json); None if none."""
    f = folder / "prepare.json"
    if not f.is_file():
        return None
    r = json.loads(f.read_text())
    source = ModelSource.from_json(r["source"])
    return ServedModel(Path(r["repo"]), r["version"], Path(r["ensemble_dir"]), pd.read_parquet(r["rows"]),
                       r["prepare_seconds"], source)


def prepare_model_subprocess(work: Path, data_dir: Path, rows: int, n_request_rows: int,
                             batched: bool = True, source: ModelSource | None = None) -> ServedModel:
    """prepare_model in a child process: the process that measures the in-process reference then holds
    only the loaded ensemble, like Triton's python-backend stub (training leaves millions of Python
    objects behind, which makes every later garbage collection -- and so pandas-heavy code -- slower)."""
    work.mkdir(parents=True, exist_ok=True)
    _child(prepare_args(work, data_dir, rows, n_request_rows, batched, source), work / "prepare.json",
           work / "prepare.log")
    return load_prepared(work)


def prepare_args(work: Path, data_dir: Path, rows: int, n_request_rows: int, batched: bool,
                 source: ModelSource | None) -> list[str]:
    """The command line of :func:`main`'s ``prepare`` mode (without ``--result``)."""
    return ["prepare", "--work", str(work), "--data-dir", str(data_dir), "--rows", str(rows),
            "--n-request-rows", str(n_request_rows), *([] if batched else ["--no-batched"]),
            *(["--source-json", json.dumps(source.to_json())] if source else [])]


def bench_subprocess(work: Path, data_dir: Path, plan: Plan | None = None, model_rows: int = 20_000,
                     one_triton: bool = False) -> dict:
    """The whole serving benchmark in a fresh interpreter (not the one that ran the training benchmark)."""
    plan = plan or Plan()
    work.mkdir(parents=True, exist_ok=True)
    args = ["bench", "--work", str(work), "--data-dir", str(data_dir), "--model-rows", str(model_rows),
            "--plan-json", json.dumps(asdict(plan))]
    args += ["--one-triton"] if one_triton else []
    return _child(args, work / "serving.json", work / "serving.log")


def main(argv=None, after_prepare: Callable[[ServedModel, Path], None] | None = None) -> None:
    """The child processes' entry point; ``after_prepare(model, work)`` runs after the ``prepare`` mode
    in the same process (the stock serving peer exported from the same model: ``serving_peers``)."""
    import argparse

    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["prepare", "bench"])
    p.add_argument("--work", required=True)
    p.add_argument("--data-dir", required=True)
    p.add_argument("--result", required=True)
    p.add_argument("--rows", type=int, default=20_000)
    p.add_argument("--n-request-rows", type=int, default=1024)
    p.add_argument("--model-rows", type=int, default=20_000)
    p.add_argument("--no-batched", action="store_true", help="prepare: no dynamically batched export")
    p.add_argument("--source-json", help="prepare: serve this ModelSource (JSON) instead of training a model")
    p.add_argument("--plan-json", default="{}", help="Plan fields (default: the full plan)")
    p.add_argument("--one-triton", action="store_true", help="the batched variant on the same server")
    a = p.parse_args(argv)
    work, data_dir = Path(a.work), Path(a.data_dir)
    if a.mode == "prepare":
        source = ModelSource.from_json(json.loads(a.source_json)) if a.source_json else None
        sm = prepare_model(work, data_dir, a.rows, a.n_request_rows, not a.no_batched, source)
        rows_path = work / "request_rows.parquet"
        sm.rows.to_parquet(rows_path, index=False)
        res = {"repo": str(sm.repo), "version": sm.version, "ensemble_dir": str(sm.ensemble_dir),
               "rows": str(rows_path), "prepare_seconds": sm.prepare_seconds, "source": sm.source.to_json()}
        if after_prepare:
            after_prepare(sm, work)
    else:
        res = bench(work, data_dir, Plan.from_json(a.plan_json), a.model_rows, a.one_triton)
    Path(a.result).write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
