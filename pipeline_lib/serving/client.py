"""Query the served ensemble with raw, untransformed feature rows over HTTP or gRPC (tritonclient)."""
from __future__ import annotations

import itertools
import threading
from typing import Iterable, Literal, Mapping, Optional, Union

import numpy as np
import pandas as pd
from tritonclient.utils import InferenceServerException, np_to_triton_dtype

from pipeline_lib.export.compiled_version import request_rows
from pipeline_lib.serving import bytes_tensor
from pipeline_lib.serving.shared_memory import SharedMemoryTransport, output_bytes

Protocol = Literal["http", "grpc"]
# optional inputs of a served model: sent only when the rows carry them (top-k: item ids never to
# return for that row, pipeline_lib.export.topk.EXCLUDE_INPUT; a classical version's history, looked up in the
# feature store when left out, pipeline_lib.export.classical.HISTORY_INPUT)
OPTIONAL_FIELDS = ("exclude_item_ids", "history_item_ids")
# request-level inputs (not a row field): top-k's ``k`` (pipeline_lib.export.topk.K_INPUT), set by recommend(k=...)
REQUEST_FIELDS = ("k",)

_NP = {
    "BOOL": np.bool_, "INT8": np.int8, "INT16": np.int16, "INT32": np.int32, "INT64": np.int64,
    "UINT8": np.uint8, "UINT16": np.uint16, "UINT32": np.uint32, "UINT64": np.uint64,
    "FP16": np.float16, "FP32": np.float32, "FP64": np.float64, "BYTES": np.object_,
}


class RequestError(ValueError):
    """A request could not be built from the given rows (names the offending field), or the server
    refused it as invalid (:class:`BadRequestError`)."""


class BadRequestError(RequestError, InferenceServerException):
    """The server answered the request as invalid: HTTP 400 / gRPC ``INVALID_ARGUMENT`` (the served
    model's request checks -- row counts, list offsets, empty or too large batch -- and Triton's own
    checks of input names, datatypes and shapes). The client's fault: retrying the same request fails
    again. It is still an ``InferenceServerException`` with the server's message, ``status()``
    (``"400"`` or ``"StatusCode.INVALID_ARGUMENT"``) and ``debug_details()``; other server errors
    (internal failures: HTTP 500 / ``INTERNAL``, unavailable, ...) stay plain
    ``InferenceServerException``."""

    def __init__(self, msg: str, status: Optional[str] = None, debug_details: Optional[str] = None):
        InferenceServerException.__init__(self, msg, status, debug_details)
        ValueError.__init__(self, msg)


# how each protocol's tritonclient reports an invalid-argument answer in InferenceServerException.status()
CLIENT_ERROR_STATUSES = frozenset({"400", "StatusCode.INVALID_ARGUMENT"})


def is_client_error(exc: BaseException) -> bool:
    """Whether a tritonclient error is the server refusing the request as invalid (HTTP 400 / gRPC
    INVALID_ARGUMENT), as opposed to a failure of the server (500 / INTERNAL, ...)."""
    return isinstance(exc, InferenceServerException) and exc.status() in CLIENT_ERROR_STATUSES


