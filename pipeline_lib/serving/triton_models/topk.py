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
from pipeline_lib.export.topk import decode_ids, K_INPUT, OUTPUT_COUNT, OUTPUT_IDS, OUTPUT_SCORES, TOPK_DIR, finish_top_k, requested_k
from pipeline_lib.online.impressions import (REQUEST_ID_OUTPUT, new_request_id, open_for_model, request_id_tensor,
                                             subject_ids)
from pipeline_lib.serving import bytes_tensor
from pipeline_lib.features.lookup import COLD_START_OUTPUT, ItemLookup, UserLookup
from pipeline_lib.features.snapshot import has_snapshot
from pipeline_lib.features.store import FeatureStoreError

# the stub decodes every BYTES input with this module function: the vectorised decoder instead
FAST_BYTES = bytes_tensor.install(pb_utils)


class TritonPythonModel:
    def initialize(self, args):
        vdir = version_dir(args)
        self.rec = open_recommender(vdir / TOPK_DIR)
        config = json.loads(args["model_config"])
        self.has_cold = any(o["name"] == COLD_START_OUTPUT for o in config["output"])
        # user-id requests: the missing request columns come from the model's feature store (docs/serving.md)
        self.lookup = UserLookup(vdir / TOPK_DIR, vdir.parent) if self.has_cold and has_snapshot(vdir / TOPK_DIR) else None
        if self.lookup is not None:
            self.lookup.warm()
        # session versions: item feature lists a request leaves out come from the store by item id (docs/sessions.md)
        self.items = ItemLookup(vdir / TOPK_DIR, vdir.parent) if self.rec.kind == "session" and has_snapshot(
            vdir / TOPK_DIR) else None
        if self.items is not None:
            self.items.warm()
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
            arrays, cold = self._complete(arrays)
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
            if self.has_cold:
                outputs.append(pb_utils.Tensor(COLD_START_OUTPUT, self._cold(arrays, cold, len(count))))
            if self.has_request_id:
                outputs.append(pb_utils.Tensor(REQUEST_ID_OUTPUT, request_id_tensor(request_id)))
            if self.impressions is not None:
                users = subject_ids(arrays, self.impressions.settings.user_columns, len(ids))
                self.impressions.log(request_id, users, ids, scores)
            return pb_utils.InferenceResponse(output_tensors=outputs)
        except BadRequest as exc:  # the client's fault: INVALID_ARG (HTTP 400)
            return error_response(pb_utils, exc)
        except FeatureStoreError as exc:  # store down, empty or another version's: UNAVAILABLE (HTTP 503)
            self.logger.log_warn(str(exc))
            return error_response(pb_utils, exc)
        except Exception as exc:  # noqa: BLE001 - report, never crash the model instance: INTERNAL (HTTP 500)
            self.logger.log_error(traceback.format_exc())
            return error_response(pb_utils, exc)

    def _complete(self, arrays):
        """A request without some feature columns (a user-id request): those looked up by user id in the store (a
        session request: its item feature lists, by item id)."""
        if self.items is not None:
            missing = [c for c in self.items.snap.item_columns if f"{c}__values" not in arrays]
            return (self.items.complete_items(arrays, missing) if missing else arrays), None
        if self.lookup is None:
            return arrays, None
        missing = [c for c in self.rec.lookup_columns if c not in arrays and f"{c}__values" not in arrays]
        if not missing:
            return arrays, None
        return self.lookup.complete(arrays, missing)

    def _cold(self, arrays, cold, rows):
        """``cold_start`` per row: unknown to the store (user-id request) or to the version's training users."""
        if cold is not None:
            return np.asarray(cold, dtype=bool)
        users = arrays.get(self.lookup.user_id) if self.lookup is not None else None
        known = getattr(self.rec, "seen_users", None)
        if users is None or known is None:
            return np.zeros(rows, dtype=bool)
        return known.get_indexer(decode_ids(np.asarray(users).reshape(-1))) < 0
