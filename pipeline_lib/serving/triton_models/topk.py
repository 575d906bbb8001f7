"""Triton python-backend model of every top-k version (retrieval, two-stage, session); copied into each
version as ``model.py``.

Raw request columns in (checked by :mod:`pipeline_lib.validate.requests`; a bad request is answered as
invalid-argument, HTTP 400), ``item_ids`` and ``scores`` [rows, k] out, computed by the version's
recommender (:mod:`pipeline_lib.export.topk`), picked by spec.json's ``kind``:
:class:`~pipeline_lib.export.topk.TopKRecommender` (query encoder, catalogue embeddings, optional
ranker), :class:`~pipeline_lib.export.session.SessionRecommender` (session model scores; both run
the fitted workflow, compiled transform when verified at export) or
:class:`~pipeline_lib.export.session_classical.ClassicalSessionRecommender` (classical session model,
numpy on the raw item ids); all share the one exclusion + top-k + id-decoding step. Only runs inside Triton's python backend stub.
"""
import json
import traceback

import numpy as np
import triton_python_backend_utils as pb_utils

from pipeline_lib.validate.requests import (BadRequest, check_request, error_response, lists_present, max_request_rows,
                                            read_request, tensor_reader, version_dir)
from pipeline_lib.export.session import SessionRecommender
from pipeline_lib.export.session_classical import ClassicalSessionRecommender
from pipeline_lib.export.topk import OUTPUT_IDS, OUTPUT_SCORES, TOPK_DIR, TopKRecommender
from pipeline_lib.serving import bytes_tensor

# the stub decodes every BYTES input with this module function: the vectorised decoder instead
FAST_BYTES = bytes_tensor.install(pb_utils)
RECOMMENDERS = {cls.kind: cls for cls in (TopKRecommender, SessionRecommender, ClassicalSessionRecommender)}


class TritonPythonModel:
    def initialize(self, args):
        art = version_dir(args) / TOPK_DIR
        kind = json.loads((art / "spec.json").read_text()).get("kind", TopKRecommender.kind)
        self.rec = RECOMMENDERS[kind](art)
        config = json.loads(args["model_config"])
        self.max_rows = max_request_rows(config)
        self.input_names = [i["name"] for i in config["input"]]
        self.optional = {i["name"] for i in config["input"] if i.get("optional")}  # exclude_item_ids
        self.ragged = {n[: -len("__values")] for n in self.input_names if n.endswith("__values")}
        self.logger = pb_utils.Logger

    def execute(self, requests):
        return [self._one(request) for request in requests]

    def _one(self, request):
        try:
            arrays = read_request(tensor_reader(pb_utils, request), self.input_names, self.optional)
            ragged = lists_present(arrays, self.ragged)
            arrays = check_request(arrays, ragged, self.max_rows)
            ids, scores = self.rec.recommend_tensors(arrays, ragged)
            if ids.dtype.kind in "OUS":
                ids = np.array([str(v).encode("utf-8") for v in ids.reshape(-1)], dtype=object).reshape(ids.shape)
            else:
                ids = ids.astype(np.int64)
            return pb_utils.InferenceResponse(output_tensors=[
                pb_utils.Tensor(OUTPUT_IDS, ids),
                pb_utils.Tensor(OUTPUT_SCORES, scores.astype(np.float32)),
            ])
        except BadRequest as exc:  # the client's fault: INVALID_ARG (HTTP 400)
            return error_response(pb_utils, exc)
        except Exception as exc:  # noqa: BLE001 - report, never crash the model instance: INTERNAL (HTTP 500)
            self.logger.log_error(traceback.format_exc())
            return error_response(pb_utils, exc)
