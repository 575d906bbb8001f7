"""The served session model: raw session so far in, top-k next item ids (raw) and scores out.

The ensemble is ``raw session lists >> fitted feature workflow >> SavedModel >> TopKItems``, all
in-process inside Triton's python backend, like the ranking ensemble (:mod:`pipeline_lib.export`,
whose ``InProcessWorkflow``/``InProcessTensorflow`` ops and ``model.py`` it reuses). ``TopKItems``
ranks the model's scores over the item vocabulary, drops Categorify's special indices (padding,
null, out-of-vocabulary) and decodes the indices to raw item ids with the vocabulary of the
*same* fitted workflow (saved as an artifact of the version, so versions stay self-contained).

Requests carry list columns (``item_id``, item features, ``timestamp``) as ``__values`` /
``__offsets``; the response holds ``item_ids`` and ``scores``, each ``[sessions, k]``.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from merlin.systems.dag.ops.tensorflow import PredictTensorflow  # noqa: F401  sets protobuf impl; import first
from merlin.dag import BaseOperator, ColumnSelector
from merlin.schema import ColumnSchema, Schema

from pipeline_lib import export as ranking_export
from pipeline_lib.session_model import N_SPECIAL, offline_scores, top_k

ITEM_IDS, SCORES = "item_ids", "scores"
VOCAB_FILE = "item_vocabulary.parquet"


class TopKItems(BaseOperator):
    """Model scores [n, vocabulary] -> the k best raw item ids and their scores."""

    def __init__(self, k: int, vocabulary: np.ndarray | None = None, score_column: str | None = None):
        super().__init__()
        self.k = int(k)
        self.vocabulary = vocabulary
        self.score_column = score_column
        self.id_dtype = _id_dtype(vocabulary) if vocabulary is not None else "int64"

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k != "vocabulary"}

    def save_artifacts(self, artifact_path: str) -> None:
        pd.DataFrame({"raw_id": pd.Series(self.vocabulary, dtype=object).map(lambda v: None if v is None else str(v))}
                     ).to_parquet(os.path.join(artifact_path, VOCAB_FILE))

    def load_artifacts(self, artifact_path: str) -> None:
        if not artifact_path:
            return
        raw = pd.read_parquet(os.path.join(artifact_path, VOCAB_FILE))["raw_id"].to_numpy(dtype=object)
        if self.id_dtype == "int64":
            raw = np.array([None if v is None else int(v) for v in raw], dtype=object)
        self.vocabulary = raw

    def compute_output_schema(self, input_schema, col_selector, prev_output_schema=None) -> Schema:
        return Schema([
            # string ids: 'object' (bytes objects), which Triton sends as BYTES; a 'str' schema would be
            # cast to a numpy unicode array, which the python backend cannot send
            ColumnSchema(ITEM_IDS, dtype="int64" if self.id_dtype == "int64" else "object", dims=(None, self.k)),
            ColumnSchema(SCORES, dtype="float32", dims=(None, self.k)),
        ])

    def transform(self, col_selector: ColumnSelector, transformable):
        name = self.score_column or next(iter(transformable.columns))
        col = transformable[name]
        scores = np.asarray(col.values if hasattr(col, "values") else col)
        idx, best = top_k(scores, self.k)
        ids = decode(self.vocabulary, idx, self.id_dtype)
        if ids.dtype == object:  # Triton's python backend sends BYTES from an object array of bytes
            ids = np.vectorize(lambda v: v.encode("utf-8"), otypes=[object])(ids)
        return type(transformable)({ITEM_IDS: ids, SCORES: best.astype(np.float32)})


def _id_dtype(vocabulary: np.ndarray) -> str:
    vals = [v for v in vocabulary[N_SPECIAL:] if v is not None]
    return "int64" if all(isinstance(v, (int, np.integer)) for v in vals) else "str"


def decode(vocabulary: np.ndarray, idx: np.ndarray, id_dtype: str = "int64") -> np.ndarray:
    """Encoded item indices -> raw ids (an index outside the vocabulary or special: -1 / '')."""
    vocab = np.asarray(vocabulary, dtype=object)
    safe = np.clip(idx, 0, len(vocab) - 1)
    raw = vocab[safe]
    missing = (idx >= len(vocab)) | np.array([v is None for v in raw.ravel()]).reshape(raw.shape)
    if id_dtype == "int64":
        return np.where(missing, -1, raw).astype(np.int64)
    return np.where(missing, "", raw).astype(str).astype(object)


def build_session_ensemble(workflow, model_dir: Path, item_col: str, k: int, fast_sample: pd.DataFrame | None = None):
    """``raw session lists >> workflow >> model >> TopKItems``. With ``fast_sample`` (raw sessions) the
    workflow op's compiled transform is verified on them (plus edge rows) and enabled if identical."""
    from merlin.systems.dag import Ensemble

    from pipeline_lib.sessions import item_vocabulary

    tf_op = ranking_export.InProcessTensorflow(model_dir)
    score_col = tf_op.output_schema.column_names[0]
    wf_op = ranking_export.InProcessWorkflow(workflow)
    if fast_sample is not None:
        wf_op.enable_fast_path(fast_sample)
    graph = (workflow.input_schema.column_names >> wf_op >> tf_op
             >> TopKItems(k, item_vocabulary(workflow, item_col), score_col))
    return Ensemble(graph, workflow.input_schema)


