"""Stage 5 (retrieval) -- query encoder + item embeddings (+ ranker) -> a top-k Triton model.

A version directory of a retrieval model::

    <N>/model.py                 the python-backend model (pipeline_lib/serving/triton_models/topk.py)
    <N>/topk/spec.json           query/item columns, k, candidates, output dtype, fast-path status
    <N>/topk/workflow/           the run's fitted NVTabular workflow (the same one training used)
    <N>/topk/query_encoder/      SavedModel of the query tower
    <N>/topk/items.npz           raw item ids + their embeddings, computed at export from the raw
                                 catalogue through the item part of the workflow
    <N>/topk/item_features.parquet  the catalogue's raw item features (two-stage)
    <N>/topk/filler.parquet      one raw training row (constant inputs for the unused side)
    <N>/topk/ranker/             two-stage only: SavedModel of the ranking model
    <N>/topk/seen.npz            each training user's positive items, a CSR of catalogue rows per
                                 raw user id (``users``, ``indptr``, ``indices``): the seen items
                                 (``exclude_seen``), the known users and the item popularity

A request carries raw query columns (user, context, history); the response holds ``item_ids``
[rows, k] (raw ids) and ``scores`` [rows, k], best first.

Seen items (``model.retrieval.exclude_seen``, default on): a row whose user id is a training user
never gets that user's training positives back; the retrieval scores of those items are set to
-inf before the top-k (of the ``candidates`` in a two-stage version, so the ranker re-scores only
unseen ones). A request may also carry the optional list input ``exclude_item_ids`` (raw item ids
per row, unknown ids ignored): those are excluded too, for any user. An unknown user (no positive
in training) gets no seen-item exclusion -- only its own ``exclude_item_ids`` -- and, with
``model.retrieval.unknown_users: popular`` (the default when the query is the user id alone, as in
MF), the most popular items (score = training users with a positive on the item): an unseen id's
embedding was never trained. ``model`` gives the query tower's answer instead (two-tower: the
request's user/context features; youtube_dnn: its history). A row with fewer than k items left after
the exclusions is answered with only its valid items (:func:`finish_top_k`): the ``count`` output says
how many, the slots after them hold the id sentinel (``-1`` for integer ids, ``""`` for string ids) and
score ``0.0``; an excluded id and a non-finite score are never answered. The optional request input ``k``
(one INT32) asks for fewer items than the exported k (1..k; outside that range: invalid-argument). With a ranker, the top ``candidates``
retrieved items of each row are joined with their item features and the row's query features,
scored by the ranking model through the same workflow, and the k best by ranking score returned
(the shape of Merlin's multi-stage example, without its Feast/Faiss dependencies).

Per request the fitted workflow runs as the compiled numpy transform of
:mod:`pipeline_lib.etl.fast_transform` (query side, and the ranker's candidate rows), verified at export
against ``Workflow.transform`` on the sample, the candidate rows and edge rows, and end to end against
the NVTabular path; a workflow or request outside it runs NVTabular (``fast_transform`` in spec.json
says which and why).

The one top-k route (retrieval, two-stage and session, :mod:`pipeline_lib.export.session`):
:class:`TopKRoute` holds what every top-k version shares -- the catalogue of raw item ids
(``items.npz``), the exclusion of seen / requested items, the masked top-k and the decoding to raw
ids, the served entry point :meth:`TopKRoute.recommend_tensors` (compiled transform, NVTabular as
the fallback), the export checks (:func:`check_version`) and one ``config.pbtxt`` writer
(:func:`write_config`, tritonclient's ``model_config_pb2``). Every version is served by the same
python-backend ``model.py`` (``pipeline_lib/serving/triton_models/topk.py``), which picks the
recommender by spec.json's ``kind``. A subclass gives the query side: here the query tower's
embedding against the item embeddings (or the FAISS index) and the optional ranker; for sessions
the session model's scores over its item vocabulary.

This is not a merlin-systems ``Ensemble``: merlin-systems has no brute-force top-k op (its
``QueryFaiss`` needs faiss and a TF backend), so the recommender is a plain class that the served
model and the offline checks share; the transforms are the fitted NVTabular workflow and the models
are the trained SavedModels, as in the ranking ensemble.
"""
from __future__ import annotations

import json
import logging
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Optional

import numpy as np
import pandas as pd

from pipeline_lib.paths import TRITON_MODELS
from pipeline_lib.export import ann
from pipeline_lib.models import retrieval
from pipeline_lib.config import AnnConfig
from pipeline_lib.export.parity import check_parity
from pipeline_lib.export.staging import ExportOptions, raw_to_columns, StagedVersion
from pipeline_lib.models.common import call_signature, load_encoder, signature_encoder
from pipeline_lib.models.retrieval import RetrievalSpec
from pipeline_lib.etl.fast_transform import (Unsupported, columns_from_tensors, compile_workflow, n_rows, take_rows,
                                             tensors_from_columns, verify)

log = logging.getLogger(__name__)

TOPK_DIR = "topk"
OUTPUT_IDS, OUTPUT_SCORES, OUTPUT_COUNT = "item_ids", "scores", "count"
K_INPUT = "k"  # optional request input: one INT32, how many items per row (1..the exported k)
PAD_INT_ID, PAD_STR_ID, PAD_SCORE = -1, "", 0.0  # the slots after a row's ``count`` valid items
EXCLUDE_INPUT = "exclude_item_ids"  # optional request input: raw item ids never to return for that row
SEEN_FILE = "seen.npz"
ITEMS_FILE = "items.npz"  # ``ids``: the catalogue's raw item ids (retrieval: + ``embeddings``)


