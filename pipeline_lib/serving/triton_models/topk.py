"""Triton python-backend model of every top-k version (retrieval, two-stage, session); copied into each
version as ``model.py``.

Raw request columns in (checked by :mod:`pipeline_lib.validate.requests`; a bad request is answered as
invalid-argument, HTTP 400; the optional ``k`` input asks for fewer items), ``item_ids`` and ``scores``
[rows, k] and ``count`` [rows] out (only valid items: :func:`pipeline_lib.export.topk.finish_top_k`; a
version exported before ``count`` existed answers ``item_ids`` and ``scores`` only), computed by the version's
recommender (:mod:`pipeline_lib.export.topk`), picked by spec.json's ``kind``:
:class:`~pipeline_lib.export.topk.TopKRecommender` (query encoder, catalogue embeddings, optional
ranker), :class:`~pipeline_lib.export.session.SessionRecommender` (session model scores; both run
the fitted workflow, compiled transform when verified at export) or
:class:`~pipeline_lib.export.classical.ClassicalRecommender` (ease / item_knn weights over the user's
history) or :class:`~pipeline_lib.export.session_classical.ClassicalSessionRecommender` (classical session
model, numpy on the raw item ids); all share the one exclusion + top-k + id-decoding step
(:mod:`pipeline_lib.export.recommenders`). Only runs inside Triton's python backend stub.
"""
import json
import traceback

import numpy as np
import triton_python_backend_utils as pb_utils

from pipeline_lib.validate.requests import (BadRequest, check_request, error_response, lists_present, read_request,
                                            request_limits, tensor_reader, version_dir)
from pipeline_lib.export.recommenders import open_recommender
from pipeline_lib.export.topk import K_INPUT, OUTPUT_COUNT, OUTPUT_IDS, OUTPUT_SCORES, TOPK_DIR, finish_top_k, requested_k
from pipeline_lib.online.impressions import (REQUEST_ID_OUTPUT, new_request_id, open_for_model, request_id_tensor,
                                             subject_ids)
from pipeline_lib.serving import bytes_tensor

# the stub decodes every BYTES input with this module function: the vectorised decoder instead
FAST_BYTES = bytes_tensor.install(pb_utils)


class TritonPythonModel:
    def initialize(self, args):
        self.rec = open_recommender(version_dir(args) / TOPK_DIR)
        config = json.loads(args["model_config"])
        self.limits = request_limits(config)  # rows, string and list sizes, value ranges (config.pbtxt)
        self.max_rows = self.limits.max_rows
        self.input_names = [i["name"] for i in config["input"] if i["name"] != K_INPUT]
        self.has_k = any(i["name"] == K_INPUT for i in config["input"])
        self.has_count = any(o["name"] == OUTPUT_COUNT for o in config["output"])
        self.optional = {i["name"] for i in config["input"] if i.get("optional")}  # exclude_item_ids
        self.ragged = {n[: -len("__values")] for n in self.input_names if n.endswith("__values")}
        self.logger = pb_utils.Logger
        # the impression log (online.impressions; None when off) and the request id output (versions
        # exported before it existed have none)
        self.has_request_id = any(o["name"] == REQUEST_ID_OUTPUT for o in config["output"])
        self.impressions = open_for_model(args)

    def execute(self, requests):
        return [self._one(request) for request in requests]

    def finalize(self):
        if self.impressions is not None:  # unload or clean stop: everything queued is written
            self.impressions.close()

    def _one(self, request):
        try:
            request_id = new_request_id(request.request_id())
            read = tensor_reader(pb_utils, request)
            k = requested_k(read(K_INPUT), self.rec.k) if self.has_k else None
            arrays = read_request(read, self.input_names, self.optional)
            ragged = lists_present(arrays, self.ragged)
            arrays = check_request(arrays, ragged, self.max_rows, self.limits)
            ids, scores = self.rec.recommend_tensors(arrays, ragged)
            # only valid items (an excluded one is never answered), never a non-finite score
            ids, scores, count = finish_top_k(ids, scores, k)
            if ids.dtype.kind in "OUS":
                ids = np.array([str(v).encode("utf-8") for v in ids.reshape(-1)], dtype=object).reshape(ids.shape)
            else:
                ids = ids.astype(np.int64)
            outputs = [pb_utils.Tensor(OUTPUT_IDS, ids), pb_utils.Tensor(OUTPUT_SCORES, scores.astype(np.float32))]
            if self.has_count:
                outputs.append(pb_utils.Tensor(OUTPUT_COUNT, count))
            if self.has_request_id:
                outputs.append(pb_utils.Tensor(REQUEST_ID_OUTPUT, request_id_tensor(request_id)))
            if self.impressions is not None:
                users = subject_ids(arrays, self.impressions.settings.user_columns, len(ids))
                self.impressions.log(request_id, users, ids, scores)
            return pb_utils.InferenceResponse(output_tensors=outputs)
        except BadRequest as exc:  # the client's fault: INVALID_ARG (HTTP 400)
            return error_response(pb_utils, exc)
        except Exception as exc:  # noqa: BLE001 - report, never crash the model instance: INTERNAL (HTTP 500)
            self.logger.log_error(traceback.format_exc())
            return error_response(pb_utils, exc)
