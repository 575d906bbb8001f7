"""The served classical session model (``session_knn``, ``sequential_rules``): the session's raw item
ids in, top-k next item ids (raw) and scores out, scored in numpy.

A top-k version like the deep session model's (:mod:`pipeline_lib.export.session`: the same served
``model.py``, config.pbtxt writer, exclusion, masked top-k and id decoding), without a feature
workflow or TensorFlow. ``<N>/topk/`` holds:

    spec.json   kind ``session_classical``, k, the item column, ``exclude_seen``, ``request_columns``
                (the item column alone), the model type
    model/      the fitted model (:mod:`pipeline_lib.models.session_classical`: ``items.npz``,
                ``matrix.npz`` -- a scipy sparse matrix --, ``spec.json``)
    items.npz   ``ids``: the catalogue's raw item ids, most popular in training first (the model's columns)

The request is the session so far as one list column, the item ids (``item_id__values`` /
``item_id__offsets`` on the wire, the item id's type); the deep session model's other columns
(item features, timestamps) are not inputs of this model -- the session client sends only the
inputs a model declares. The optional ``exclude_item_ids`` list works as for every top-k version.

Scores: the model's similarity (``session_knn``) or rule weight (``sequential_rules``) sums, float32;
ties, e.g. every item the session reaches no rule or neighbour for (score 0), go to the more popular
item, so a session of unseen ids only gets the most popular items. Exclusion
(``session.exclude_seen``): the session's own items and the request's ``exclude_item_ids`` are never
returned, unknown ids ignored; only a catalogue with fewer than k other items pads a row with excluded
items, last, at score -inf (the convention of every top-k version).
"""
from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Optional

import numpy as np
import pandas as pd

from pipeline_lib.export.staging import ExportOptions, StagedVersion
from pipeline_lib.export.session import SessionRecommender
from pipeline_lib.export.topk import (EXCLUDE_INPUT, ITEMS_FILE, TOPK_DIR, RequestInput, TopKExport, TopKRoute,
                                      check_version, fresh_artifact_dir, stage_version)
from pipeline_lib.models.session_classical import ClassicalSessionModel, session_exclusions

MODEL_DIR = "model"
NO_WORKFLOW = {"enabled": False, "reason": "classical session model: no feature workflow (numpy on raw item ids)"}


class ClassicalSessionRecommender(TopKRoute):
    """Raw session item ids -> the k best next items (raw ids) and scores (served path; also in-process)."""

    kind = "session_classical"

    def __init__(self, artifact_dir: Path):
        super().__init__(artifact_dir)
        self.item_column: str = self.meta["item_column"]
        self.exclude_seen = bool(self.meta["exclude_seen"])
        self.model = ClassicalSessionModel.load(self.dir / MODEL_DIR)
        self.fast_status = NO_WORKFLOW

    def compile_fast(self):
        return None  # nothing to compile: requests are scored from the raw ids

    def recommend(self, raw: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """The served path (request tensors -> frame in :meth:`TopKRoute.recommend_tensors`)."""
        sessions = raw[self.item_column].tolist()
        seen = [self.catalogue_rows(s) for s in sessions] if self.exclude_seen else None
        idx, best = self.model.top_k(sessions, self.k, self.exclude_rows(seen, self.extra_of(raw), len(raw)))
        return self.item_ids[idx], best

    def offline(self, raw: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """The evaluation path (:func:`pipeline_lib.models.session_classical.topk_metrics_of`'s exclusions) plus
        the request's ``exclude_item_ids``."""
        sessions = raw[self.item_column].tolist()
        excl = session_exclusions(self.model, sessions, self.exclude_seen)
        extra = self.extra_of(raw)
        if extra is not None:
            more = [self.model.rows_of(e) for e in extra]
            excl = more if excl is None else [np.union1d(a, b).astype(np.int64) for a, b in zip(excl, more)]
        idx, best = self.model.top_k(sessions, self.k, excl)
        return self.model.item_ids[idx], best


RECOMMENDERS = {cls.kind: cls for cls in (SessionRecommender, ClassicalSessionRecommender)}


def recommender_class(model_type: str) -> type[TopKRoute]:
    """The recommender of a ``session.model.type``'s versions."""
    from pipeline_lib.models.session_classical import TYPES

    return ClassicalSessionRecommender if model_type in TYPES else SessionRecommender


def open_session_version(version_dir: Path) -> TopKRoute:
    """A session version's recommender, picked by its spec.json ``kind`` (deep or classical)."""
    art = Path(version_dir) / TOPK_DIR
    kind = json.loads((art / "spec.json").read_text()).get("kind")
    if kind not in RECOMMENDERS:
        raise ValueError(f"{art} holds a {kind} top-k version, not a session model ({', '.join(RECOMMENDERS)})")
    return RECOMMENDERS[kind](art)


def export_session_classical(model_dir: Path, sample_raw: pd.DataFrame, item_col: str, k: int, staging_dir: Path,
                             model_name: str, options: Optional[ExportOptions] = None) -> TopKExport:
    """Write a classical session top-k version into ``staging_dir/<model_name>/1`` and check it: its served
    path equals the offline path (ids exactly, scores within ``options.atol``) on ``sample_raw`` and on the
    same sessions with ``exclude_item_ids`` (their first 3 offline items)."""
    o = options or ExportOptions()
    art = fresh_artifact_dir(staging_dir / model_name / "1")
    shutil.copytree(model_dir, art / MODEL_DIR)
    model = ClassicalSessionModel.load(art / MODEL_DIR)
    ids = model.item_ids
    np.savez(art / ITEMS_FILE, ids=ids)
    meta = {"kind": ClassicalSessionRecommender.kind, "k": k, "item_column": item_col,
            "exclude_seen": bool(o.exclude_seen), "request_columns": [item_col], "n_items": int(len(ids)),
            "item_id_dtype": str(ids.dtype), "model_type": model.type, "fast_transform": NO_WORKFLOW}
    (art / "spec.json").write_text(json.dumps(meta, indent=2))
    rec = ClassicalSessionRecommender(art)
    sample = sample_raw[[item_col]].reset_index(drop=True)
    reference = rec.offline(sample)
    more = sample.assign(**{EXCLUDE_INPUT: [list(r[:3]) for r in reference[0].tolist()]})
    diff, _ = check_version(rec, [sample, more], [], o.atol, fast_transform=False, offline={0: reference})
    id_type = object if ids.dtype.kind in "OUS" else ids.dtype
    inputs = [RequestInput(item_col, id_type, True), RequestInput(EXCLUDE_INPUT, id_type, True)]
    return stage_version(rec, meta, inputs, StagedVersion(staging_dir, model_name, 1), o,
                         {"max_abs_score_diff": diff, "rows": len(sample)})
