"""Triton python-backend model for an exported ensemble; copied into each version as ``model.py``.

It replaces merlin-systems' ``executor_model.py`` (same loading of the ensemble and its
artifacts) with: request checks that answer a clear error naming the field, as invalid-argument
(HTTP 400, gRPC INVALID_ARGUMENT; :mod:`pipeline_lib.validate.requests`), internal errors reported as
one line with the INTERNAL code (HTTP 500; the traceback goes to the server log, not to the
client), and a direct ``workflow >> model`` call on numpy arrays
(:class:`pipeline_lib.export.ranking.DirectPredictor`: the workflow op's compiled transform, then the
SavedModel signature) instead of merlin's DAG runtime. With dynamic batching in config.pbtxt
(``max_batch_size`` > 0), the requests Triton queued together are checked one by one, scored in
one call and answered with their own rows. This file only runs inside
Triton's python backend stub (it imports ``triton_python_backend_utils``).
"""
import json
import traceback

import triton_python_backend_utils as pb_utils

from merlin.dag import postorder_iter_nodes
from merlin.dag.runtime import Runtime
from merlin.systems.dag import Ensemble
from merlin.systems.triton.conversions import tensor_names, tensor_table_to_triton_response
from merlin.table import TensorTable
from pipeline_lib.export.ranking import DirectPredictor
from pipeline_lib.validate.requests import (BadRequest, check_request, concat_requests, error_response, fill_optional_lists,
                                            max_request_rows, read_request, split_rows, tensor_reader, version_dir)


class TritonPythonModel:
    def initialize(self, args):
        ensemble_path = version_dir(args) / "ensemble"
        self.ensemble = Ensemble.load(str(ensemble_path))
        for node in postorder_iter_nodes(self.ensemble.graph.output_node, flatten_subgraphs=True):
            node.op.load_artifacts(str(ensemble_path))
        config = json.loads(args["model_config"])
        # dynamic batching (max_batch_size > 0): each request is one batch entry ([1, rows] tensors);
        # execute() gets the queued requests together, scores their rows in one call and splits them
        self.batched = int(config.get("max_batch_size", 0)) > 0
        self.max_rows = max_request_rows(config)
        schema = self.ensemble.input_schema
        self.input_names = tensor_names(schema)
        self.ragged = {c.name for c in schema.column_schemas.values() if c.is_ragged}
        # optional list inputs (a session version's exclude_item_ids): absent from a request -> empty lists
        self.optional = {i["name"]: i["data_type"] for i in config["input"] if i.get("optional")}
        self.runtime = Runtime()
        self.logger = pb_utils.Logger
        # workflow >> model ensembles (all this project exports) skip merlin's DAG runtime
        self.direct = DirectPredictor.from_ensemble(self.ensemble)
        self.output_names = self.ensemble.output_schema.column_names

    def execute(self, requests):
        if not self.batched:
            return [self._one(request) for request in requests]
        return self._batch(requests)

    def _read(self, request):
        arrays = read_request(tensor_reader(pb_utils, request), self.input_names, self.optional, self.batched)
        if self.optional:
            arrays = fill_optional_lists(arrays, {n: pb_utils.triton_string_to_numpy(t)
                                                  for n, t in self.optional.items()}, self.ragged)
        return check_request(arrays, self.ragged, self.max_rows)

    def _predict(self, checked):
        """Checked request tensors -> {output name: array with one row per request row}."""
        if self.direct is not None:
            return self.direct(checked)
        outputs = self.ensemble.transform(TensorTable(checked), runtime=self.runtime)
        return {n: outputs[n].values for n in self.output_names}

    def _one(self, request):
        try:
            checked = self._read(request)
            if self.direct is not None:
                outputs = self.direct(checked)
                return pb_utils.InferenceResponse([pb_utils.Tensor(n, outputs[n]) for n in self.output_names])
            outputs = self.ensemble.transform(TensorTable(checked), runtime=self.runtime)
            return tensor_table_to_triton_response(outputs, self.ensemble.output_schema)
        except BadRequest as exc:  # the client's fault: INVALID_ARG (HTTP 400)
            return error_response(pb_utils, exc)
        except Exception as exc:  # noqa: BLE001 - report, never crash the model instance
            return self._internal_error(exc)

    def _batch(self, requests):
        """Requests queued together by Triton's dynamic batcher: bad ones answered alone, the others'
        rows scored in one call and each request answered with its own rows."""
        responses = [None] * len(requests)
        good, checked = [], []
        for i, request in enumerate(requests):
            try:
                checked.append(self._read(request))
                good.append(i)
            except BadRequest as exc:
                responses[i] = error_response(pb_utils, exc)
            except Exception as exc:  # noqa: BLE001
                responses[i] = self._internal_error(exc)
        if good:
            try:
                combined, counts = concat_requests(checked, self.ragged)
                outputs = self._predict(combined)
                parts = {n: split_rows(outputs[n], counts) for n in self.output_names}
                for k, i in enumerate(good):
                    # one batch entry per request: the outputs get the leading batch dimension of 1
                    responses[i] = pb_utils.InferenceResponse(
                        [pb_utils.Tensor(n, parts[n][k][None, ...]) for n in self.output_names])
            except Exception as exc:  # noqa: BLE001
                self.logger.log_error(traceback.format_exc())
                for i in good:
                    responses[i] = error_response(pb_utils, exc)
        return responses

    def _internal_error(self, exc):
        """INTERNAL (HTTP 500): a one-line message to the client, the traceback to the server log."""
        self.logger.log_error(traceback.format_exc())
        return error_response(pb_utils, exc)