def offline_topk(workflow, model_dir: Path, raw: pd.DataFrame, item_col: str, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The training-time path: workflow.transform + Merlin Loader + SavedModel, then the same ranking."""
    from pipeline_lib.sessions import item_vocabulary

    vocab = item_vocabulary(workflow, item_col)
    idx, best = top_k(offline_scores(workflow, model_dir, raw), k)
    return decode(vocab, idx, _id_dtype(vocab)), best


def ensemble_topk(ensemble, raw: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Run the ensemble in-process on raw sessions, as the served executor model does."""
    from merlin.dag.runtime import Runtime

    table = ranking_export.raw_to_tensor_table(raw[ensemble.input_schema.column_names])
    out = ensemble.transform(table, runtime=Runtime())
    ids = np.asarray(out[ITEM_IDS].values)
    if ids.dtype == object:  # string ids leave the ensemble as bytes (see TopKItems)
        ids = np.vectorize(lambda v: v.decode("utf-8") if isinstance(v, bytes) else v, otypes=[object])(ids)
    return ids, np.asarray(out[SCORES].values)


def _check(name: str, got, want, atol: float) -> float:
    ids, scores = got
    want_ids, want_scores = want
    if ids.shape != want_ids.shape or not np.array_equal(ids, want_ids):
        bad = int(np.sum(np.any(ids != want_ids, axis=1))) if ids.shape == want_ids.shape else len(ids)
        raise ranking_export.ParityError(f"{name}: top-k item ids differ from offline in {bad} session(s)")
    diff = float(np.max(np.abs(scores - want_scores))) if scores.size else 0.0
    if not diff <= atol:
        raise ranking_export.ParityError(f"{name}: max |score - offline| = {diff:.3g} > {atol}")
    return diff


def export_session_ensemble(workflow_dir: Path, model_dir: Path, sample_raw: pd.DataFrame, item_col: str, k: int,
                            staging_dir: Path, model_name: str, version: int = 1, atol: float = 1e-5,
                            run_info: dict | None = None, max_request_rows: int = 65536,
                            fast_transform: bool = True) -> ranking_export.ExportOutput:
    """Parity in-process (ids equal, scores within ``atol``), export as ``staging_dir/<model_name>/<version>``,
    load the exported copy back and check again."""
    import nvtabular as nvt

    workflow = nvt.Workflow.load(str(workflow_dir))
    ensemble = build_session_ensemble(workflow, model_dir, item_col, k,
                                      fast_sample=sample_raw if fast_transform else None)
    want = offline_topk(workflow, model_dir, sample_raw, item_col, k)
    diff_inproc = _check("in-process ensemble", ensemble_topk(ensemble, sample_raw), want, atol)
    ranking_export.export_as_version(ensemble, staging_dir, model_name, version)
    ranking_export._install_serving_model(staging_dir / model_name, version, max_request_rows)
    exported = ranking_export.load_version(staging_dir / model_name / str(version))
    diff_exported = _check("exported ensemble", ensemble_topk(exported, sample_raw), want, atol)
    fast = ranking_export._workflow_op(ensemble).fast_status or {"enabled": False, "reason": "export.fast_transform is off"}
    out = ranking_export.ExportOutput(staging_dir, model_name, version, ITEM_IDS, max(diff_inproc, diff_exported),
                                      fast_transform=fast)
    (out.version_dir / "run_info.json").write_text(
        json.dumps({**(run_info or {}), "task": "session", "top_k": k, "parity_max_abs_diff": out.parity_max_abs_diff,
                    "fast_transform": fast}, indent=2, default=str))
    return out


# --- served smoke test and promotion gate ----------------------------------------------------------


@dataclass
class SessionSmokeResult:
    n_sessions: int
    max_abs_diff_http: float
    max_abs_diff_grpc: float
    offline_ids: list
    http_ids: list
    grpc_ids: list

    @property
    def max_abs_diff(self) -> float:
        return max(self.max_abs_diff_http, self.max_abs_diff_grpc)

    def table(self, rows: pd.DataFrame) -> pd.DataFrame:
        out = rows.reset_index(drop=True).copy()
        out["served_http"], out["served_grpc"], out["offline"] = self.http_ids, self.grpc_ids, self.offline_ids
        return out


def session_smoke_test(repository: Path, model_name: str, rows: pd.DataFrame, offline: tuple[np.ndarray, np.ndarray],
                       atol: float, out_dir: Path, startup_timeout_s: float = 180.0) -> SessionSmokeResult:
    """Serve ``repository`` on free ports; served top-k ids must equal offline ids (scores within atol)
    over HTTP and gRPC."""
    from pipeline_lib.smoke import ServingMismatch, serve_and_ask

    http, grpc = serve_and_ask(repository, model_name, out_dir, startup_timeout_s, lambda c: c.recommend(rows))
    served = {"http": http, "grpc": grpc}
    want_ids, want_scores = offline
    diffs, problems = {}, []
    for proto, (ids, scores) in served.items():
        if ids.shape != want_ids.shape or not np.array_equal(ids, want_ids):
            problems.append(f"{proto}: served top-k item ids differ from offline")
        diffs[proto] = float(np.max(np.abs(scores - want_scores))) if scores.shape == want_scores.shape else float("inf")
        if not diffs[proto] <= atol:
            problems.append(f"{proto}: max |served score - offline| = {diffs[proto]:.3g} > {atol}")
    res = SessionSmokeResult(len(rows), diffs["http"], diffs["grpc"], want_ids.tolist(),
                             served["http"][0].tolist(), served["grpc"][0].tolist())
    (out_dir / "smoke.json").write_text(json.dumps({**res.__dict__, "max_abs_diff": res.max_abs_diff,
                                                    "ids_equal": not problems}, indent=2, default=str))
    if problems:
        raise ServingMismatch("; ".join(problems))
    return res


def metrics_from_topk(ids: np.ndarray, scores: np.ndarray, targets: np.ndarray, k: int) -> dict:
    """Recall/NDCG/MRR@k of served top-k lists against raw target ids, with Merlin's metrics: the k
    served items plus one 'everything else' column (where a missed target goes) form the score rows."""
    from pipeline_lib.session_model import topk_metrics

    n = len(ids)
    hit = ids == np.asarray(targets).reshape(-1, 1)
    rank = np.where(hit.any(axis=1), hit.argmax(axis=1), k)
    s = np.concatenate([np.tile(np.arange(k, 0, -1, dtype=np.float32), (n, 1)), np.zeros((n, 1), np.float32)], axis=1)
    return topk_metrics(s, rank, k, mask_special=False)


def score_version(version_dir: Path, sessions: pd.DataFrame, cols, k: int, batch: int = 2048) -> dict:
    """A published/staged version's metrics on raw held-out sessions (prefix in, last item as target)."""
    from pipeline_lib.sessions import prefixes

    ens = ranking_export.load_version(version_dir)
    req, targets = prefixes(sessions, cols)
    missing = [c for c in ens.input_schema.column_names if c not in req.columns]
    if missing:
        raise KeyError(f"version {Path(version_dir).name} needs column(s) {missing}: not a session model for this data")
    parts = [ensemble_topk(ens, req.iloc[i:i + batch]) for i in range(0, len(req), batch)]
    ids = np.concatenate([p[0] for p in parts])
    if ids.shape[1] < k:
        raise ValueError(f"version {Path(version_dir).name} returns {ids.shape[1]} items, fewer than top_k={k}")
    ids = ids[:, :k]
    targets = np.asarray(targets).astype(ids.dtype) if ids.dtype != object else np.asarray(targets).astype(str)
    return metrics_from_topk(ids, None, targets, k)


def decide(candidate_dir: Path, served_dir: Path | None, served_version: int | None, sessions: pd.DataFrame, cols,
           k: int, metric: str, tolerance: float):
    """Promotion gate on held-out sessions, both versions through their own ensembles."""
    from pipeline_lib.gate import GateDecision

    key = f"{metric}@{k}"
    cand = score_version(candidate_dir, sessions, cols, k)[key]
    base = dict(metric=key, candidate=cand, served_version=served_version, tolerance=tolerance, n_rows=len(sessions))
    if served_dir is None:
        return GateDecision(promote=True, served=None, reason="nothing served yet: first version promotes", **base)
    try:
        served = score_version(served_dir, sessions, cols, k)[key]
    except Exception as exc:  # e.g. the served version is a ranking model
        return GateDecision(promote=True, served=None,
                            reason=f"served version {served_version} cannot score these sessions ({exc}); promoting", **base)
    ok = cand >= served - tolerance
    word = "not worse than" if ok else "worse than"
    return GateDecision(promote=ok, served=served, reason=f"candidate {key} {cand:.5f} is {word} served "
                        f"v{served_version} {served:.5f} (tolerance {tolerance})", **base)
