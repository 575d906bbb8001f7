"""The served session model: raw session so far in, top-k next item ids (raw) and scores out.

A session version is a top-k version like retrieval's (:mod:`pipeline_lib.export.topk`: the same
served ``model.py``, config.pbtxt writer, exclusion, masked top-k and id decoding); only the query
side differs -- the session model's scores over its item vocabulary. ``<N>/topk/`` holds:

    spec.json       kind ``session``, k, the item column, ``exclude_seen``, request columns, fast-path status
    workflow/       the run's fitted feature workflow (the same one training used)
    model/          the session model's SavedModel
    items.npz       ``ids``: the raw item ids of the vocabulary (Categorify's padding / null / OOV slots
                    dropped); ``positions``: their encoded index, i.e. their column in the model's scores

Requests carry list columns (``item_id``, item features, ``timestamp``) as ``__values`` /
``__offsets``; the response holds ``item_ids`` and ``scores``, each ``[sessions, k]``. Per request
the fitted workflow runs as the compiled numpy transform (:mod:`pipeline_lib.etl.fast_transform`,
verified at export against ``Workflow.transform``), NVTabular when the request is outside it.

Exclusion (``session.exclude_seen``, default on; the protocol of retrieval's ``exclude_seen``): the
request's raw ``item_id`` list (the whole session so far, not the truncated model input) is never
returned; the optional request input ``exclude_item_ids`` (a list of raw item ids per session, the
item id's type) adds more, with or without ``exclude_seen``. Unknown ids are ignored; a session left
with fewer than k items gets excluded ones last, at score -inf.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from pipeline_lib.etl.fast_transform import Unsupported, compile_workflow, tensors_from_columns
from pipeline_lib.etl.sessions import item_vocabulary
from pipeline_lib.export.staging import ExportOptions, StagedVersion
from pipeline_lib.export.topk import (EXCLUDE_INPUT, ITEMS_FILE, TopKExport, TopKRoute, check_version,
                                      fresh_artifact_dir, ragged_rows, request_inputs, stage_version)
from pipeline_lib.models import retrieval
from pipeline_lib.models.common import call_signature, load_encoder, signature_encoder
from pipeline_lib.models.session import N_SPECIAL, offline_scores, raw_to_transformed

log = logging.getLogger(__name__)

MODEL_DIR = "model"


class SessionRecommender(TopKRoute):
    """Raw sessions so far -> the k best next items (raw ids) and their scores (served path; also in-process)."""

    kind = "session"

    def __init__(self, artifact_dir: Path):
        import nvtabular as nvt

        super().__init__(artifact_dir)
        self.item_column: str = self.meta["item_column"]
        self.exclude_seen = bool(self.meta["exclude_seen"])
        self.positions = np.load(self.dir / ITEMS_FILE, allow_pickle=True)["positions"].astype(np.int64)
        self.workflow = nvt.Workflow.load(str(self.dir / "workflow"))
        self.workflow_inputs = list(self.workflow.input_schema.column_names)
        self.model = load_encoder(self.dir / MODEL_DIR)
        self.enable_fast()

    def compile_fast(self):
        try:
            return compile_workflow(self.workflow)
        except Unsupported as exc:
            log.warning("session fast transform not compiled, NVTabular runs per request: %s", exc)
            return None

    def rank(self, scores: np.ndarray, sessions: Optional[list], extra: Optional[list]
             ) -> tuple[np.ndarray, np.ndarray]:
        """Model scores [rows, vocabulary] -> the k best raw item ids and scores, without the sessions' own
        items (``exclude_seen``; ``sessions``: raw item id lists) and the rows' ``exclude_item_ids``."""
        seen = [self.catalogue_rows(s) for s in sessions] if self.exclude_seen else None  # type: ignore[union-attr]
        excl = self.exclude_rows(seen, extra, len(scores))
        idx, best = retrieval.top_k_scores(scores[:, self.positions], self.k, excl)
        return self.item_ids[idx], best

    def recommend_columns(self, cols: dict) -> tuple[np.ndarray, np.ndarray]:
        if self.fast is None:
            raise Unsupported("the compiled transform is not enabled for this version")
        transformed = self.fast({c: cols[c] for c in self.workflow_inputs})
        scores = call_signature(self.model, tensors_from_columns(transformed))
        return self.rank(scores, ragged_rows(cols[self.item_column]), self.extra_of_columns(cols))

    def recommend(self, raw: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        scores = retrieval.encode(self.model, raw_to_transformed(self.workflow, raw[self.workflow_inputs]))
        return self.rank(scores, raw[self.item_column].tolist(), self.extra_of(raw))

    def offline(self, raw: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """The training-time path: workflow.transform + Merlin Loader + SavedModel signature, then the same top-k."""
        scores = offline_scores(self.workflow, self.dir / MODEL_DIR, raw[self.workflow_inputs],
                                model=signature_encoder(self.model))
        return self.rank(scores, raw[self.item_column].tolist(), self.extra_of(raw))


def catalogue(vocabulary: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(raw item ids, their encoded index) of a Categorify vocabulary, special slots dropped; ids as int64
    when every id is an integer, else as strings."""
    positions = np.array([i for i in range(N_SPECIAL, len(vocabulary)) if vocabulary[i] is not None], dtype=np.int64)
    raw = vocabulary[positions]
    if all(isinstance(v, (int, np.integer)) for v in raw):
        return raw.astype(np.int64), positions
    return np.array([str(v) for v in raw], dtype=object), positions


def export_session_topk(workflow_dir: Path, model_dir: Path, sample_raw: pd.DataFrame, item_col: str, k: int,
                        staging_dir: Path, model_name: str, options: Optional[ExportOptions] = None) -> TopKExport:
    """Write a session top-k version into ``staging_dir/<model_name>/1`` and check it: its in-process top-k
    equals the offline path (ids exactly, scores within ``options.atol``) on ``sample_raw`` and on the same
    sessions with ``exclude_item_ids`` (their first 3 offline items); the compiled transform is verified."""
    import nvtabular as nvt

    o = options or ExportOptions()
    art = fresh_artifact_dir(staging_dir / model_name / "1")
    workflow = nvt.Workflow.load(str(workflow_dir))
    workflow.save(str(art / "workflow"))
    shutil.copytree(model_dir, art / MODEL_DIR)
    ids, positions = catalogue(item_vocabulary(workflow, item_col))
    np.savez(art / ITEMS_FILE, ids=ids, positions=positions)
    columns = list(workflow.input_schema.column_names)
    meta = {"kind": SessionRecommender.kind, "k": k, "item_column": item_col, "exclude_seen": bool(o.exclude_seen),
            "request_columns": columns, "n_items": int(len(ids)), "item_id_dtype": str(ids.dtype)}
    (art / "spec.json").write_text(json.dumps(meta, indent=2))
    rec = SessionRecommender(art)
    sample = sample_raw[columns].reset_index(drop=True)
    reference = rec.offline(sample)  # computed once: it also picks the exclude_item_ids of the second sample
    more = sample.assign(**{EXCLUDE_INPUT: [list(r[:3]) for r in reference[0].tolist()]})
    diff, meta["fast_transform"] = check_version(rec, [sample, more], [sample], o.atol, o.fast_transform,
                                                 offline={0: reference})
    inputs = request_inputs(workflow.input_schema, columns, item_col)
    return stage_version(rec, meta, inputs, StagedVersion(staging_dir, model_name, 1), o,
                         {"max_abs_score_diff": diff, "rows": len(sample)})
