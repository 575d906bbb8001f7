"""Serving peers on one Triton server: the project's served ensemble, stock merlin-systems serving of
the same workflow + model, and a trivial python-backend model as the floor of that path.

- ``recsys``: the version the serving benchmark publishes (``pipeline_lib.export.ranking.export_ensemble``:
  one python-backend model, compiled transform + SavedModel in-process, our ``model.py``).
- ``stock``: merlin-systems' own ``Ensemble.export`` of ``TransformWorkflow(workflow) >> PredictTensorflow(model)``
  on the same fitted workflow and trained model: its ``executor_model.py`` calls, by BLS, the
  ``workflow_model.py`` model (NVTabular per request) and the TensorFlow model. The CPU tritonserver
  here has no TensorFlow backend, so that one model runs the SavedModel in a python-backend
  ``model.py`` (``benchmarks/peer_models/tf_savedmodel.py``); the rest is merlin-systems as shipped.
- ``echo``: ``benchmarks/peer_models/echo.py`` with the ensemble's inputs and output: reads every input,
  returns one float per row. Nothing below this on the python-backend path.

One gRPC client; per model batch-1 p50 and batch-1024 rows/s, and their ratios to the project's
in-process path (the published version run in this process like the served ``model.py``; the faster
of a pass before and a pass after the served runs). Served scores are checked against in-process first.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from benchmarks import serving_bench

ROOT = Path(__file__).resolve().parent.parent
PEER_MODELS = Path(__file__).resolve().parent / "peer_models"
PROJECT, STOCK, ECHO = serving_bench.MODEL, "stock", "echo"
STOCK_REPO = "stock_repository"  # beside the prepared model's repository: the stock models (prepare_subprocess)
# issue 14 item 4, against the in-process path of the same run
TARGET_P50_RATIO, TARGET_ROWS_RATIO = serving_bench.TARGET_P50_RATIO, serving_bench.TARGET_ROWS_RATIO
# measured with the shared-memory client too (RecsysClient(shared_memory=True)), under "<model>+shm"
SHM_MODELS = (PROJECT, ECHO)


def export_stock(workflow_dir: Path, model_dir: Path, label: str, repo: Path) -> list[str]:
    """merlin-systems' stock export into ``repo``; -> the Triton models it wrote."""
    import nvtabular as nvt
    from merlin.systems.dag import Ensemble
    from merlin.systems.dag.ops.tensorflow import PredictTensorflow
    from merlin.systems.dag.ops.workflow import TransformWorkflow

    serving_wf = nvt.Workflow.load(str(workflow_dir)).remove_inputs([label])
    graph = serving_wf.input_schema.column_names >> TransformWorkflow(serving_wf) >> PredictTensorflow(str(model_dir))
    repo.mkdir(parents=True, exist_ok=True)
    Ensemble(graph, serving_wf.input_schema).export(str(repo), name=STOCK)
    for tf_model in repo.glob("*_predicttensorflowtriton"):
        _python_backend(tf_model, PEER_MODELS / "tf_savedmodel.py")
    return sorted(p.name for p in repo.iterdir() if (p / "config.pbtxt").exists())


def _python_backend(model_dir: Path, model_py: Path) -> None:
    """A stock ``backend: "tensorflow"`` model -> the same model on the python backend."""
    def edit(cfg):
        cfg.backend, cfg.platform = "python", ""
        cfg.parameters.clear()

    serving_bench.edit_config(model_dir / "config.pbtxt", model_dir / "config.pbtxt", edit)
    shutil.copyfile(model_py, model_dir / "1" / "model.py")


def write_echo(project_model: Path, repo: Path) -> None:
    """The echo model: the project's config.pbtxt (same inputs and output) on ``echo.py``."""
    def edit(cfg):
        cfg.name = ECHO
        cfg.parameters.clear()
        cfg.ClearField("dynamic_batching")
        cfg.ClearField("version_policy")

    (repo / ECHO / "1").mkdir(parents=True, exist_ok=True)
    serving_bench.edit_config(project_model / "config.pbtxt", repo / ECHO / "config.pbtxt", edit)
    shutil.copyfile(PEER_MODELS / "echo.py", repo / ECHO / "1" / "model.py")