class RecsysClient:
    """Sends raw rows to the Triton ensemble; the server applies the fitted workflow + model.

    ``shared_memory=True`` (a caller on the server's host): request tensors and the scores travel through
    Triton system shared memory regions the client registers on its first call and reuses
    (:mod:`pipeline_lib.serving.shared_memory`; BYTES tensors encoded by the vectorised encoder), instead
    of inside the gRPC/HTTP messages; same scores, same errors. ``close`` releases the regions."""

    def __init__(self, url: str, protocol: Protocol = "http", model_name: str = "recsys", timeout_s: float = 60.0,
                 shared_memory: bool = False):
        if protocol == "http":
            import tritonclient.http as tc

            self._client = tc.InferenceServerClient(url, connection_timeout=timeout_s, network_timeout=timeout_s)
        elif protocol == "grpc":
            import tritonclient.grpc as tc
        else:
            raise ValueError(f"protocol must be 'http' or 'grpc', got {protocol!r}")
        if protocol == "grpc":
            self._client = tc.InferenceServerClient(url)
        self._tc = tc
        self.protocol = protocol
        self.model_name = model_name
        self._inputs: dict[str, str] = None  # type: ignore[assignment]  # set by _metadata() before any use
        self._batch_dim = False  # the model batches requests (dynamic batching): inputs are [1, rows]
        self._outputs: list[str] = None  # type: ignore[assignment]  # set by _metadata() before any use
        self._output_shapes: dict[str, tuple[str, list[int]]] = {}  # name -> (datatype, metadata shape)
        self._shm = SharedMemoryTransport(self._client, tc) if shared_memory else None
        self._lock = threading.Lock()  # one call at a time through the shared-memory regions
        self._has_request_id = False
        # the served request id of this client's last answer (the key feedback names); None: the version has
        # no request_id output, or the call went through shared memory
        self.last_request_id: Optional[str] = None

    def _metadata(self) -> None:
        if self._inputs is not None:
            return
        md = self._client.get_model_metadata(self.model_name)
        if self.protocol == "grpc":
            inputs = [(i.name, i.datatype) for i in md.inputs]
            ranks = [len(i.shape) for i in md.inputs]
            outputs = [(o.name, o.datatype, list(o.shape)) for o in md.outputs]
        else:
            inputs = [(i["name"], i["datatype"]) for i in md["inputs"]]
            ranks = [len(i["shape"]) for i in md["inputs"]]
            outputs = [(o["name"], o["datatype"], list(o["shape"])) for o in md["outputs"]]
        # request_id (the impression log's key) is read apart from the scores: last_request_id
        self._has_request_id = any(o[0] == "request_id" for o in outputs)
        outputs = [o for o in outputs if o[0] != "request_id"]
        self._inputs, self._outputs = dict(inputs), [o[0] for o in outputs]
        self._output_shapes = {name: (dtype, shape) for name, dtype, shape in outputs}
        # with max_batch_size > 0 the metadata shows the batch dimension: [-1, -1]
        self._batch_dim = bool(ranks) and all(r == 2 for r in ranks)

    @property
    def raw_columns(self) -> list[str]:
        """The raw feature names the served model expects (list features without suffixes)."""
        self._metadata()
        names = []
        for n in self._inputs:
            if n in REQUEST_FIELDS:
                continue
            base = n.rsplit("__", 1)[0] if n.endswith(("__values", "__offsets")) else n
            if base not in names:
                names.append(base)
        return names

    def to_arrays(self, rows: Union[pd.DataFrame, Iterable[Mapping]], partial: bool = False) -> dict[str, np.ndarray]:
        """Raw rows -> the request tensors (list features as values/offsets, strings as bytes). ``partial``: send
        only the columns ``rows`` has (a user-id request: the served model looks the rest up)."""
        self._metadata()
        df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(list(rows))
        missing = [c for c in self.raw_columns if c not in df.columns and c not in OPTIONAL_FIELDS]
        if missing and not partial:
            raise RequestError(f"request is missing field(s) {missing}; the model expects {self.raw_columns}")
        arrays: dict[str, np.ndarray] = {}
        for name, dtype in self._inputs.items():
            if name.endswith("__values") or name.endswith("__offsets"):
                base = name.rsplit("__", 1)[0]
                if base not in df.columns and (base in OPTIONAL_FIELDS or partial):
                    continue
                values, offsets = _ragged(df[base], base)
                arr = values if name.endswith("__values") else offsets
            elif name in REQUEST_FIELDS or (partial and name not in df.columns):
                continue
            else:
                arr = df[name].to_numpy()
            arrays[name] = _cast(arr, dtype, name)
        return arrays

    def build_inputs(self, rows: Union[pd.DataFrame, Iterable[Mapping]]) -> list:
        return self.inputs_from_arrays(self.to_arrays(rows))

    def inputs_from_arrays(self, arrays: Mapping[str, np.ndarray]) -> list:
        """tritonclient inputs for the given tensors, typed by their numpy dtype (to_arrays casts to the
        server's types; a mismatch is left for the server to reject)."""
        self._metadata()
        # one request = one batch entry of the dynamic batcher
        shaped = {n: a.reshape(1, -1) if self._batch_dim and a.ndim == 1 else a for n, a in arrays.items()}
        if self._shm is not None:
            return self._shm.inputs(shaped, {n: np_to_triton_dtype(a.dtype) for n, a in shaped.items()})
        inputs = []
        for name, arr in shaped.items():
            inp = self._tc.InferInput(name, list(arr.shape), np_to_triton_dtype(arr.dtype))
            inp.set_data_from_numpy(arr)
            inputs.append(inp)
        return inputs

    def predict(self, rows: Union[pd.DataFrame, Iterable[Mapping]]) -> np.ndarray:
        """Scores (one per row) for raw feature rows."""
        return self.infer(rows)[0]

    def infer(self, rows: Union[pd.DataFrame, Iterable[Mapping]]) -> tuple[np.ndarray, str]:
        """Scores and the model version that produced them."""
        return self.infer_arrays(self.to_arrays(rows))

    def infer_arrays(self, arrays: Mapping[str, np.ndarray]) -> tuple[np.ndarray, str]:
        with self._lock:
            inputs = self.inputs_from_arrays(arrays)
            if self._shm is None:
                result = self._infer(inputs, self._outputs + (["request_id"] if self._has_request_id else []))
                scores = result.as_numpy(self._outputs[0])
                self.last_request_id = _request_id(result) if self._has_request_id else None
            else:
                rows = request_rows({n: np.asarray(a).reshape(-1) for n, a in arrays.items()})
                sizes = {n: output_bytes(*self._output_shapes[n], rows, self._batch_dim) for n in self._outputs}
                result = self._infer(inputs, self._shm.outputs(sizes))
                scores = self._shm.read(result, self._outputs[0])
        response = result.get_response()
        version = response["model_version"] if isinstance(response, dict) else response.model_version
        return np.asarray(scores).reshape(-1), str(version)

    def recommend(self, rows: Union[pd.DataFrame, Iterable[Mapping]], k: Optional[int] = None,
                  with_count: bool = False):
        """Top-k of a retrieval model: (item ids [rows, k], scores [rows, k]), best first; with ``with_count``
        also ``count`` [rows]: the valid items of each row (after it, ids are the sentinel -1 / "" and scores
        0.0: the exclusions left fewer than k items). ``k``: fewer items than the version's k (the ``k``
        input; a version exported before it existed refuses it)."""
        self._metadata()
        if "item_ids" not in self._outputs:
            raise RequestError(f"model '{self.model_name}' is not a top-k model (outputs {self._outputs})")
        inputs_arrays = self.to_arrays(rows)
        if k is not None:
            if "k" not in self._inputs:
                raise RequestError(f"model '{self.model_name}' takes no 'k' input (exported before per-request k)")
            inputs_arrays["k"] = np.array([k], dtype=np.int32)
        outputs = ["item_ids", "scores"] + (["count"] if "count" in self._outputs else [])
        with self._lock:
            result = self._infer(self.inputs_from_arrays(inputs_arrays),
                                 outputs + (["request_id"] if self._has_request_id else []))
            self.last_request_id = _request_id(result) if self._has_request_id else None
        ids = result.as_numpy("item_ids")
        if ids.dtype == object:
            ids = np.vectorize(lambda v: v.decode("utf-8") if isinstance(v, bytes) else v, otypes=[object])(ids)
        scores = result.as_numpy("scores")
        if not with_count:
            return ids, scores
        count = result.as_numpy("count") if "count" in outputs else np.full(len(ids), ids.shape[1], dtype=np.int32)
        return ids, scores, count

    def recommend_user(self, user_ids: Iterable, user_column: str, k: Optional[int] = None,
                       exclude: Optional[list] = None, context: Optional[Mapping[str, Iterable]] = None
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """Top-k by user id alone: the served model looks the user's features and recent items up in the
        feature store (docs/serving.md#user-id-requests). ``exclude``: per user, item ids never to return;
        ``context``: request columns to send instead of the stored ones. Returns (item ids, scores, count,
        cold_start): ``cold_start`` true where the store did not know the user (the cold-start answer)."""
        self._metadata()
        if "cold_start" not in self._outputs:
            raise RequestError(f"model '{self.model_name}' serves no user-id requests (no feature store snapshot "
                               f"in this version; features.enabled at export)")
        frame = pd.DataFrame({user_column: list(user_ids), **{c: list(v) for c, v in (context or {}).items()}})
        if exclude is not None:
            frame["exclude_item_ids"] = [list(e) for e in exclude]
        arrays = self.to_arrays(frame, partial=True)
        if k is not None:
            arrays["k"] = np.array([k], dtype=np.int32)
        with self._lock:
            result = self._infer(self.inputs_from_arrays(arrays), ["item_ids", "scores", "count", "cold_start"])
        ids = result.as_numpy("item_ids")
        if ids.dtype == object:
            ids = np.vectorize(lambda v: v.decode("utf-8") if isinstance(v, bytes) else v, otypes=[object])(ids)
        return ids, result.as_numpy("scores"), result.as_numpy("count"), result.as_numpy("cold_start").astype(bool)

    def predict_user(self, user_ids: Iterable, item_ids: Iterable, user_column: str, item_column: str,
                     context: Optional[Mapping[str, Iterable]] = None) -> tuple[np.ndarray, np.ndarray]:
        """Scores of a ranking version by ids alone: one (user, item) pair per row, or one user id for all the
        items (broadcast); the served model looks the user and item features up in the feature store
        (docs/serving.md, "Ranking by user id"). ``context``: request columns to send instead of the stored ones
        (one value per row, or one for all). Returns (scores [rows], cold_start [rows])."""
        self._metadata()
        if "cold_start" not in self._outputs:
            raise RequestError(f"model '{self.model_name}' serves no user-id requests (no feature store snapshot "
                               f"in this version; features.enabled at export)")
        arrays: dict[str, np.ndarray] = {}
        for col, values in {user_column: user_ids, item_column: item_ids, **(context or {})}.items():
            arrays.update(self.to_arrays(pd.DataFrame({col: list(values)}), partial=True))
        with self._lock:
            result = self._infer(self.inputs_from_arrays(arrays), [self._outputs[0], "cold_start"])
        return (np.asarray(result.as_numpy(self._outputs[0]), dtype=np.float64).reshape(-1),
                result.as_numpy("cold_start").astype(bool).reshape(-1))

    def _infer(self, inputs: list, outputs: list):
        """One inference call (``outputs``: names, or requested-output objects); a request the server
        refuses as invalid raises :class:`BadRequestError` (with the server's message and status), any
        other server error propagates unchanged."""
        outputs = [self._tc.InferRequestedOutput(o) if isinstance(o, str) else o for o in outputs]
        try:
            return self._client.infer(self.model_name, inputs, outputs=outputs)
        except InferenceServerException as exc:
            if is_client_error(exc):
                raise BadRequestError(exc.message(), exc.status(), exc.debug_details()) from exc
            raise

    @property
    def shared_memory_regions(self) -> dict[str, tuple[str, int]]:
        """The shared-memory regions this client has registered with the server: name -> (POSIX key,
        bytes); empty before the first call, after ``close`` and without ``shared_memory``."""
        regions = self._shm.regions.values() if self._shm is not None else []
        return {r.name: (r.key, r.size) for r in regions}

    def input_datatype(self, name: str) -> Optional[str]:
        """The served model's Triton datatype of input ``name`` (e.g. ``INT64``, ``BYTES``); None if it has none."""
        self._metadata()
        return self._inputs.get(name)

    @property
    def is_topk(self) -> bool:
        self._metadata()
        return "item_ids" in self._outputs

    def close(self) -> None:
        """Release the shared-memory regions (if any), then the connection."""
        try:
            if self._shm is not None:
                with self._lock:
                    self._shm.close()
        finally:
            self._client.close()

    def __enter__(self) -> "RecsysClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def _request_id(result) -> Optional[str]:
    value = result.as_numpy("request_id")
    if value is None or not value.size:
        return None
    v = value.reshape(-1)[0]
    return v.decode("utf-8") if isinstance(v, bytes) else str(v)


def _ragged(col: pd.Series, name: str) -> tuple[np.ndarray, np.ndarray]:
    values = col.tolist()
    types = set(map(type, values))
    if values and types <= {list, tuple, np.ndarray}:  # every row a list: one concatenation, no per-row Python
        lengths = np.fromiter(map(len, values), dtype=np.int64, count=len(values))
        flat = np.concatenate(values) if types == {np.ndarray} else np.array(list(itertools.chain.from_iterable(values)))
        return (flat if len(flat) else np.array([], dtype=np.int64)), np.concatenate([[0], np.cumsum(lengths)])
    lists = []
    for i, v in enumerate(values):
        if v is None or (isinstance(v, float) and np.isnan(v)):
            v = []
        if not isinstance(v, (list, tuple, np.ndarray)):
            raise RequestError(f"field '{name}' row {i}: expected a list, got {type(v).__name__} {v!r}")
        lists.append(np.asarray(v))
    lengths = np.array([len(v) for v in lists], dtype=np.int64)
    offsets = np.concatenate([[0], np.cumsum(lengths)])
    values = np.concatenate(lists) if lengths.sum() else np.array([], dtype=np.int64)
    return values, offsets


def _cast(arr: np.ndarray, triton_dtype: str, name: str) -> np.ndarray:
    target = _NP.get(triton_dtype)
    if target is None:
        raise RequestError(f"field '{name}': unsupported server datatype {triton_dtype}")
    if target is np.object_:
        arr = np.asarray(arr)
        items = arr.tolist() if arr.dtype == np.object_ else list(arr)  # numpy scalars keep their str()
        encoded = bytes_tensor.as_bytes(items)
        out = np.empty(len(encoded), dtype=np.object_)
        out[:] = encoded
        return out
    try:
        return np.asarray(arr).astype(target)
    except (TypeError, ValueError) as exc:
        raise RequestError(f"field '{name}': cannot cast values to {triton_dtype}: {exc}") from exc
