"""A served version that loads without TensorFlow, NVTabular or merlin: the compiled transform and the
compiled model, and a plan saying how requests reach them.

Importing merlin (any of ``merlin.dag``, ``merlin.systems``, ``merlin.table``) imports TensorFlow, and the
workflow and ensemble pickles need NVTabular and merlin-systems: ~10 s per Triton model load on a 2-core
machine, before a single request. Yet a version whose workflow compiled (:mod:`pipeline_lib.etl.fast_transform`)
and whose model compiled to ONNX (:mod:`pipeline_lib.export.compiled_model`) answers requests of up to the
any number of rows with numpy and ONNX Runtime alone. For such a version the export writes,
beside the ensemble's artifacts (``model.onnx`` already there):

- ``transform.pkl``: the :class:`~pipeline_lib.etl.fast_transform.CompiledWorkflow` (plain data: names,
  numpy arrays, vocabularies; unpickling imports numpy and pandas only);
- ``compiled.json``: the request's input tensors, its list columns, the output names, the model's input
  dtypes and ``chunk_rows``, the largest batch size export verified the compiled model on (a bigger request
  is transformed at once and scored in chunks of that many rows: rows are scored independently).

The served ``model.py`` loads just these (:meth:`CompiledPredictor.load`), and loads the full ensemble
(TensorFlow, NVTabular) only when a request needs it: :class:`NeedsFallback` is raised for inputs the
compiled transform does not cover or an error of the compiled model. A large request (or a dynamically
batched group of requests) does not load TensorFlow: ONNX Runtime scores it in chunks, which at the
largest verified batch size costs about what the SavedModel costs per row (both are timed at export,
``run_info.json`` -> ``compiled_model.timings``), instead of a load of TensorFlow and the ensemble that
took 11-17 s on a busy 2-core machine. Export checks this predictor against the offline scores before
the version is written.
"""
from __future__ import annotations

import json
import pickle
import sys
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping, Optional

import numpy as np

from pipeline_lib.etl.fast_transform import (CompiledWorkflow, Unsupported, columns_from_tensors, n_rows, take_rows,
                                             tensors_from_columns)
from pipeline_lib.export.compiled_model import ONNX_FILE, CompiledModel

PLAN_FILE = "compiled.json"
TRANSFORM_FILE = "transform.pkl"
FORMAT = 2  # 2: ``chunk_rows`` (format 1 plans, whose ``max_rows`` sent bigger requests to TensorFlow, load as none)
HEAVY_MODULES = ("tensorflow", "nvtabular", "merlin", "dask")  # what the compiled path must not import
LOAD_EVENT = "recsys-model-load"  # the served model's log line at load and at a fallback's load


class NeedsFallback(Exception):
    """This request is outside what the compiled version serves: the full ensemble answers it."""


@dataclass
class CompiledPlan:
    """How a request reaches the compiled transform and model (``compiled.json``)."""

    input_names: list[str]  # request tensors, lists as ``<name>__values`` / ``<name>__offsets``
    ragged: list[str]  # list columns of the request
    output_names: list[str]
    model_inputs: dict[str, str]  # ONNX input -> numpy dtype name
    chunk_rows: int  # rows per compiled-model call: the largest batch size verified at export


def request_rows(arrays: Mapping[str, np.ndarray]) -> int:
    """Rows of request or model-input tensors: the length of a column that is not a list's values/offsets."""
    for name, arr in arrays.items():
        if not name.endswith(("__values", "__offsets")):
            return len(arr)
    name = next(n for n in arrays if n.endswith("__offsets"))
    return len(arrays[name]) - 1


@dataclass
class CompiledPredictor:
    """Request tensors -> {output name: scores} through the compiled transform and the compiled model."""

    plan: CompiledPlan
    transform: CompiledWorkflow
    model: CompiledModel

    @classmethod
    def load(cls, artifact_dir: Path | str) -> Optional["CompiledPredictor"]:
        """The version's compiled predictor, or None when the export wrote none (a fast path was off or
        not verified): then the full ensemble serves."""
        artifacts = Path(artifact_dir)
        plan_path = artifacts / PLAN_FILE
        if not plan_path.is_file():
            return None
        stored = json.loads(plan_path.read_text())
        if stored.pop("format", None) != FORMAT:
            return None
        plan = CompiledPlan(**stored)
        with open(artifacts / TRANSFORM_FILE, "rb") as f:
            transform = pickle.load(f)
        model = CompiledModel.load(str(artifacts / ONNX_FILE), plan.model_inputs, plan.output_names)
        return cls(plan, transform, model)

    def __call__(self, tensors: Mapping[str, np.ndarray]) -> dict:
        try:
            cols = self.transform(columns_from_tensors(tensors, set(self.plan.ragged)))
        except Unsupported as exc:
            raise NeedsFallback(f"outside the compiled transform: {exc}") from exc
        try:
            return self._score(cols)
        except Exception as exc:  # noqa: BLE001 - outside what export verified: the full ensemble answers
            raise NeedsFallback(f"the compiled model failed: {type(exc).__name__}: {exc}") from exc

    def _score(self, cols: Mapping[str, object]) -> dict:
        """The compiled model over the transformed columns, ``chunk_rows`` rows per call."""
        rows, step = n_rows(next(iter(cols.values()))), self.plan.chunk_rows
        if rows <= step:
            return self.model(tensors_from_columns(cols))
        parts = [self.model(tensors_from_columns({k: take_rows(v, np.arange(i, min(i + step, rows)))
                                                  for k, v in cols.items()}))
                 for i in range(0, rows, step)]
        return {name: np.concatenate([p[name] for p in parts]) for name in parts[0]}


def write(artifact_dir: Path, plan: CompiledPlan, transform: CompiledWorkflow) -> None:
    """Write the plan and the pickled transform beside the version's ``model.onnx``."""
    with open(artifact_dir / TRANSFORM_FILE, "wb") as f:
        pickle.dump(transform, f, protocol=pickle.HIGHEST_PROTOCOL)
    (artifact_dir / PLAN_FILE).write_text(json.dumps({"format": FORMAT, **asdict(plan)}, indent=2))


def heavy_modules() -> list[str]:
    """Which of :data:`HEAVY_MODULES` this process has imported (the served model logs it at load)."""
    return [m for m in HEAVY_MODULES if m in sys.modules]


def load_event(path: str, seconds: float, why: Optional[str] = None) -> str:
    """The served model's log line: which path loaded (``compiled`` or ``full``), in how many seconds, the
    heavy modules the model's process then holds, and why a fallback loaded the full ensemble."""
    fields = {"path": path, "seconds": round(seconds, 3), "heavy_modules": heavy_modules()}
    return f"{LOAD_EVENT} " + json.dumps({**fields, **({"why": why} if why else {})})


def load_events(log_text: str) -> list[dict]:
    """The :func:`load_event` lines of a Triton log, oldest first (Triton quotes and escapes messages)."""
    events = []
    for line in log_text.splitlines():
        at = line.find(LOAD_EVENT + " ")
        if at < 0:
            continue
        body = line[at + len(LOAD_EVENT) + 1:]
        if body.endswith('"'):  # the rest of Triton's quoted message: undo its escaping
            try:
                body = json.loads('"' + body[:-1] + '"')
            except ValueError:
                continue
        try:
            events.append(json.loads(body))
        except ValueError:
            continue
    return events