def _run(args: list[str], log: Path, result: Path | None = None, timeout_s: float = 1800) -> dict:
    """``python -m benchmarks.serving_peers ARGS`` in a fresh interpreter; -> its JSON result."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONWARNINGS="ignore")
    with open(log, "wb") as fh:
        rc = subprocess.run([sys.executable, "-m", "benchmarks.serving_peers", *args], stdout=fh,
                            stderr=subprocess.STDOUT, env=env, timeout=timeout_s, cwd=ROOT).returncode
    if rc != 0:
        raise RuntimeError(f"serving peers child failed ({rc}):\n{log.read_text(errors='replace')[-3000:]}")
    return json.loads(result.read_text()) if result else {}


def prepared_model(work: Path, data_dir: Path, model_rows: int, serving_work: Path | None) -> serving_bench.ServedModel:
    """The model prepared in ``serving_work`` (the serving section's, or any folder where
    ``serving_bench.prepare_model_subprocess`` ran) when there is one, else the same preparation here."""
    sm = serving_bench.load_prepared(serving_work) if serving_work is not None else None
    if sm is None:
        sm = serving_bench.prepare_model_subprocess(work / "model", data_dir, rows=model_rows, n_request_rows=1024)
    return sm


def _request_budget(batch: int, quick: bool, requests_cap: int | None, seconds_cap: float | None) -> tuple:
    n = {1: 300, 1024: 40}[batch] // (5 if quick else 1)
    return (min(n, requests_cap) if requests_cap else n), (seconds_cap or (4.0 if quick else 8.0))


def _parity(inproc, url: str, rows: pd.DataFrame) -> dict:
    from pipeline_lib.serving.client import RecsysClient

    want = inproc(inproc.arrays(rows))
    out = {}
    for model in (PROJECT, STOCK):
        with RecsysClient(url, "grpc", model) as c:
            out[model] = float(np.max(np.abs(c.predict(rows) - want)))
    return out


def budget(plan: serving_bench.Plan) -> dict:
    """{batch: (requests, seconds)} of the peers' points (batch 1 and 1024) under ``plan``'s quick/caps."""
    return {b: _request_budget(b, plan.quick, plan.requests_cap, plan.seconds_cap) for b in (1, 1024)}


class Peers:
    """The peers next to the project's model on one server, in three steps around that server's life:
    ``install`` (the stock and echo models into its repository; the first in-process pass), ``measure``
    (parity, one gRPC client per peer) and ``finish`` (the second in-process pass; ratios). The server
    is this module's own (:func:`bench`) or the serving section's (:func:`with_serving`)."""

    def __init__(self, sm: serving_bench.ServedModel, inproc, work: Path, points: dict):
        self.sm, self.inproc, self.work, self.points = sm, inproc, work, points
        self.passes: list[list[dict]] = []
        self.out: dict = {"served": {}}

    def _inprocess_pass(self) -> list[dict]:
        return [serving_bench.bench_inprocess(self.inproc, self.sm.rows, b, *self.points[b]) for b in (1, 1024)]

    def install(self, repo: Path) -> list[str]:
        """-> the models it added to ``repo`` (which already holds the project's model)."""
        from pipeline_lib.config import ColumnsConfig

        self.work.mkdir(parents=True, exist_ok=True)
        before = {p.name for p in repo.iterdir()}
        result = self.work / "stock.json"
        src, stock = self.sm.source, self.sm.repo.parent / STOCK_REPO  # what the project's version was exported from
        if stock.is_dir():  # exported by the child that prepared the model (prepare_subprocess)
            for model in stock.iterdir():
                shutil.copytree(model, repo / model.name)
        else:
            _run(["export-stock", "--workflow", str(src.workflow_dir), "--model", str(src.model_dir), "--label",
                  ColumnsConfig().label, "--repo", str(repo), "--result", str(result)], self.work / "stock.log", result)
        write_echo(repo / PROJECT, repo)
        self.out["models"] = sorted(p.name for p in repo.iterdir() if (p / "config.pbtxt").exists())
        self.passes.append(self._inprocess_pass())
        return [m for m in self.out["models"] if m not in before]

    def measure(self, server, start_seconds: float) -> None:
        self.out["server_start_seconds"] = start_seconds
        self.out["max_abs_diff_served_vs_inprocess"] = _parity(self.inproc, server.grpc_url, self.sm.rows.iloc[:64])
        runs = [(m, m, "grpc") for m in (PROJECT, STOCK, ECHO)]
        runs += [(m + serving_bench.SHM, m, "grpc" + serving_bench.SHM) for m in SHM_MODELS]
        for key, model, proto in runs:
            self.out["served"][key] = [serving_bench.load_clients(server.grpc_url, proto, self.sm.rows, b, 1,
                                                                  *self.points[b], model=model) for b in (1, 1024)]

    def finish(self) -> dict:
        self.passes.append(self._inprocess_pass())
        self.out["in_process"] = {"passes": self.passes,
                                  "p50_ms": min(p[0]["p50_ms"] for p in self.passes),
                                  "rows_per_s": max(p[1]["rows_per_s"] for p in self.passes)}
        self.out["ratios"] = ratios(self.out)
        return self.out


def bench(work: Path, data_dir: Path, quick: bool = False, model_rows: int = 20_000,
          serving_work: Path | None = None, requests_cap: int | None = None, seconds_cap: float | None = None) -> dict:
    """The peers on their own server (the serving section's model when ``serving_work`` holds it)."""
    t_all = time.perf_counter()
    sm = prepared_model(work, data_dir, model_rows, serving_work)
    repo = work / "peers_repository"
    shutil.rmtree(repo, ignore_errors=True)
    shutil.copytree(sm.repo / PROJECT, repo / PROJECT)
    points = budget(serving_bench.Plan(quick=quick, requests_cap=requests_cap, seconds_cap=seconds_cap))
    peers = Peers(sm, serving_bench.InProcess(sm.ensemble_dir), work, points)
    models = [PROJECT, *peers.install(repo)]
    # four python-backend models import TF or NVTabular at once
    server, start_s = serving_bench.start_server(repo, work / "triton_peers.log", models, timeout_s=600)
    with server:
        peers.measure(server, start_s)
    return peers.finish() | {"total_seconds": round(time.perf_counter() - t_all, 1)}


def with_serving(work: Path, data_dir: Path, plan: serving_bench.Plan, model_rows: int) -> dict:
    """The serving section with ``one_triton``, the peers measured on its server too; their results
    under the key ``serving_peers``."""
    def guest(sm: serving_bench.ServedModel, inproc) -> Peers:
        return Peers(sm, inproc, work / "peers", budget(plan))

    return serving_bench.bench(work, data_dir, plan, model_rows, one_triton=True, guest=guest, prepare=prepare_subprocess)


def prepare_subprocess(work: Path, data_dir: Path, rows: int, n_request_rows: int, batched: bool = True,
                       source: serving_bench.ModelSource | None = None) -> serving_bench.ServedModel:
    """``serving_bench.prepare_model_subprocess``, and in the same child (TensorFlow and NVTabular already
    imported, the model's files at hand) the stock peer's export into ``STOCK_REPO`` beside it."""
    work.mkdir(parents=True, exist_ok=True)
    result = work / "prepare.json"
    _run([*serving_bench.prepare_args(work, data_dir, rows, n_request_rows, batched, source), "--result", str(result)],
         work / "prepare.log", result)
    return serving_bench.load_prepared(work)


def export_stock_beside(sm: serving_bench.ServedModel, work: Path) -> None:
    """The stock peer exported from ``sm``'s workflow and model into ``work/STOCK_REPO``."""
    from pipeline_lib.config import ColumnsConfig

    export_stock(sm.source.workflow_dir, sm.source.model_dir, ColumnsConfig().label, work / STOCK_REPO)


def ratios(out: dict) -> dict:
    """Per model: batch-1 p50 and batch-1024 rows/s over the in-process figures."""
    ip = out["in_process"]
    r = {}
    for model, (b1, b1024) in out["served"].items():
        r[model] = {"p50_ms": b1.get("p50_ms"), "rows_per_s": b1024.get("rows_per_s")}
        if "p50_ms" in b1 and "rows_per_s" in b1024:
            r[model]["p50_over_inprocess"] = round(b1["p50_ms"] / ip["p50_ms"], 2)
            r[model]["rows_per_s_over_inprocess"] = round(b1024["rows_per_s"] / ip["rows_per_s"], 3)
    return r


def ratio_lines(s: dict) -> list[str]:
    """The printed lines: each peer's ratios to in-process, the project's with the issue's targets."""
    r, ip = s["ratios"], s["in_process"]
    lines = [f"serving in-process (project, model.py path): batch-1 p50 {ip['p50_ms']} ms, "
             f"batch-1024 {ip['rows_per_s']:,.0f} rows/s (served: the default gRPC client unless a line says "
             "shared-memory client)"]
    labels = [(PROJECT, "project ensemble"), (STOCK, "stock merlin-systems"), (ECHO, "echo floor")]
    labels += [(m + serving_bench.SHM, f"{dict(labels)[m]}, shared-memory client")
               for m in SHM_MODELS if m + serving_bench.SHM in r]
    for model, label in labels:
        x = r[model]
        if "p50_over_inprocess" not in x:
            lines.append(f"serving {label}: no figures (errors: {s['served'][model]})")
            continue
        p50_t = rows_t = "no target"
        if model in (PROJECT, PROJECT + serving_bench.SHM):
            p50_t = f"target <= {TARGET_P50_RATIO}: {'met' if x['p50_over_inprocess'] <= TARGET_P50_RATIO else 'NOT met'}"
            rows_t = f"target >= {TARGET_ROWS_RATIO}: {'met' if x['rows_per_s_over_inprocess'] >= TARGET_ROWS_RATIO else 'NOT met'}"
        lines.append(f"serving {label}: gRPC batch-1 p50 {x['p50_ms']} ms = {x['p50_over_inprocess']} x in-process "
                     f"({p50_t}); batch-1024 {x['rows_per_s']:,.0f} rows/s = {x['rows_per_s_over_inprocess']} x "
                     f"in-process ({rows_t})")
    if "p50_ms" in r[STOCK] and "p50_ms" in r[PROJECT]:
        lines.append(f"serving stock / project: batch-1 p50 {r[STOCK]['p50_ms'] / r[PROJECT]['p50_ms']:.2f} x, "
                     f"batch-1024 rows/s {r[STOCK]['rows_per_s'] / r[PROJECT]['rows_per_s']:.3f} x")
    diffs = s["max_abs_diff_served_vs_inprocess"]
    lines.append("serving scores vs in-process, max |diff|: " + ", ".join(f"{k} {v:.1e}" for k, v in diffs.items()))
    return lines


def bench_subprocess(work: Path, data_dir: Path, quick: bool = False, model_rows: int = 20_000,
                     serving_work: Path | None = None, requests_cap: int | None = None,
                     seconds_cap: float | None = None) -> dict:
    """bench() in a fresh interpreter (the in-process reference then holds only the ensemble)."""
    work.mkdir(parents=True, exist_ok=True)
    options = {"--work": work, "--data-dir": data_dir, "--model-rows": model_rows, "--serving-work": serving_work,
               "--requests-cap": requests_cap, "--seconds-cap": seconds_cap, "--result": work / "peers.json"}
    args = ["bench", *(["--quick"] if quick else [])] + [x for k, v in options.items() if v for x in (k, str(v))]
    return _run(args, work / "peers.log", work / "peers.json")


def serving_subprocess(work: Path, data_dir: Path, plan: serving_bench.Plan, model_rows: int) -> dict:
    """:func:`with_serving` in a fresh interpreter."""
    work.mkdir(parents=True, exist_ok=True)
    args = ["serving", "--work", str(work), "--data-dir", str(data_dir), "--model-rows", str(model_rows),
            "--plan-json", json.dumps(asdict(plan)), "--result", str(work / "serving.json")]
    return _run(args, work / "serving.log", work / "serving.json")


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["prepare"]:  # serving_bench's prepare mode, then the stock peer from the same model
        return serving_bench.main(argv, after_prepare=export_stock_beside)
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["bench", "export-stock", "serving"])
    p.add_argument("--plan-json", default="{}")
    p.add_argument("--result", required=True)
    p.add_argument("--work")
    p.add_argument("--data-dir")
    p.add_argument("--model-rows", type=int, default=20_000)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--serving-work")
    p.add_argument("--requests-cap", type=int)
    p.add_argument("--seconds-cap", type=float)
    p.add_argument("--workflow")
    p.add_argument("--model")
    p.add_argument("--label")
    p.add_argument("--repo")
    a = p.parse_args(argv)
    if a.mode == "export-stock":
        res = {"models": export_stock(Path(a.workflow), Path(a.model), a.label, Path(a.repo))}
    elif a.mode == "serving":
        res = with_serving(Path(a.work), Path(a.data_dir), serving_bench.Plan.from_json(a.plan_json), a.model_rows)
    else:
        res = bench(Path(a.work), Path(a.data_dir), a.quick, a.model_rows,
                    Path(a.serving_work) if a.serving_work else None, a.requests_cap, a.seconds_cap)
    Path(a.result).write_text(json.dumps(res, indent=1, default=str))


if __name__ == "__main__":
    main()
