"""Triton python-backend model for an exported ensemble; copied into each version as ``model.py``.

It replaces merlin-systems' ``executor_model.py`` with: request checks that answer a clear error naming
the field, as invalid-argument (HTTP 400, gRPC INVALID_ARGUMENT; :mod:`pipeline_lib.validate.requests`),
internal errors reported as one line with the INTERNAL code (HTTP 500; the traceback goes to the server
log, not to the client), and a direct call on numpy arrays instead of merlin's DAG runtime.

Loading: a version with a compiled plan (:mod:`pipeline_lib.export.compiled_version`: the workflow compiled
to numpy and the model compiled to ONNX, both verified at export) loads just those -- no TensorFlow,
NVTabular or merlin import, about a second instead of ten or more. The full ensemble (the same loading as
merlin's executor model, then :class:`pipeline_lib.export.ranking.DirectPredictor`: the workflow op's
compiled transform or NVTabular, then ONNX Runtime or the SavedModel) is loaded at start when there is no
plan, else on the first request the plan does not cover (inputs outside the compiled transform, an error of
the compiled model; a large request is scored by the compiled model in chunks). The load logs one
line (:func:`pipeline_lib.export.compiled_version.load_event`: path, seconds, the heavy modules the process
holds), and another when a fallback loads the full ensemble.

With dynamic batching in config.pbtxt (``max_batch_size`` > 0), the requests Triton queued together are
checked one by one, scored in one call and answered with their own rows. This file only runs inside
Triton's python backend stub (it imports ``triton_python_backend_utils``).
"""
import time

_IMPORTED_AT = time.perf_counter()  # the load time logged includes this module's imports

import json
import traceback
from typing import Any

import numpy as np
import triton_python_backend_utils as pb_utils

from pipeline_lib.export.compiled_version import CompiledPredictor, NeedsFallback, load_event
from pipeline_lib.features.lookup import COLD_START_OUTPUT, UserLookup
from pipeline_lib.features.pairs import complete_pairs, missing_columns
from pipeline_lib.features.snapshot import has_snapshot
from pipeline_lib.features.store import FeatureStoreError
from pipeline_lib.online.impressions import (REQUEST_ID_OUTPUT, new_request_id, open_for_model, request_id_tensor,
                                             subject_ids)
from pipeline_lib.serving import bytes_tensor
from pipeline_lib.validate.requests import (BadRequest, check_request, check_scores, concat_requests,
                                            error_response, read_request, request_limits, split_rows,
                                            tensor_reader, version_dir)

# the stub decodes every BYTES input with this module function: the vectorised decoder instead
FAST_BYTES = bytes_tensor.install(pb_utils)