@dataclass
class TopKExport(StagedVersion):
    """A staged top-k version, with the in-process recommender export loaded and checked (``recommender``:
    the gate and the smoke test use it instead of loading the same SavedModels and workflow again)."""

    parity: dict
    recommender: Optional["TopKRoute"] = field(default=None, repr=False, compare=False)

    def __getstate__(self) -> dict:
        """Pickled (a persisted task result) without the loaded recommender: it is re-opened from the folder."""
        return {**self.__dict__, "recommender": None}

    def open(self, kind: type["TopKRoute"]) -> "TopKRoute":
        """The version's recommender: the one export checked, else loaded from the staged version."""
        if self.recommender is None:
            self.recommender = kind(self.version_dir / TOPK_DIR)
        return self.recommender


def loaded_recommender(exp: Optional[StagedVersion], version_dir: Path) -> Optional["TopKRoute"]:
    """``exp``'s checked recommender when ``version_dir`` is ``exp``'s version (the gate's candidate);
    None otherwise (another version, e.g. the served one, is loaded from its own folder)."""
    rec = getattr(exp, "recommender", None)
    if rec is None or Path(version_dir).resolve() != exp.version_dir.resolve():  # type: ignore[union-attr]
        return None
    return rec


class RequestInput(NamedTuple):
    """One raw request column of a top-k version: its name, dtype (numpy or merlin) and whether it is a list."""

    name: str
    dtype: Any
    is_list: bool


@dataclass
class TopKSettings:
    """What a top-k version returns: ``k`` items per row (with a ranker: ``candidates`` retrieved, then
    re-scored), never the user's training positives (``exclude_seen``), an optional FAISS index (``ann``),
    and ``popular`` or ``model`` answers for users unseen in training (``unknown_users``)."""

    columns: Any                     # ColumnsConfig
    k: int = 10
    ranker_dir: Optional[Path] = None
    candidates: int = 100
    exclude_seen: bool = True
    ann: Optional[AnnConfig] = None
    unknown_users: str = "popular"

    @classmethod
    def from_config(cls, cfg, ranker_dir: Optional[Path] = None) -> "TopKSettings":
        """From a ``RunConfig`` (``model.retrieval`` and ``columns``)."""
        r = cfg.model.retrieval
        return cls(cfg.columns, r.k, ranker_dir, r.candidates, r.exclude_seen, r.ann, cfg.unknown_users)


def request_columns(spec: RetrievalSpec, ranker_columns: Optional[list[str]], item_side: list[str],
                    user_id: Optional[str] = None) -> list[str]:
    """Raw columns a request carries: the user id (``user_id``: seen items, unknown users -- also when the query
    does not read it), the retrieval query, plus the ranker's non-item columns."""
    cols = list(spec.query_columns)
    if user_id and user_id not in cols:
        cols.insert(0, user_id)
    for c in ranker_columns or []:
        if c not in item_side and c not in cols:
            cols.append(c)
    return cols


