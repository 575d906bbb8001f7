"""The served session model: raw session so far in, top-k next item ids (raw) and scores out.

The ensemble is ``raw session lists >> fitted feature workflow >> SavedModel >> TopKItems``, all
in-process inside Triton's python backend, like the ranking ensemble (:mod:`pipeline_lib.export.ranking`,
whose ``InProcessWorkflow``/``InProcessTensorflow`` ops and ``model.py`` it reuses). ``TopKItems``
ranks the model's scores over the item vocabulary, drops Categorify's special indices (padding,
null, out-of-vocabulary) and decodes the indices to raw item ids with the vocabulary of the
*same* fitted workflow (saved as an artifact of the version, so versions stay self-contained).

Requests carry list columns (``item_id``, item features, ``timestamp``) as ``__values`` /
``__offsets``; the response holds ``item_ids`` and ``scores``, each ``[sessions, k]``.

Exclusion (``session.exclude_seen``, default on; the protocol of retrieval's ``exclude_seen``,
:mod:`pipeline_lib.export.topk`): ``TopKItems`` also reads the request's raw ``item_id`` list (the whole
session so far, not the truncated model input) and never returns those items; the optional
request input ``exclude_item_ids`` (a list of raw item ids per session, the item id's type) adds
more, with or without ``exclude_seen``. Unknown ids are ignored; a session left with fewer than
k items gets excluded ones last, at score -inf (:func:`pipeline_lib.models.session.top_k`).
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pandas as pd

from merlin.systems.dag.ops.tensorflow import PredictTensorflow  # noqa: F401  sets protobuf impl; import first
from merlin.dag import BaseOperator, ColumnSelector
from merlin.schema import ColumnSchema, Schema

from pipeline_lib.export import ranking as ranking_export
from pipeline_lib.export.parity import check_parity
from pipeline_lib.models.session import exclusions, N_SPECIAL, offline_scores, top_k, vocabulary_lookup
from pipeline_lib.export.topk import EXCLUDE_INPUT  # the same optional request input as retrieval's
from pipeline_lib.etl.sessions import item_vocabulary

ITEM_IDS, SCORES = "item_ids", "scores"
VOCAB_FILE = "item_vocabulary.parquet"


class TopKItems(BaseOperator):
    """Model scores [n, vocabulary] (+ the request's raw item id lists) -> the k best raw item ids and
    their scores, without the session's own items (``exclude_seen``) and the request's ``exclude_item_ids``."""

    def __init__(self, k: int, vocabulary: np.ndarray | None = None, score_column: str | None = None,
                 item_column: str | None = None, exclude_seen: bool = False):
        super().__init__()
        self.k = int(k)
        self.vocabulary = vocabulary
        self.score_column = score_column
        self.item_column, self.exclude_seen = item_column, bool(exclude_seen)
        self.id_dtype = _id_dtype(vocabulary) if vocabulary is not None else "int64"
        self._lookup = None

    def __getstate__(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if k not in ("vocabulary", "_lookup")}

    def save_artifacts(self, artifact_path: str) -> None:
        pd.DataFrame({"raw_id": pd.Series(self.vocabulary, dtype=object).map(lambda v: None if v is None else str(v))}
                     ).to_parquet(os.path.join(artifact_path, VOCAB_FILE))

    def load_artifacts(self, artifact_path: str) -> None:
        if not artifact_path:
            return
        raw = pd.read_parquet(os.path.join(artifact_path, VOCAB_FILE))["raw_id"].to_numpy(dtype=object)
        if self.id_dtype == "int64":
            raw = np.array([None if v is None else int(v) for v in raw], dtype=object)
        self.vocabulary, self._lookup = raw, None

    def compute_output_schema(self, input_schema, col_selector, prev_output_schema=None) -> Schema:
        return Schema([
            # string ids: 'object' (bytes objects), which Triton sends as BYTES; a 'str' schema would be
            # cast to a numpy unicode array, which the python backend cannot send
            ColumnSchema(ITEM_IDS, dtype="int64" if self.id_dtype == "int64" else "object", dims=(None, self.k)),
            ColumnSchema(SCORES, dtype="float32", dims=(None, self.k)),
        ])

    def excluded(self, transformable, rows: int) -> list[np.ndarray] | None:
        """Per row, the encoded items not to return (the raw lists of the request, see module docstring)."""
        if getattr(self, "_lookup", None) is None:
            self._lookup = vocabulary_lookup(self.vocabulary)
        cols = set(transformable.columns)
        seen = _lists(transformable[self.item_column]) if self.exclude_seen and self.item_column in cols else None
        extra = _lists(transformable[EXCLUDE_INPUT]) if EXCLUDE_INPUT in cols else None
        return exclusions(self._lookup, seen, extra, rows)

    def transform(self, col_selector: ColumnSelector, transformable):
        name = self.score_column or next(iter(transformable.columns))
        col = transformable[name]
        scores = np.asarray(col.values if hasattr(col, "values") else col)
        idx, best = top_k(scores, self.k, self.excluded(transformable, len(scores)))
        ids = decode(self.vocabulary, idx, self.id_dtype)
        if ids.dtype == object:  # Triton's python backend sends BYTES from an object array of bytes
            ids = np.vectorize(lambda v: v.encode("utf-8"), otypes=[object])(ids)
        return type(transformable)({ITEM_IDS: ids, SCORES: best.astype(np.float32)})


def _lists(col) -> list[np.ndarray]:
    """A ragged column of a TensorTable -> one numpy array per row."""
    values, offsets = np.asarray(col.values), np.asarray(col.offsets, dtype=np.int64)
    return [values[offsets[i]:offsets[i + 1]] for i in range(len(offsets) - 1)]


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


def build_session_ensemble(workflow, model_dir: Path, item_col: str, k: int, fast_sample: pd.DataFrame | None = None,
                           exclude_seen: bool = True):
    """``raw session lists >> workflow >> model``, then ``TopKItems`` on the scores plus the raw item id
    list and the optional ``exclude_item_ids`` list. With ``fast_sample`` (raw sessions) the workflow
    op's compiled transform is verified on them (plus edge rows) and enabled if identical."""
    from merlin.systems.dag import Ensemble


    tf_op = ranking_export.InProcessTensorflow(model_dir)
    score_col = tf_op.output_schema.column_names[0]
    wf_op = ranking_export.InProcessWorkflow(workflow)
    if fast_sample is not None:
        wf_op.enable_fast_path(fast_sample)
    scores = workflow.input_schema.column_names >> wf_op >> tf_op
    graph = (scores + [item_col, EXCLUDE_INPUT]) >> TopKItems(k, item_vocabulary(workflow, item_col), score_col,
                                                                item_col, exclude_seen)
    item = workflow.input_schema[item_col]
    extra = ColumnSchema(EXCLUDE_INPUT, dtype=item.dtype, is_list=True, is_ragged=True)
    return Ensemble(graph, workflow.input_schema + Schema([extra]))


def with_exclude_column(raw: pd.DataFrame) -> pd.DataFrame:
    """The request frame with an ``exclude_item_ids`` column (empty lists where the request has none)."""
    if EXCLUDE_INPUT in raw.columns:
        return raw
    return raw.assign(**{EXCLUDE_INPUT: [[] for _ in range(len(raw))]})


def offline_topk(workflow, model_dir: Path, raw: pd.DataFrame, item_col: str, k: int,
                 exclude_seen: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """The training-time path: workflow.transform + Merlin Loader + SavedModel, then the same ranking
    and the same exclusions (the session's raw item ids, the rows' ``exclude_item_ids``)."""

    vocab = item_vocabulary(workflow, item_col)
    seen = raw[item_col].tolist() if exclude_seen else None
    extra = raw[EXCLUDE_INPUT].tolist() if EXCLUDE_INPUT in raw.columns else None
    excl = exclusions(vocabulary_lookup(vocab), seen, extra, len(raw))
    feats = raw.drop(columns=[EXCLUDE_INPUT], errors="ignore")
    idx, best = top_k(offline_scores(workflow, model_dir, feats), k, excl)
    return decode(vocab, idx, _id_dtype(vocab)), best


def ensemble_topk(ensemble, raw: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
    """Run the ensemble in-process on raw sessions, as the served executor model does."""
    from merlin.dag.runtime import Runtime

    names = ensemble.input_schema.column_names
    if EXCLUDE_INPUT in names:  # optional on the wire: the served model fills it with empty lists
        raw = with_exclude_column(raw)
    table = ranking_export.raw_to_tensor_table(raw[names])
    out = ensemble.transform(table, runtime=Runtime())
    ids = np.asarray(out[ITEM_IDS].values)
    if ids.dtype == object:  # string ids leave the ensemble as bytes (see TopKItems)
        ids = np.vectorize(lambda v: v.decode("utf-8") if isinstance(v, bytes) else v, otypes=[object])(ids)
    return ids, np.asarray(out[SCORES].values)


def export_session_ensemble(workflow_dir: Path, model_dir: Path, sample_raw: pd.DataFrame, item_col: str, k: int,
                            staging_dir: Path, model_name: str,
                            options: ranking_export.ExportOptions | None = None) -> ranking_export.ExportOutput:
    """Parity in-process (ids equal, scores within ``options.atol``) on ``sample_raw`` and on the same sessions
    with ``exclude_item_ids`` (their first 3 offline items), export as ``staging_dir/<model_name>/1``
    (``exclude_item_ids`` an optional input), load the exported copy back and check again."""
    import nvtabular as nvt

    o, version = options or ranking_export.ExportOptions(), 1
    workflow = nvt.Workflow.load(str(workflow_dir))
    ensemble = build_session_ensemble(workflow, model_dir, item_col, k,
                                      fast_sample=sample_raw if o.fast_transform else None, exclude_seen=o.exclude_seen)
    want = offline_topk(workflow, model_dir, sample_raw, item_col, k, o.exclude_seen)
    more = sample_raw.assign(**{EXCLUDE_INPUT: [list(r[:3]) for r in want[0].tolist()]})
    want_more = offline_topk(workflow, model_dir, more, item_col, k, o.exclude_seen)
    diffs = [check_parity("in-process ensemble", ensemble_topk(ensemble, sample_raw), want, o.atol),
             check_parity("in-process ensemble (exclude_item_ids)", ensemble_topk(ensemble, more), want_more, o.atol)]
    ranking_export.export_as_version(ensemble, staging_dir, model_name, version)
    ranking_export.install_serving_model(staging_dir / model_name, version, o.max_request_rows)
    _optional_inputs(staging_dir / model_name / "config.pbtxt", EXCLUDE_INPUT)
    exported = ranking_export.load_version(staging_dir / model_name / str(version))
    diffs += [check_parity("exported ensemble", ensemble_topk(exported, sample_raw), want, o.atol),
              check_parity("exported ensemble (exclude_item_ids)", ensemble_topk(exported, more), want_more, o.atol)]
    fast = ranking_export.fast_transform_status(ensemble)
    out = ranking_export.ExportOutput(staging_dir, model_name, version, ITEM_IDS, max(diffs), fast_transform=fast)
    (out.version_dir / "run_info.json").write_text(
        json.dumps({**(o.run_info or {}), "task": "session", "top_k": k, "exclude_seen": bool(o.exclude_seen),
                    "parity_max_abs_diff": out.parity_max_abs_diff, "fast_transform": fast}, indent=2, default=str))
    return out


def _optional_inputs(config_path: Path, column: str) -> None:
    """Mark a list input (``<column>__values`` / ``__offsets``) optional in config.pbtxt: a request may
    leave it out (the served model then fills it with empty lists)."""
    import tritonclient.grpc.model_config_pb2 as mc
    from google.protobuf import text_format

    cfg = text_format.Parse(config_path.read_text(), mc.ModelConfig())
    for inp in cfg.input:
        if inp.name in (f"{column}__values", f"{column}__offsets"):
            inp.optional = True
    config_path.write_text(text_format.MessageToString(cfg))