class TritonPythonModel:
    def initialize(self, args):
        t0 = _IMPORTED_AT
        self.version_dir = version_dir(args)
        config = json.loads(args["model_config"])
        # dynamic batching (max_batch_size > 0): each request is one batch entry ([1, rows] tensors);
        # execute() gets the queued requests together, scores their rows in one call and splits them
        self.batched = int(config.get("max_batch_size", 0)) > 0
        self.limits = request_limits(config)  # rows, string and list sizes, value ranges (config.pbtxt)
        self.max_rows = self.limits.max_rows
        self.logger = pb_utils.Logger
        self.full: Any = None  # the full ensemble's predictor, loaded when needed
        # the impression log (online.impressions; None when off) and the request id output (versions
        # exported before it existed have none)
        self.has_request_id = any(o["name"] == REQUEST_ID_OUTPUT for o in config["output"])
        self.impressions = open_for_model(args)
        # user-id requests (user_id + item ids; docs/serving.md): the missing columns come from the feature store
        self.optional = {i["name"] for i in config["input"] if i.get("optional")}
        self.has_cold = any(o["name"] == COLD_START_OUTPUT for o in config["output"])
        self.input_dtypes = {i["name"]: pb_utils.triton_string_to_numpy(i["data_type"]) for i in config["input"]
                             if i["data_type"] != "TYPE_STRING"}
        art = self.version_dir / "ensemble"
        self.lookup = UserLookup(art, self.version_dir.parent) if self.has_cold and has_snapshot(art) else None
        why = "no compiled version"
        try:
            self.compiled = CompiledPredictor.load(self.version_dir / "ensemble")
        except Exception as exc:  # noqa: BLE001 - e.g. onnxruntime missing here: the full ensemble serves
            self.logger.log_warn("compiled version not loaded, the full ensemble serves:\n" + traceback.format_exc())
            self.compiled, why = None, f"compiled version not loaded: {type(exc).__name__}: {exc}"
        if self.compiled is None:
            self._load_full(why, t0)
        else:
            plan = self.compiled.plan
            self.input_names, self.ragged, self.output_names = plan.input_names, set(plan.ragged), plan.output_names
            self.logger.log_info(load_event("compiled", time.perf_counter() - t0))
        if self.lookup is not None:  # Feast imported and the store opened now, after the model's load line
            self.lookup.warm()

    def _load_full(self, why, t0=None):
        """The whole ensemble (TensorFlow, NVTabular, merlin-systems), as merlin's executor model loads it;
        logged with ``why`` and the seconds since ``t0`` (default: now, imports included)."""
        t0 = time.perf_counter() if t0 is None else t0
        from merlin.systems.triton.conversions import tensor_names
        from pipeline_lib.export.ranking import DirectPredictor, load_version

        ensemble = load_version(self.version_dir)
        schema = ensemble.input_schema
        self.input_names = tensor_names(schema)
        self.ragged = {c.name for c in schema.column_schemas.values() if c.is_ragged}
        self.output_names = ensemble.output_schema.column_names
        # workflow >> model ensembles (all this project exports) skip merlin's DAG runtime
        self.full = DirectPredictor.from_ensemble(ensemble) or _EnsembleTransform(ensemble)
        self.logger.log_info(load_event("full", time.perf_counter() - t0, why))

    def finalize(self):
        if self.impressions is not None:  # unload or clean stop: everything queued is written
            self.impressions.close()

    def _answer(self, request, checked, outputs, batched=False, cold=None):
        """The response of a scored request (``outputs``: its own rows), its request id, its impression, and
        ``cold_start`` per row (user-id requests: the user unknown to the store; full rows: false)."""
        request_id = new_request_id(request.request_id())
        tensors = [pb_utils.Tensor(n, outputs[n][None, ...] if batched else outputs[n]) for n in self.output_names]
        if self.has_cold:
            rows = outputs[self.output_names[0]].reshape(-1).shape[0]
            flags = np.zeros(rows, dtype=bool) if cold is None else np.asarray(cold, dtype=bool)
            tensors.append(pb_utils.Tensor(COLD_START_OUTPUT, flags[None, ...] if batched else flags))
        if self.has_request_id:
            tensors.append(pb_utils.Tensor(REQUEST_ID_OUTPUT, request_id_tensor(request_id, batched)))
        if self.impressions is not None:
            s = self.impressions.settings
            items = checked.get(s.item_column)
            scores = outputs[self.output_names[0]].reshape(-1)
            if items is not None and len(items) == len(scores):
                self.impressions.log(request_id, subject_ids(checked, s.user_columns, len(scores)), items, scores)
        return pb_utils.InferenceResponse(tensors)

    def execute(self, requests):
        if not self.batched:
            return [self._one(request) for request in requests]
        return self._batch(requests)

    def _read(self, request):
        """Checked request tensors and the cold-start mask (None: a full-feature request)."""
        arrays = read_request(tensor_reader(pb_utils, request), self.input_names, self.optional, self.batched)
        cold = None
        if self.lookup is not None:
            missing = missing_columns(self.input_names, arrays)
            if missing:
                arrays, cold = complete_pairs(self.lookup, arrays, missing, self.input_dtypes)
        return check_request(arrays, self.ragged, self.max_rows, self.limits), cold

    def _predict(self, checked):
        """Checked request tensors -> {output name: array with one row per request row}."""
        if self.compiled is not None:
            try:
                return self.compiled(checked)
            except NeedsFallback as exc:
                if self.full is None:
                    self._load_full(str(exc))
        return self.full(checked)

    def _one(self, request):
        try:
            checked, cold = self._read(request)
            if isinstance(self.full, _EnsembleTransform):  # merlin's response: outputs as the ensemble's schema says
                return self.full.response(checked)
            outputs = self._predict(checked)
            check_scores({n: outputs[n] for n in self.output_names})  # never a NaN score answered
            return self._answer(request, checked, outputs, cold=cold)
        except BadRequest as exc:  # the client's fault: INVALID_ARG (HTTP 400)
            return error_response(pb_utils, exc)
        except FeatureStoreError as exc:  # store down, empty or another version's: UNAVAILABLE (HTTP 503)
            self.logger.log_warn(str(exc))
            return error_response(pb_utils, exc)
        except Exception as exc:  # noqa: BLE001 - report, never crash the model instance
            return self._internal_error(exc)

    def _batch(self, requests):
        """Requests queued together by Triton's dynamic batcher: bad ones answered alone, the others'
        rows scored in one call and each request answered with its own rows."""
        responses = [None] * len(requests)
        good, checked, colds = [], [], []
        for i, request in enumerate(requests):
            try:
                arrays, cold = self._read(request)
                checked.append(arrays)
                colds.append(cold)
                good.append(i)
            except (BadRequest, FeatureStoreError) as exc:
                responses[i] = error_response(pb_utils, exc)
            except Exception as exc:  # noqa: BLE001
                responses[i] = self._internal_error(exc)
        if good:
            try:
                combined, counts = concat_requests(checked, self.ragged)
                outputs = self._predict(combined)
                parts = {n: split_rows(outputs[n], counts) for n in self.output_names}
                for k, i in enumerate(good):
                    try:  # a request with a non-finite score gets an error; the others their scores
                        check_scores({n: parts[n][k] for n in self.output_names})
                    except BadRequest as exc:
                        responses[i] = error_response(pb_utils, exc)
                        continue
                    # one batch entry per request: the outputs get the leading batch dimension of 1
                    responses[i] = self._answer(requests[i], checked[k], {n: parts[n][k] for n in self.output_names},
                                                batched=True, cold=colds[k])
            except Exception as exc:  # noqa: BLE001
                self.logger.log_error(traceback.format_exc())
                for i in good:
                    responses[i] = error_response(pb_utils, exc)
        return responses

    def _internal_error(self, exc):
        """INTERNAL (HTTP 500): a one-line message to the client, the traceback to the server log."""
        self.logger.log_error(traceback.format_exc())
        return error_response(pb_utils, exc)


class _EnsembleTransform:
    """An ensemble that is not ``workflow >> model``: merlin's DAG runtime on a TensorTable."""

    def __init__(self, ensemble):
        from merlin.dag.runtime import Runtime

        self.ensemble, self.runtime = ensemble, Runtime()

    def _transform(self, tensors):
        from merlin.table import TensorTable

        return self.ensemble.transform(TensorTable(tensors), runtime=self.runtime)

    def __call__(self, tensors):
        outputs = self._transform(tensors)
        return {n: outputs[n].values for n in self.ensemble.output_schema.column_names}

    def response(self, tensors):
        from merlin.systems.triton.conversions import tensor_table_to_triton_response

        return tensor_table_to_triton_response(self._transform(tensors), self.ensemble.output_schema)