class TopKRoute:
    """The part of a top-k version every family shares: raw request -> the k best raw item ids and
    their scores. Subclasses give the query side (``compile_fast``, ``recommend_columns``,
    ``recommend``, ``offline``); this class gives the catalogue (``item_ids``), the items never to
    return (:meth:`exclude_rows`), the masked top-k (:func:`pipeline_lib.models.retrieval.top_k_scores`
    or the ANN search) decoded to raw ids, and the served entry point :meth:`recommend_tensors`."""

    kind = "retrieval"

    def __init__(self, artifact_dir: Path):
        self.dir = Path(artifact_dir)
        self.meta = json.loads((self.dir / "spec.json").read_text())
        if self.meta.get("kind", "retrieval") != self.kind:
            raise ValueError(f"{self.dir} holds a {self.meta.get('kind', 'retrieval')} top-k version, not {self.kind}")
        self.k: int = self.meta["k"]
        self.request_columns: list[str] = self.meta["request_columns"]
        self.item_ids: np.ndarray = np.load(self.dir / ITEMS_FILE, allow_pickle=True)["ids"]
        self.item_index = pd.Index(self.item_ids)
        self.fast_status: dict = (self.meta.get("fast_transform")
                                  or {"enabled": False, "reason": "not verified at export"})
        self.fast = None
        self.workflow: Any = None     # the serving workflow (set by the subclass)
        self.workflow_inputs: list[str] = []

    # -- the query side (per family) --
    def compile_fast(self):
        """The compiled transform of the serving workflow (None when it does not compile)."""
        raise NotImplementedError

    def recommend_columns(self, cols: dict) -> tuple[np.ndarray, np.ndarray]:
        """Request columns (bytes strings, ``Ragged`` lists) -> top-k through the compiled transform."""
        raise NotImplementedError

    def recommend(self, raw: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Raw request rows -> top-k through NVTabular (the served fallback)."""
        raise NotImplementedError

    def offline(self, raw: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """The offline reference: the training-time evaluation path, then the same top-k."""
        raise NotImplementedError

    def workflow_frame(self, frame: pd.DataFrame) -> pd.DataFrame:
        """Raw rows completed to every input of the serving workflow (to verify the compiled transform)."""
        return frame[self.workflow_inputs]

    # -- shared --
    @property
    def lookup_columns(self) -> list[str]:
        """The columns a user-id request may leave out, looked up in the feature store by user id (the served
        model, :class:`pipeline_lib.features.lookup.UserLookup`): the request columns (a classical version adds
        its history list)."""
        return self.request_columns

    def enable_fast(self) -> None:
        """Compile the transform when export verified it (spec.json's ``fast_transform``)."""
        if self.fast_status.get("enabled"):
            self.fast = self.compile_fast()

    def recommend_tensors(self, arrays: dict[str, np.ndarray], ragged: set[str]) -> tuple[np.ndarray, np.ndarray]:
        """Checked request tensors -> top-k: the compiled path, or NVTabular on a frame when the
        version or the request is outside it. Both give the same answer (verified at export)."""

        if self.fast is not None:
            try:
                return self.recommend_columns(columns_from_tensors(arrays, ragged))
            except Unsupported:
                pass
        cols = self.request_columns + ([EXCLUDE_INPUT] if EXCLUDE_INPUT in ragged else [])
        return self.recommend(arrays_to_frame(arrays, cols, ragged))

    def catalogue_rows(self, ids) -> np.ndarray:
        """Catalogue rows of raw item ids (bytes decoded; unknown ids and missing lists ignored)."""
        if ids is None or (isinstance(ids, float) and np.isnan(ids)) or not len(ids):
            return np.zeros(0, dtype=np.int64)
        rows = self.item_index.get_indexer(decode_ids(ids))
        return rows[rows >= 0].astype(np.int64)

    def exclude_rows(self, seen: Optional[list[np.ndarray]], extra: Optional[list], rows: int
                     ) -> Optional[list[np.ndarray]]:
        """Per request row, the catalogue rows not to return (None when there are none): ``seen`` (catalogue
        rows per row: a known user's training positives, or the session's own items) and the row's raw
        ``exclude_item_ids`` (``extra``)."""
        out, found, empty = [], False, np.zeros(0, dtype=np.int64)
        for i in range(rows):
            row = seen[i] if seen is not None else empty
            more = self.catalogue_rows(extra[i]) if extra is not None else empty
            if len(more):
                row = np.union1d(row, more).astype(np.int64)
            out.append(row)
            found = found or len(row) > 0
        return out if found else None

    @staticmethod
    def extra_of(raw: pd.DataFrame) -> Optional[list]:
        """The frame's ``exclude_item_ids`` lists (None without the column)."""
        return raw[EXCLUDE_INPUT].tolist() if EXCLUDE_INPUT in raw.columns else None

    @staticmethod
    def extra_of_columns(cols: dict) -> Optional[list[np.ndarray]]:
        """The request columns' ``exclude_item_ids`` (a ``Ragged``) as one array per row (None without it)."""
        return ragged_rows(cols[EXCLUDE_INPUT]) if EXCLUDE_INPUT in cols else None


def ragged_rows(col) -> list[np.ndarray]:
    """A ``Ragged`` request column (values + offsets) -> one array per row."""
    off = np.asarray(col.offsets, dtype=np.int64)
    return [col.values[off[i]:off[i + 1]] for i in range(len(off) - 1)]


class TopKRecommender(TopKRoute):
    """Retrieval / two-stage: raw query rows -> top-k item ids and scores (the served path; also run in-process)."""

    def __init__(self, artifact_dir: Path):
        import nvtabular as nvt

        super().__init__(artifact_dir)
        meta = self.meta
        self.spec = RetrievalSpec(**meta["spec"])
        self.candidates, self.label = meta["candidates"], meta["label"]
        self.ranker_columns: Optional[list[str]] = meta.get("ranker_columns")
        full = nvt.Workflow.load(str(self.dir / "workflow"))
        self.workflow_with_label = full
        self.workflow = full.remove_inputs([self.label])
        self.workflow_inputs = list(self.workflow.input_schema.column_names)
        self.filler = pd.read_parquet(self.dir / "filler.parquet").iloc[0].to_dict()
        self.item_emb = np.load(self.dir / ITEMS_FILE, allow_pickle=True)["embeddings"].astype(np.float32)
        self.index = ann.load_version_index(self.dir, meta.get("ann"))  # None: exact top-k (docs/ann.md)
        self.query_fn = load_encoder(self.dir / retrieval.QUERY_ENCODER)
        self.ranker_fn = load_encoder(self.dir / "ranker") if self.ranker_columns else None
        if self.ranker_columns:
            feats = pd.read_parquet(self.dir / "item_features.parquet")
            self.item_features = feats.set_index(self.spec.item_id, drop=False)
        self.user_column: Optional[str] = meta.get("user_id")
        has_seen = (self.dir / SEEN_FILE).is_file()
        self.exclude_seen = bool(meta.get("exclude_seen")) and has_seen
        self.popular_fallback = meta.get("unknown_users") == "popular" and has_seen
        if has_seen:
            z = np.load(self.dir / SEEN_FILE, allow_pickle=True)
            self.seen_users = pd.Index(z["users"])
            self.seen_indptr, self.seen_indices = z["indptr"].astype(np.int64), z["indices"].astype(np.int64)
            # training users per catalogue item: the ranking an unknown user gets (unknown_users: popular)
            self.popularity = np.bincount(self.seen_indices, minlength=len(self.item_ids)).astype(np.float32)
        self.enable_fast()

    # -- served fast path: compiled workflow on request columns, SavedModel signatures called directly --
    def compile_fast(self):
        """The compiled transform of the serving workflow plus the constant columns it needs (filler
        row, catalogue item features), in request representation; None when it does not compile."""

        try:
            compiled = compile_workflow(self.workflow)
        except Unsupported as exc:
            log.warning("top-k fast transform not compiled, NVTabular runs per request: %s", exc)
            return None
        self._filler_cols = raw_to_columns(pd.read_parquet(self.dir / "filler.parquet"))
        self._item_cols = {}
        if self.ranker_columns:
            feats = self.item_features.reset_index(drop=True)
            if not np.array_equal(feats[self.spec.item_id].to_numpy(), self.item_ids):
                return None  # candidate rows are looked up by catalogue position
            self._item_cols = raw_to_columns(feats[[c for c in self.ranker_columns if c in feats.columns]])
        return compiled

    def workflow_frame(self, frame: pd.DataFrame) -> pd.DataFrame:
        return retrieval.with_filler(frame, self.workflow_inputs, self.filler)

    def _complete(self, cols: dict, n: int) -> dict:
        """Request columns + the filler's constant value for every other workflow input."""

        out = dict(cols)
        zeros = np.zeros(n, dtype=np.int64)
        for name in self.workflow_inputs:
            if name not in out:
                out[name] = take_rows(self._filler_cols[name], zeros)
        return out

    def recommend_columns(self, cols: dict) -> tuple[np.ndarray, np.ndarray]:
        """Request columns as Triton hands them over (bytes strings, ``Ragged`` lists) -> top-k,
        through the compiled transform. Raises ``fast_transform.Unsupported`` outside it."""

        if self.fast is None:
            raise Unsupported("the compiled transform is not enabled for this version")
        rows = n_rows(cols[self.request_columns[0]])
        query = self.fast(self._complete({c: cols[c] for c in self.spec.query_columns}, rows))
        q = call_signature(self.query_fn, tensors_from_columns(query))
        users = cols.get(self.user_column) if self.user_column else None
        excl = self.excluded(users, self.extra_of_columns(cols), rows)
        idx, scores = self.top_k(q, self.candidates if self.ranker_fn else self.k, excl, users)
        ids = self.item_ids[idx]
        if not self.ranker_fn:
            return ids, scores
        per_row = np.repeat(np.arange(rows), idx.shape[1])
        cand = {c: take_rows(cols[c], per_row) for c in self.ranker_columns if c not in self._item_cols}
        cand.update({c: take_rows(x, idx.reshape(-1)) for c, x in self._item_cols.items()})
        ranked = self.fast(self._complete(cand, len(per_row)))
        rank = call_signature(self.ranker_fn, tensors_from_columns(ranked)).reshape(ids.shape)
        return rerank(ids, rank, self.k, scores)

    # -- items never returned: the known user's training positives, the request's exclude_item_ids --
    def excluded(self, users, extra=None, rows: Optional[int] = None) -> Optional[list[np.ndarray]]:
        """Per request row, the catalogue rows not to return (None when there are none): the
        training positives of a known user (``exclude_seen``) and the row's ``exclude_item_ids``."""
        n = rows if rows is not None else len(users if users is not None else extra)
        seen = None
        if self.exclude_seen and users is not None:
            seen = [np.zeros(0, dtype=np.int64)] * n
            pos = self.seen_users.get_indexer(decode_ids(users))
            for i in np.nonzero(pos >= 0)[0]:
                seen[i] = self.seen_indices[self.seen_indptr[pos[i]]:self.seen_indptr[pos[i] + 1]]
        return self.exclude_rows(seen, extra, n)

    def _users(self, raw: pd.DataFrame) -> Optional[np.ndarray]:
        return raw[self.user_column].to_numpy() if self.user_column in raw.columns else None

    def top_k(self, query: np.ndarray, n: int, excl: Optional[list[np.ndarray]], users=None
              ) -> tuple[np.ndarray, np.ndarray]:
        """Catalogue rows and scores of the n best items per row (the index's search when the version
        has one); rows of unknown users (no training positives) get the most popular items instead
        when ``unknown_users`` is ``popular`` -- score = training users of the item."""
        idx, scores = ann.top_k(self.index, query, self.item_emb, n, excl)
        if not self.popular_fallback or users is None or not len(idx):
            return idx, scores
        cold = np.flatnonzero(self.seen_users.get_indexer(decode_ids(users)) < 0)
        if len(cold):
            pop_excl = [excl[i] for i in cold] if excl is not None else None
            ci, cs = retrieval.top_k(np.ones((len(cold), 1), np.float32), self.popularity[:, None], n, pop_excl)
            idx, scores = idx.copy(), scores.copy()
            idx[cold], scores[cold] = ci, cs
        return idx, scores

    def _excluded_frame(self, raw: pd.DataFrame) -> Optional[list[np.ndarray]]:
        return self.excluded(self._users(raw), self.extra_of(raw), len(raw))

    # -- NVTabular path (the fallback): the workflow on the request frame, SavedModel signatures called directly --
    def query_embeddings(self, raw: pd.DataFrame) -> np.ndarray:
        transformed = retrieval.side_transform(self.workflow, raw, self.spec.query_columns, self.filler)
        return retrieval.encode(self.query_fn, transformed)

    def retrieve(self, raw: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        """Retrieval's own top-k (the candidates of a two-stage version): raw ids and scores."""
        idx, scores = self.top_k(self.query_embeddings(raw), self.candidates if self.ranker_fn else self.k,
                                 self._excluded_frame(raw), self._users(raw))
        return self.item_ids[idx], scores

    def recommend(self, raw: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:
        ids, scores = self.retrieve(raw)
        if not self.ranker_fn:
            return ids, scores
        frame = self.rank_frame(raw, ids)
        transformed = self.workflow.transform(_dataset(frame[self.ranker_columns])).to_ddf().compute()
        rank = retrieval.encode(self.ranker_fn, transformed).reshape(ids.shape)
        return rerank(ids, rank, self.k, scores)

    def rank_frame(self, raw: pd.DataFrame, ids: np.ndarray) -> pd.DataFrame:
        """One row per (query row, candidate): the row's query columns + the candidate's item features."""
        rows, width = ids.shape
        query_cols = [c for c in self.ranker_columns if c not in self.item_features.columns]  # type: ignore[union-attr]
        frame = raw[query_cols].reset_index(drop=True).iloc[np.repeat(np.arange(rows), width)].reset_index(drop=True)
        items = self.item_features.loc[ids.reshape(-1)].reset_index(drop=True)
        for c in self.ranker_columns:  # type: ignore[union-attr]
            if c in items.columns:
                frame[c] = items[c].to_numpy()
        return frame

    # -- offline reference: the evaluation path of training (retrieval.query_embeddings) and, for
    # the ranker, the ranking pipeline's offline path (Merlin Loader batches + the SavedModel) --
    def offline(self, raw: pd.DataFrame) -> tuple[np.ndarray, np.ndarray]:

        n = self.candidates if self.ranker_fn else self.k
        # the encoders this version loaded (the same SavedModels: loading them again cost seconds per call)
        q = retrieval.query_embeddings(self.workflow, self.dir, self.spec, raw, self.filler,
                                       encoder=signature_encoder(self.query_fn))
        idx, scores = self.top_k(q, n, self._excluded_frame(raw), self._users(raw))
        ids = self.item_ids[idx]
        if not self.ranker_fn:
            return ids, scores
        frame = self.rank_frame(raw, ids)
        from pipeline_lib.export import ranking as export  # merlin-systems + TensorFlow: two-stage versions only

        rank = export.offline_scores(self.workflow_with_label, self.dir / "ranker", frame[self.ranker_columns],
                                     self.label, encoder=self.ranker_fn).reshape(ids.shape)
        return rerank(ids, rank, self.k, scores)


def rerank(ids: np.ndarray, scores: np.ndarray, k: int, retrieved: Optional[np.ndarray] = None
           ) -> tuple[np.ndarray, np.ndarray]:
    """Order each row's candidates by score (best first, ties by retrieval order) and keep k. ``retrieved``:
    the candidates' retrieval scores; an excluded candidate (-inf there: a row with fewer allowed items
    than candidates) keeps -inf, so it comes last and is never answered (:func:`finish_top_k`)."""
    if retrieved is not None:
        scores = np.where(np.isneginf(retrieved), -np.inf, scores)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(ids, order, 1), np.take_along_axis(scores, order, 1).astype(np.float32)


def finish_top_k(ids: np.ndarray, scores: np.ndarray, k: Optional[int] = None
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """What a top-k version answers: the first ``k`` (default: all) columns, only valid items. A slot at
    -inf (an excluded item: the row had fewer than k others) is not an item: each row's ``count`` valid
    items come first, the rest hold ``PAD_INT_ID`` / ``PAD_STR_ID`` and ``PAD_SCORE``. A NaN or +inf score
    (the model overflowed) raises :class:`~pipeline_lib.validate.requests.NonFiniteScores`: never answered."""
    from pipeline_lib.validate.requests import NonFiniteScores

    ids, scores = np.asarray(ids), np.asarray(scores, dtype=np.float32)
    if k is not None:
        ids, scores = ids[:, :k], scores[:, :k]
    bad = np.isnan(scores) | np.isposinf(scores)
    if bad.any():
        rows = np.flatnonzero(bad.any(axis=1))
        raise NonFiniteScores(f"the model computed non-finite scores for rows {rows[:10].tolist()}; no "
                              f"recommendation is answered for this request -- check those rows' inputs")
    valid = np.isfinite(scores)
    count = valid.sum(axis=1).astype(np.int32)
    if not valid.all():
        ids = ids.copy()
        ids[~valid] = PAD_STR_ID if ids.dtype.kind in "OUS" else PAD_INT_ID
        scores = np.where(valid, scores, np.float32(PAD_SCORE)).astype(np.float32)
    return ids, scores, count


def requested_k(value: Optional[np.ndarray], exported_k: int) -> Optional[int]:
    """The request's optional ``k`` input (one integer, 1..``exported_k``) -> k; None when absent.
    Anything else is a :class:`~pipeline_lib.validate.requests.BadRequest` naming the input."""
    from pipeline_lib.validate.requests import BadRequest

    if value is None:
        return None
    arr = np.asarray(value).reshape(-1)
    if arr.size != 1 or arr.dtype.kind not in "iu":
        raise BadRequest(f"input '{K_INPUT}' must be one integer (INT32, shape [1]); got shape {list(np.shape(value))}")
    k = int(arr[0])
    if not 1 <= k <= exported_k:
        raise BadRequest(f"input '{K_INPUT}' is {k}; this version answers 1 to {exported_k} items per row "
                         f"(model.retrieval.k at export)")
    return k


def _dataset(frame: pd.DataFrame):
    from merlin.io import Dataset

    return Dataset(frame.reset_index(drop=True), cpu=True)


def export_topk(workflow_dir: Path, model_dir: Path, raw_train: Path, sample_raw: pd.DataFrame,
                settings: TopKSettings, staging_dir: Path, model_name: str,
                options: Optional[ExportOptions] = None, raw_history: Optional[Path] = None) -> TopKExport:
    """Write a top-k model version into ``staging_dir/<model_name>/1`` and check that its in-process
    recommender equals the offline path on ``sample_raw`` (ids exactly, scores to ``options.atol``).
    ``settings.exclude_seen``: store each training user's positive items (``seen.npz``); served and offline
    top-k never return them to that user. ``settings.ann``: FAISS index for large catalogues (docs/ann.md).
    ``settings.unknown_users``: ``popular`` (a user without training positives gets the most popular items)
    or ``model`` (the query tower on the unseen id). ``raw_history``: later interactions (the validation
    split) that are the users' history too: their positives join the seen items and the popularity
    (:func:`seen_frame`; docs/evaluation.md, "History at test time")."""
    meta, cat, rec = _write_artifacts(workflow_dir, model_dir, raw_train, settings, staging_dir / model_name / "1",
                                      raw_history)
    o = options or ExportOptions()
    sample = sample_raw[meta["request_columns"]].reset_index(drop=True)
    meta["ann"] = _attach_index(rec, rec.dir, sample, meta["candidates"], settings.ann or AnnConfig())
    frames = [sample, cat] + ([rec.rank_frame(sample, rec.retrieve(sample)[0])] if rec.ranker_fn is not None else [])
    diff, meta["fast_transform"] = check_version(rec, [sample], frames, o.atol, o.fast_transform)
    # the history is a derived list of item ids: its raw dtype is only known from the item id
    inputs = request_inputs(rec.workflow.input_schema, meta["request_columns"], rec.spec.item_id,
                            [h for h in (rec.spec.history, rec.spec.query_history) if h])
    return stage_version(rec, meta, inputs, StagedVersion(staging_dir, model_name, 1), o,
                         {"max_abs_score_diff": diff, "rows": len(sample), "ann": meta["ann"]})


def _write_artifacts(workflow_dir: Path, model_dir: Path, raw_train: Path, s: TopKSettings,
                     vdir: Path, raw_history: Optional[Path] = None) -> tuple[dict, pd.DataFrame, "TopKRecommender"]:
    """The version's ``topk/`` folder (workflow, query encoder, item embeddings, seen items, spec.json)
    in a fresh staging repository; returns (spec.json's content, the item catalogue, its recommender)."""
    import nvtabular as nvt

    columns, k, ranker_dir = s.columns, s.k, s.ranker_dir
    spec = RetrievalSpec(**json.loads((Path(model_dir) / "spec.json").read_text()))
    workflow = nvt.Workflow.load(str(workflow_dir))
    serving_wf = workflow.remove_inputs([columns.label])
    train_raw = pd.read_parquet(raw_train)
    item_side = [columns.item_id] + [f.name for f in columns.features if f.side.value == "item"]
    ranker_columns = [c for c in columns.serving_columns] if ranker_dir else None
    hist = spec.history or spec.query_history
    if ranker_columns and hist and hist not in ranker_columns:
        ranker_columns.append(hist)
    req_cols = request_columns(spec, ranker_columns, item_side, columns.user_id)

    art = fresh_artifact_dir(vdir)
    workflow.save(str(art / "workflow"))
    shutil.copytree(Path(model_dir) / retrieval.QUERY_ENCODER, art / retrieval.QUERY_ENCODER)
    shutil.copyfile(Path(model_dir) / "spec.json", art / "model_spec.json")
    filler = retrieval.filler_row(train_raw, serving_wf.input_schema.column_names)
    train_raw.head(1)[list(filler)].to_parquet(art / "filler.parquet", index=False)
    cat = retrieval.catalogue(train_raw, RetrievalSpec(**{**spec.to_json(), "item_columns": item_side}))
    ids, emb = retrieval.item_embeddings(serving_wf, model_dir, spec, cat, filler)
    np.savez(art / ITEMS_FILE, ids=ids, embeddings=emb)
    if ranker_dir:
        shutil.copytree(ranker_dir, art / "ranker")
        cat.to_parquet(art / "item_features.parquet", index=False)
    meta = {"kind": TopKRecommender.kind, "spec": spec.to_json(), "k": k,
            "candidates": s.candidates if ranker_dir else k, "label": columns.label,
            "request_columns": req_cols, "ranker_columns": ranker_columns, "n_items": int(len(ids)),
            "item_id_dtype": str(ids.dtype), "user_id": columns.user_id, "exclude_seen": bool(s.exclude_seen),
            "unknown_users": s.unknown_users}
    meta["seen"] = write_seen(seen_frame(train_raw, raw_history), columns.user_id, columns.item_id, columns.label,
                              ids, art / SEEN_FILE)
    (art / "spec.json").write_text(json.dumps(meta, indent=2, default=str))
    return meta, cat, TopKRecommender(art)


def fresh_artifact_dir(vdir: Path) -> Path:
    """``<vdir>/topk`` in a fresh staging repository (``vdir``'s grandparent is emptied first)."""
    staging_dir = vdir.parent.parent
    if staging_dir.exists():
        shutil.rmtree(staging_dir)
    art = vdir / TOPK_DIR
    art.mkdir(parents=True)
    return art


def _attach_index(rec: TopKRecommender, art: Path, sample: pd.DataFrame, n: int, cfg: AnnConfig) -> dict:
    """Build the version's ANN index when ``cfg`` asks for one, check its recall@n against exact top-k on
    the held-out ``sample`` (:func:`ann.export_index`) and let ``rec`` search it; spec.json's ``ann``."""
    if not ann.wants_index(cfg, len(rec.item_emb)):
        return ann.no_index_info(cfg, len(rec.item_emb))  # no query rows encoded for nothing
    info = ann.export_index(art, rec.item_emb, rec.query_embeddings(sample), rec._excluded_frame(sample), n, cfg)
    rec.index = ann.load_version_index(art, info)
    return info


def seen_frame(train_raw: pd.DataFrame, raw_history: Optional[Path] = None) -> pd.DataFrame:
    """The interactions a version knows its users by (seen items, history, popularity): the training split,
    plus ``raw_history`` (the validation split: what a user did before the test period) when given."""
    if raw_history is None:
        return train_raw
    hist = pd.read_parquet(raw_history)
    return pd.concat([train_raw, hist[[c for c in train_raw.columns if c in hist.columns]]], ignore_index=True)


def write_seen(train_raw: pd.DataFrame, user_col: str, item_col: str, label: str, item_ids: np.ndarray,
               path: Path) -> dict:
    """Each training user's positive items (``label > 0``) as catalogue rows, a CSR per raw user id."""
    pos = train_raw.loc[train_raw[label] > 0, [user_col, item_col]].drop_duplicates()
    rows = pd.Index(item_ids).get_indexer(pos[item_col])
    pos = pos.assign(_row=rows)[rows >= 0]
    codes, users = pd.factorize(pos[user_col], sort=True)
    order = np.lexsort((pos["_row"].to_numpy(), codes))
    counts = np.bincount(codes, minlength=len(users))
    indptr = np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)
    users = np.asarray(users)
    np.savez(path, users=users.astype(object) if users.dtype.kind in "OUS" else users, indptr=indptr,
             indices=pos["_row"].to_numpy()[order].astype(np.int64))
    return {"n_users": int(len(users)), "n_pairs": int(len(pos)), "max_per_user": int(counts.max()) if len(counts) else 0}


# -- export: the checks, the served model.py and config.pbtxt of every top-k version --------------------------


def check_version(rec: TopKRoute, samples: list[pd.DataFrame], frames: list[pd.DataFrame], atol: float,
                  fast_transform: bool = True, offline: Optional[dict[int, tuple]] = None
                  ) -> tuple[float, dict]:
    """The version's in-process top-k (NVTabular path) must equal its offline reference on every sample (ids
    exactly, scores within ``atol``); then, with ``fast_transform`` (``export.fast_transform``), the compiled
    transform is verified (:func:`verify_fast_path`) on ``frames`` and the samples. ``offline``: references
    already computed (``rec.offline(samples[i])`` by sample index), not computed again. Returns (the largest
    score difference, spec.json's ``fast_transform``)."""
    diffs, in_process, known = [], [], offline or {}
    for i, sample in enumerate(samples):
        in_process.append(rec.recommend(sample))
        want = known[i] if i in known else rec.offline(sample)
        diffs.append(check_parity(f"in-process top-k (sample {i})", in_process[-1], want, atol))
    if not fast_transform:
        return max(diffs), {"enabled": False, "reason": "export.fast_transform is off"}
    return max(diffs), verify_fast_path(rec, frames, samples, in_process, atol)


def verify_fast_path(rec: TopKRoute, frames: list[pd.DataFrame], samples: list[pd.DataFrame],
                     expected: list[tuple[np.ndarray, np.ndarray]], atol: float) -> dict:
    """Enable the compiled transform for this version only if (1) it equals ``Workflow.transform``
    column by column on every kind of row it will see (``frames``: request rows, and for retrieval the
    catalogue and the ranker's candidate rows), plus edge rows (nulls, unseen values, empty lists, the
    vocabularies) -- and (2) the top-k it gives on each sample equals the NVTabular path's (``expected``)."""

    rec.fast = rec.compile_fast()
    if rec.fast is None:
        return {"enabled": False, "reason": "the serving workflow does not compile"}
    try:
        checked = sum(verify(rec.fast, rec.workflow, rec.workflow_frame(frame), raw_to_columns) for frame in frames)
        for sample, want in zip(samples, expected):
            check_parity("compiled transform top-k", rec.recommend_columns(raw_to_columns(sample)), want, atol)
    except (Unsupported, AssertionError) as exc:
        rec.fast = None
        log.warning("top-k fast transform disabled, NVTabular runs per request: %s", exc)
        return {"enabled": False, "reason": f"{type(exc).__name__}: {str(exc)[:500]}"}
    return {"enabled": True, "verified_rows": int(checked)}


def stage_version(rec: TopKRoute, meta: dict, inputs: list[RequestInput], staged: StagedVersion,
                  options: ExportOptions, parity: dict) -> TopKExport:
    """Finish a checked top-k version: spec.json, the one served ``model.py``, config.pbtxt and run_info.json.
    The result carries ``rec``, now as a fresh load of the finished version would be (its spec.json)."""
    (rec.dir / "spec.json").write_text(json.dumps(meta, indent=2, default=str))
    rec.meta = meta
    rec.fast_status = meta.get("fast_transform") or rec.fast_status
    shutil.copyfile(TRITON_MODELS / "topk.py", rec.dir.parent / "model.py")
    write_config(staged.config_path, staged.model_name, inputs, rec.item_ids, rec.k, options.limits())
    out = TopKExport(staged.staged_repository, staged.model_name, staged.version, parity, rec)
    info = {**(options.run_info or {}), "task": rec.kind, "top_k": rec.k, "exclude_seen": meta.get("exclude_seen"),
            "parity": parity, "fast_transform": meta.get("fast_transform")}
    (rec.dir.parent / "run_info.json").write_text(json.dumps(info, indent=2, default=str))
    return out


def request_inputs(schema, columns: list[str], item_id: str, item_lists: Optional[list[str]] = None
                   ) -> list[RequestInput]:
    """The served inputs of a top-k version: each raw request column as the workflow's input ``schema``
    has it (a column of ``item_lists`` is a list of item ids, with the item id's dtype), then the
    optional ``exclude_item_ids`` list."""
    item = schema[item_id].dtype
    out = [RequestInput(c, item, True) if c in (item_lists or [])
           else RequestInput(c, schema[c].dtype, schema[c].is_list) for c in columns]
    return out + [RequestInput(EXCLUDE_INPUT, item, True)]


def triton_type(dtype) -> int:
    """Triton's data type of a numpy or merlin dtype (strings and Python objects: ``TYPE_STRING``, BYTES)."""
    import merlin.dtypes as md
    import tritonclient.grpc.model_config_pb2 as mc

    try:
        return md.dtype(dtype).to("triton")
    except ValueError:
        return mc.TYPE_STRING


def write_config(path: Path, name: str, inputs: list[RequestInput], ids: np.ndarray, k: int,
                 limits) -> None:
    """config.pbtxt of a top-k version (python backend): one input per raw column (a list as
    ``__values`` + int32 ``__offsets``; ``exclude_item_ids`` optional), the optional ``k`` (one INT32),
    ``item_ids`` (the catalogue's id type) and ``scores`` [rows, <= k], ``count`` [rows] and ``request_id`` [1] out, the request
    limits (:class:`~pipeline_lib.validate.requests.RequestLimits`, or a row count) as parameters."""
    import tritonclient.grpc.model_config_pb2 as mc
    from google.protobuf import text_format

    from pipeline_lib.validate.requests import RequestLimits, write_limit_parameters

    cfg = mc.ModelConfig(name=name, backend="python", max_batch_size=0)
    for col in inputs:
        optional = col.name == EXCLUDE_INPUT
        if col.is_list:
            cfg.input.append(mc.ModelInput(name=f"{col.name}__values", data_type=triton_type(col.dtype), dims=[-1],
                                           optional=optional))
            cfg.input.append(mc.ModelInput(name=f"{col.name}__offsets", data_type=mc.TYPE_INT32, dims=[-1],
                                           optional=optional))
        else:
            cfg.input.append(mc.ModelInput(name=col.name, data_type=triton_type(col.dtype), dims=[-1],
                                           optional=optional))
    cfg.input.append(mc.ModelInput(name=K_INPUT, data_type=mc.TYPE_INT32, dims=[1], optional=True))
    id_type = mc.TYPE_STRING if ids.dtype.kind in "OUS" else mc.TYPE_INT64
    # [rows, -1]: a request's own k (<= the exported k) answers fewer columns
    cfg.output.append(mc.ModelOutput(name=OUTPUT_IDS, data_type=id_type, dims=[-1, -1]))
    cfg.output.append(mc.ModelOutput(name=OUTPUT_SCORES, data_type=mc.TYPE_FP32, dims=[-1, -1]))
    cfg.output.append(mc.ModelOutput(name=OUTPUT_COUNT, data_type=mc.TYPE_INT32, dims=[-1]))
    # the id of the answered request (the impression log's key; feedback names it): pipeline_lib.online
    cfg.output.append(mc.ModelOutput(name="request_id", data_type=mc.TYPE_STRING, dims=[1]))
    cfg.parameters["top_k"].string_value = str(k)
    write_limit_parameters(cfg, limits if isinstance(limits, RequestLimits) else RequestLimits(int(limits)))
    cfg.instance_group.append(mc.ModelInstanceGroup(count=1, kind=mc.ModelInstanceGroup.KIND_CPU))
    path.write_text(text_format.MessageToString(cfg))


def arrays_to_frame(arrays: dict[str, np.ndarray], columns: list[str], ragged: set[str]) -> pd.DataFrame:
    """Checked request tensors -> raw frame (bytes decoded to str, lists rebuilt from values/offsets)."""
    data: dict[str, Any] = {}
    for col in columns:
        if col in ragged:
            values, offsets = arrays[f"{col}__values"], arrays[f"{col}__offsets"].astype(np.int64)
            values = decode_ids(values)
            data[col] = [values[offsets[i]:offsets[i + 1]].tolist() for i in range(len(offsets) - 1)]
        else:
            data[col] = decode_ids(arrays[col])
    return pd.DataFrame(data)


def decode_ids(values) -> np.ndarray:
    """Values as Triton hands them over -> as the raw data holds them (bytes decoded to str)."""
    arr = np.asarray(values)
    if arr.dtype.kind == "S" or (arr.dtype == object and len(arr) and any(isinstance(v, bytes) for v in arr[:1])):
        return np.array([v.decode("utf-8") if isinstance(v, bytes) else v for v in arr], dtype=object)
    return arr
