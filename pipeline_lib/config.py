"""One validated configuration describes a whole run.

A user brings new data by writing YAML that validates against :class:`RunConfig`;
the embedded default (``RunConfig()``) generates synthetic interaction logs.
"""
from __future__ import annotations

from enum import Enum
from pathlib import Path
import re
from typing import Any, Literal, Optional, Union, get_args

import yaml
from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class FeatureKind(str, Enum):
    categorical = "categorical"
    continuous = "continuous"
    list = "list"  # multi-hot categorical list (e.g. item tags)


class FeatureSide(str, Enum):
    user = "user"
    item = "item"
    context = "context"


class FeatureSpec(_Strict):
    """One input column and the role it plays."""

    name: str
    kind: FeatureKind
    side: FeatureSide = FeatureSide.context
    log: bool = Field(False, description="continuous only: apply log(1+x) before normalizing")
    freq_threshold: int = Field(0, ge=0, description="categorical/list: rarer values go to the OOV index")
    separator: Optional[str] = Field(
        None, min_length=1,
        description="list only: the list arrives as one string joined by this separator (CSV), e.g. '|' for "
        "'Action|Comedy'; when every token is an integer the list holds ints",
    )
    max_null_rate: Optional[float] = Field(None, ge=0, le=1, description="validation: largest allowed share of nulls")
    min: Optional[float] = Field(None, description="validation, continuous only: smallest allowed value")
    max: Optional[float] = Field(None, description="validation, continuous only: largest allowed value")

    @model_validator(mode="after")
    def _options_fit_the_kind(self) -> "FeatureSpec":
        if self.log and self.kind != FeatureKind.continuous:
            raise ValueError(f"feature '{self.name}': 'log' applies to continuous features only")
        if self.separator is not None and self.kind != FeatureKind.list:
            raise ValueError(f"feature '{self.name}': 'separator' applies to list features only")
        if (self.min is not None or self.max is not None) and self.kind != FeatureKind.continuous:
            raise ValueError(f"feature '{self.name}': 'min'/'max' apply to continuous features only")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ValueError(f"feature '{self.name}': min ({self.min}) is greater than max ({self.max})")
        return self


_RULE = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_.\-]*)\s*(>=|<=|==|!=|>|<)\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")
LABEL_RULE_OPS = (">=", ">", "<=", "<", "==", "!=")


def parse_label_rule(rule: str) -> tuple[str, str, float]:
    """``"rating >= 4"`` -> ``("rating", ">=", 4.0)``; anything else is a ValueError (no eval)."""
    m = _RULE.match(rule)
    if not m:
        raise ValueError(
            f"label_rule {rule!r} is not '<column> <op> <number>' with <op> one of {', '.join(LABEL_RULE_OPS)}"
            " (e.g. 'rating >= 4')"
        )
    return m.group(1), m.group(2), float(m.group(3))


class ColumnsConfig(_Strict):
    """Column roles of the interaction table."""

    user_id: str = "user_id"
    item_id: str = "item_id"
    label: str = "click"
    timestamp: Optional[str] = "timestamp"
    label_rule: Optional[str] = Field(
        None, description="derive the binary label from another column: '<column> <op> <number>', e.g. 'rating >= 4'"
    )
    features: list[FeatureSpec] = Field(
        default_factory=lambda: [
            FeatureSpec(name="user_country", kind=FeatureKind.categorical, side=FeatureSide.user),
            FeatureSpec(name="user_age", kind=FeatureKind.continuous, side=FeatureSide.user),
            FeatureSpec(name="item_category", kind=FeatureKind.categorical, side=FeatureSide.item),
            FeatureSpec(name="item_price", kind=FeatureKind.continuous, side=FeatureSide.item, log=True),
            FeatureSpec(name="item_tags", kind=FeatureKind.list, side=FeatureSide.item),
            FeatureSpec(name="device", kind=FeatureKind.categorical, side=FeatureSide.context),
        ]
    )

    @model_validator(mode="after")
    def _unique_names(self) -> "ColumnsConfig":
        names = [self.user_id, self.item_id, self.label] + [f.name for f in self.features]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"column names used for more than one role: {dup}")
        if self.label_rule is not None:
            parse_label_rule(self.label_rule)
        return self

    @property
    def label_rule_parsed(self) -> Optional[tuple[str, str, float]]:
        return parse_label_rule(self.label_rule) if self.label_rule else None

    def of_kind(self, kind: FeatureKind) -> list[FeatureSpec]:
        return [f for f in self.features if f.kind == kind]

    @property
    def input_columns(self) -> list[str]:
        """Raw columns the workflow reads (the label included)."""
        return [self.user_id, self.item_id] + [f.name for f in self.features] + [self.label]

    @property
    def serving_columns(self) -> list[str]:
        """Raw columns a served request carries (no label)."""
        return [c for c in self.input_columns if c != self.label]


class SyntheticConfig(_Strict):
    """The embedded default dataset: a hidden latent-factor click model."""

    n_users: int = Field(2_000, ge=10)
    n_items: int = Field(1_000, ge=10)
    n_interactions: int = Field(200_000, ge=100)
    n_segments: int = Field(8, ge=2, description="hidden user/item clusters driving affinity")
    n_tags: int = Field(40, ge=2)
    latent_dim: int = Field(8, ge=2)
    popularity_skew: float = Field(1.1, gt=0, description="Zipf exponent of item exposure (popularity^a)")
    taste_exposure: float = Field(
        1.5, ge=0, description="how much a user's taste steers what they see: p(item | user) ~ popularity^a * "
        "exp(b * taste); 0 = exposure by popularity alone (every user sees the same mix)"
    )
    click_offset: float = Field(-2.8, description="constant of the click logit (sets the click rate)")
    days: int = Field(30, ge=1)


def _path_to_str(v):
    return str(v) if isinstance(v, Path) else v


class TableConfig(_Strict):
    """One input file: a local path or an fsspec URL (``file://...``), CSV, JSON (Lines) or Parquet."""

    path: str = Field(..., min_length=1, description="file (or parquet directory): local path or fsspec URL")
    format: Literal["auto", "csv", "json", "parquet"] = Field(
        "auto", description="auto: .csv/.tsv/.txt/.dat (optionally .gz/.bz2/.zip/.xz) and any file given a sep "
        "or header: false are CSV, .json/.jsonl/.ndjson JSON (one object per line, or one array of objects), "
        "everything else parquet"
    )
    sep: Optional[str] = Field(None, description="CSV delimiter (default ',' or tab for .tsv); several "
                               "characters (MovieLens' '::') are taken literally")
    encoding: str = "utf-8"
    header: bool = Field(True, description="CSV: the first line holds the column names")
    names: Optional[list[str]] = Field(None, description="CSV: column names (needed when header is false)")
    rename: dict[str, str] = Field(default_factory=dict, description="{name in the file: name in columns:}")

    _path_str = field_validator("path", mode="before")(_path_to_str)

    @model_validator(mode="after")
    def _names_without_header(self) -> "TableConfig":
        if not self.header and not self.names:
            raise ValueError(f"table {self.path}: header: false needs names: [...]")
        return self

    @property
    def resolved_format(self) -> str:
        if self.format != "auto":
            return self.format
        name = self.path.lower()
        for comp in (".gz", ".bz2", ".zip", ".xz"):
            if name.endswith(comp):
                name = name[: -len(comp)]
        if name.endswith((".json", ".jsonl", ".ndjson")):
            return "json"
        csv_options = self.sep is not None or not self.header
        return "csv" if csv_options or name.endswith((".csv", ".tsv", ".txt", ".dat")) else "parquet"


class DataConfig(_Strict):
    """Where the raw interactions come from.

    - ``synthetic``: the embedded generator (``synthetic:``);
    - ``parquet``: one denormalised parquet file or directory at ``path``;
    - ``files``: an ``interactions:`` table (CSV or parquet) plus optional ``users:`` / ``items:``
      tables left-joined on the user / item id column;
    - ``movielens100k``: the GroupLens ml-100k folder at ``path`` (u.data, u.user, u.item, u.genre).
    """

    source: Literal["synthetic", "parquet", "files", "movielens100k"] = "synthetic"
    path: Optional[str] = Field(None, description="parquet file/directory (parquet) or ml-100k folder (movielens100k)")
    interactions: Optional[TableConfig] = Field(None, description="source=files: one row per interaction")
    users: Optional[TableConfig] = Field(None, description="source=files: optional user features, keyed by columns.user_id")
    items: Optional[TableConfig] = Field(None, description="source=files: optional item features, keyed by columns.item_id")
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)

    _path_str = field_validator("path", mode="before")(_path_to_str)

    @model_validator(mode="after")
    def _path_when_files(self) -> "DataConfig":
        if self.source in ("parquet", "movielens100k") and self.path is None:
            raise ValueError(f"data.path is required when data.source is '{self.source}'")
        if self.source == "files" and self.interactions is None:
            raise ValueError("data.interactions is required when data.source is 'files'")
        if self.source != "files" and (self.interactions or self.users or self.items):
            raise ValueError("data.interactions/users/items are read only when data.source is 'files'")
        return self


class DriftConfig(_Strict):
    """Thresholds for comparing this run's raw statistics with the previous run's."""

    enabled: bool = True
    max_null_rate_change: float = Field(0.05, ge=0, description="absolute change of a column's null rate")
    max_cardinality_change: float = Field(0.3, ge=0, description="relative change of distinct values")
    max_mean_shift: float = Field(0.5, ge=0, description="|mean - previous mean| in previous standard deviations")
    max_std_change: float = Field(0.5, ge=0, description="relative change of the standard deviation")


class ValidationConfig(_Strict):
    """Raw-data checks run before ETL (per-feature bounds live on each feature)."""

    max_null_rate: Optional[float] = Field(None, ge=0, le=1, description="default bound for every feature")
    unmatched_ids: Literal["error", "warn"] = Field(
        "error", description="interactions whose id has no row in the users/items table"
    )
    drift: DriftConfig = Field(default_factory=DriftConfig)


class SplitConfig(_Strict):
    """Train / validation / test (docs/evaluation.md). Validation picks: early stopping, the best
    epoch, tuning trials, any choice between models. Test reports: the summary's figures, the
    baselines' lift and the promotion gate. ``method: time``: the newest rows (sessions: the sessions
    that start last) are test, the next newest validation; ``random``: by ``seed``. Sessions split whole."""

    method: Literal["random", "time"] = Field("random", description="random (by seed) or time (newest rows: test, "
                                              "then validation; needs columns.timestamp)")
    valid_fraction: float = Field(0.1, gt=0, lt=1, description="share of rows (sessions) held out for validation: "
                                  "early stopping, best epoch, tuning, model choice")
    test_fraction: float = Field(0.1, gt=0, lt=1, description="share of rows (sessions) held out for test: the "
                                 "reported figures, their confidence intervals and the promotion gate")

    @model_validator(mode="after")
    def _fractions_leave_training_rows(self) -> "SplitConfig":
        if self.valid_fraction + self.test_fraction >= 1:
            raise ValueError(f"split: valid_fraction ({self.valid_fraction}) + test_fraction ({self.test_fraction}) "
                             "must be below 1 (the rest trains)")
        return self


class EvaluationConfig(_Strict):
    """How reported figures carry their uncertainty (docs/evaluation.md): a seeded bootstrap over the
    natural unit of each metric (rows for AUC / log loss, users for per-user recall / NDCG, sessions
    or queries for next-item metrics), and when a held-out set is too small to mean anything."""

    bootstrap_resamples: int = Field(1000, ge=50, le=100_000, description="bootstrap resamples per interval "
                                     "(and per paired difference in the gate)")
    confidence: float = Field(0.95, gt=0.5, lt=1, description="confidence level of every interval")
    min_positives: int = Field(30, ge=0, description="a validation or test split with fewer positive labels is "
                               "named as too small (summary warnings, gate reason)")
    min_units: int = Field(30, ge=0, description="a validation or test split with fewer evaluated users, queries or "
                           "sessions is named as too small (summary warnings, gate reason)")


class DaskConfig(_Strict):
    """Where NVTabular's fit and transform run (``etl.dask``); see docs/scale.md.

    Nothing set: on CPU in this process (dask's synchronous scheduler, as before); on GPU a
    dask-cuda ``LocalCUDACluster`` with one worker per visible GPU. ``scheduler_address``: an
    existing cluster (its workers need this project's environment and the run folder on shared
    storage). ``local_workers``: a local cluster of worker processes started for the ETL.
    """

    scheduler_address: Optional[str] = Field(
        None, description="an existing dask(-cuda) scheduler, e.g. tcp://10.0.0.5:8786; nothing is started or stopped"
    )
    local_workers: Optional[int] = Field(
        None, ge=1, description="start this many local worker processes for the ETL (GPU: at most one per visible GPU)"
    )
    threads_per_worker: int = Field(1, ge=1, description="local workers: threads per worker")
    memory_limit: str = Field("auto", description="local workers: host memory per worker ('2GB', 'auto', '0' = none)")
    rmm_pool_size: Optional[str] = Field(
        "0.8", description="GPU local cluster: RMM pool per worker, a size ('20GB') or a fraction of GPU memory "
        "('0.8'); null = no pool"
    )
    connect_timeout_s: float = Field(5.0, gt=0, description="scheduler_address: give up connecting after this long")

    @model_validator(mode="after")
    def _one_cluster(self) -> "DaskConfig":
        if self.scheduler_address and self.local_workers:
            raise ValueError("etl.dask: set scheduler_address (an existing cluster) or local_workers, not both")
        return self


class HistoryConfig(_Strict):
    """``etl.history``: the user's history as ranking features, from strictly earlier events of the same
    user (pipeline_lib/etl/history.py, docs/ranking.md): count of earlier events, their positive rate, seconds
    since the latest one, and the most recent positive items as a list feature. Needs ``columns.timestamp``;
    served requests carry these columns (the caller knows its user's past)."""

    enabled: bool = Field(False, description="ranking: add the user-history features (history_count, "
                          "history_positive_rate, history_gap_s and <item_id>_history) before the split; the model, "
                          "the logistic-regression baseline and served requests all use them; needs columns.timestamp")
    max_items: int = Field(10, ge=0, description="most recent earlier positive items in <item_id>_history "
                           "(0: no list, the numeric features only)")


class EtlConfig(_Strict):
    device: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="auto = GPU (cudf + dask-cuda) when a GPU is visible, else CPU"
    )
    part_size: str = Field("256MB", description="NVTabular partition size")
    dask: DaskConfig = Field(default_factory=DaskConfig)
    fast_path: bool = Field(
        True, description="on CPU without etl.dask: fit and transform through the fast path (own Categorify "
        "counts, the compiled workflow on row batches), verified against NVTabular on a sample at fit time and "
        "falling back to NVTabular on any difference; the saved workflow is a normal NVTabular one (docs/scale.md)"
    )
    history: HistoryConfig = Field(default_factory=HistoryConfig)


RANKING_MODELS = ("dlrm", "dcn", "deepfm", "wide_deep")
CLASSICAL_MODELS = ("ease", "item_knn")  # closed-form / neighbourhood retrieval: no ETL features, no TensorFlow
AUTOENCODER_MODELS = ("mult_dae", "mult_vae")  # deep, scored from the user's history row like EASE (served as it is)
RETRIEVAL_MODELS = ("two_tower", "youtube_dnn", "mf") + CLASSICAL_MODELS + AUTOENCODER_MODELS
RANKING_METRICS = ("auc", "logloss")
RETRIEVAL_METRICS = ("recall", "ndcg", "mrr", "precision")


class AnnConfig(_Strict):
    """Approximate top-k (FAISS IVF-Flat, inner product) for large catalogues; docs/ann.md."""

    mode: Literal["auto", "exact", "faiss"] = Field(
        "auto", description="auto: a FAISS index when the catalogue has more than min_items items, else exact "
        "brute force; exact: never an index; faiss: always one (any catalogue size)"
    )
    min_items: int = Field(100_000, ge=1, description="auto: catalogues larger than this get an index")
    nlist: Optional[int] = Field(
        None, ge=1, description="IVF lists (k-means centroids); default sqrt(items), at most items/39"
    )
    nprobe: int = Field(64, ge=1, description="lists scanned per query (capped at nlist; nprobe = nlist is exact)")
    min_recall: float = Field(
        0.95, ge=0.0, le=1.0, description="export measures the index's recall@k against exact top-k on the "
        "held-out parity rows; below this the version is exported without the index (exact search, logged)"
    )
    seed: int = Field(0, description="seed of the k-means training (the index is deterministic)")


class RetrievalConfig(_Strict):
    """Retrieval models (two_tower, youtube_dnn, mf; ease and item_knn read k, exclude_seen and unknown_users):
    training, top-k serving, the optional ranking stage."""

    k: int = Field(10, ge=1, description="items returned per request; metrics are reported @k")
    epochs: Optional[int] = Field(
        20, ge=1, description="retrieval models train up to this many epochs (null: model.epochs); after each, the "
        "model is scored per user with seen items excluded (the baselines' protocol) and the best epoch is kept"
    )
    early_stopping_patience: Optional[int] = Field(
        5, ge=1, description="stop when that per-user validation recall@k has not improved for this many epochs "
        "(null: model.early_stopping_patience); per-user recall over a few hundred users is noisy from epoch to "
        "epoch, and with 3 a two-tower on the MovieLens-layout log stopped at a dip after epoch 3 (0.150) instead "
        "of climbing to 0.19"
    )
    learning_rate: Optional[float] = Field(
        0.01, gt=0, description="retrieval models' learning rate (null: model.learning_rate); at 0.003 and 2 "
        "epochs (~100 optimiser steps on 200k interactions) they stopped far short of the baselines"
    )
    tower_mlp: list[int] = Field(
        default_factory=lambda: [64],
        description="two_tower: hidden layers of each tower; youtube_dnn: of the query tower (output size = embedding_dim)",
    )
    history_length: int = Field(
        20, ge=2, description="youtube_dnn: the user's most recent positive items kept in the history feature"
    )
    num_sampled: int = Field(
        1000, ge=1, description="youtube_dnn: sampled-softmax negatives per batch (capped at the catalogue: a small "
        "catalogue is then a full softmax); with 100 of ~1,700 items validation recall fell below most-popular "
        "after the first epoch"
    )
    logits_temperature: float = Field(1.0, gt=0, description="youtube_dnn: logits / T")
    min_sampled_id: int = Field(
        3, ge=0, description="youtube_dnn: smallest item index sampled (NVTabular reserves 0-2 for pad, null, OOV)"
    )
    logq_correction: bool = Field(
        True, description="two_tower, mf: correct in-batch negatives for item popularity (logits -= log q, "
        "Merlin's PopularityLogitsCorrection); without it popular items are over-penalised as negatives",
    )
    query_history: bool = Field(
        False, description="two_tower: the user's most recent positive items (the <item_id>_history list feature, "
        "history_length items, mean of their embeddings) join the query tower; requests then carry that list, "
        "like youtube_dnn's (docs/models.md)",
    )
    query_user_id: bool = Field(
        True, description="two_tower: the query tower reads the user id (its embedding); false: only the history "
        "(query_history) and user/context features, so a user's query follows their newest items instead of an "
        "embedding fitted on the training period; requests still carry the user id (seen items, unknown users)",
    )
    rerank_with: Optional[Literal["dlrm", "dcn", "deepfm", "wide_deep"]] = Field(
        None, description="two-stage endpoint: also train this ranking model; it re-scores the retrieved candidates"
    )
    candidates: int = Field(100, ge=1, description="two-stage: candidates retrieved per request before re-ranking")
    exclude_seen: bool = Field(
        True, description="the served (and offline) top-k never returns a known user's training items; unknown "
        "users get no exclusion (a request may also list item ids to exclude: input exclude_item_ids)"
    )
    unknown_users: Literal["auto", "popular", "model"] = Field(
        "auto", description="top-k for a user without training positives: popular = the most popular items (by "
        "training users; the request's exclude_item_ids still apply); model = the query tower on the unseen id and "
        "the request's features; auto = popular when the query is the user id alone (mf, or two_tower without "
        "user/context features), model otherwise (youtube_dnn: the request's history)"
    )
    ann: AnnConfig = Field(default_factory=AnnConfig, description="approximate top-k index (FAISS) for large catalogues")


class CandidateSpec(_Strict):
    """One candidate of a run's competition (docs/models.md, "Candidates"): a model type of the run's
    family plus overrides of that family's model config (``model:`` or ``session.model:``)."""

    type: str = Field(..., description="a model type of the run's family (model.type / session.model.type values)")
    overrides: dict[str, Any] = Field(
        default_factory=dict, description="fields of the model config this candidate changes, e.g. "
        "{embedding_dim: 32} or {retrieval: {epochs: 5}}; validated by building the candidate's model config")
    name: Optional[str] = Field(
        None, pattern=r"^[A-Za-z0-9_\-]+$", description="its row in the leaderboard and its folder under model/candidates/ "
        "(default: the type, numbered when a type is listed twice)")


CANDIDATES_DESCRIPTION = (
    "models that compete in this run: each trains on the same ETL output, is scored on the validation split "
    "(ranking: auc; retrieval: user_recall@k; session: recall@top_k) and the best is exported, gated and served "
    "(ties: the first listed); a list of {type, overrides, name} or 'auto' (the family's default list); null: "
    "only model.type trains, except for a default run of task: retrieval / task: session (docs/models.md)")


def candidate_config(base: BaseModel, spec: CandidateSpec) -> Any:
    """``base`` (a model config) with ``spec``'s type and overrides, validated, without candidates."""
    bad = sorted({"type", "candidates"} & set(spec.overrides))
    if bad:
        raise ValueError(f"candidate '{spec.type}': overrides may not set {bad} (give the type as 'type')")
    raw = _deep_merge(base.model_dump(mode="json", exclude={"candidates"}), spec.overrides)
    try:
        return type(base).model_validate({**raw, "type": spec.type})
    except ValueError as exc:
        raise ValueError(f"candidate '{spec.name or spec.type}': {exc}") from None


def candidate_names(specs: list[CandidateSpec]) -> list[str]:
    """Unique names: the given name, else the type (``mf``, ``mf_2`` when a type is listed twice)."""
    names: list[str] = []
    for spec in specs:
        base = spec.name or spec.type
        n = sum((c.name or c.type) == base for c in specs[:len(names)])
        names.append(base if n == 0 else f"{base}_{n + 1}")
    if len(set(names)) != len(names):
        raise ValueError(f"candidate names must be unique, got {names}")
    return names


class ClassicalConfig(_Strict):
    """Classical retrieval models (ease, item_knn): fitted in closed form on the training split's positive
    user-item pairs, served by the user id alone, or as the candidate generator of a two-stage endpoint
    (model.retrieval.rerank_with; docs/models.md)."""

    ease_lambda: float = Field(
        200.0, gt=0, description="ease: L2 regularisation lambda of B = I - P diag(1/diag(P)), P = (X^T X + lambda I)^-1"
    )
    ease_max_items: int = Field(
        10_000, ge=1, description="ease: largest catalogue it fits (it inverts a dense n_items x n_items float64 "
        "matrix: 10,000 items ~ 2.4 GB at its peak); a larger catalogue stops training with an error naming this "
        "limit -- use model.type: item_knn (sparse) instead"
    )
    knn_neighbours: Optional[int] = Field(
        100, ge=1, description="item_knn: most similar items kept per item (a sparse n_items x neighbours matrix, "
        "for catalogues of millions); null keeps every co-occurring item"
    )
    knn_shrinkage: float = Field(
        2.0, ge=0, description="item_knn: cosine shrinkage, sim(i, j) = n(i, j) / (sqrt(n(i) n(j)) + shrinkage), n: "
        "training users of an item (of both): pairs seen by few users count less; 0 is the plain cosine of the item_cooccurrence baseline "
        "(on the MovieLens-layout log, 100 neighbours: 0 -> 0.195, 2 -> 0.204, 10 -> 0.197, 50 -> 0.167 per-user "
        "recall@10)"
    )


class AutoencoderConfig(_Strict):
    """mult_dae / mult_vae (Liang et al. 2018): the user's L2-normalised history row -> tanh hidden layer [-> the
    VAE's Gaussian latent -> tanh hidden layer] -> a softmax over the catalogue; trained on the training split's
    positives, the best epoch on per-user validation recall@k kept (docs/models.md)."""

    hidden_dim: int = Field(600, ge=1, description="units of the tanh hidden layer (the VAE: of encoder and decoder)")
    latent_dim: int = Field(200, ge=1, description="mult_vae: size of the Gaussian latent code")
    dropout: float = Field(0.5, ge=0, lt=1, description="dropout on the normalised input row while training")
    beta_max: float = Field(0.2, ge=0, description="mult_vae: largest weight of the KL term (annealed from 0)")
    anneal_steps: int = Field(
        2000, ge=1, description="mult_vae: the KL weight grows by 1 / anneal_steps per update (up to beta_max)")
    l2: float = Field(0.0, ge=0, description="L2 penalty on every kernel")
    learning_rate: float = Field(1e-3, gt=0, description="Adam's learning rate")
    batch_size: int = Field(500, ge=1, description="users per update")
    epochs: int = Field(200, ge=1, description="most epochs; the best epoch on validation is kept")
    early_stopping_patience: Optional[int] = Field(
        20, ge=1, description="stop when per-user validation recall@k has not improved for this many epochs")


class ModelConfig(_Strict):
    type: Literal["dlrm", "dcn", "deepfm", "wide_deep", "two_tower", "youtube_dnn", "mf", "ease", "item_knn",
                  "mult_dae", "mult_vae"] = Field(
        "dlrm", description="ranking: dlrm | dcn (DCN-v2) | deepfm | wide_deep; retrieval: two_tower | youtube_dnn | "
        "mf | mult_dae | mult_vae (deep; the last two: model.autoencoder) | ease | item_knn (classical, "
        "model.classical)"
    )
    embedding_dim: int = Field(16, ge=2)
    bottom_mlp: list[int] = Field(default_factory=lambda: [64, 16], description="DLRM bottom MLP")
    top_mlp: list[int] = Field(
        default_factory=lambda: [64, 32], description="DLRM top MLP; the deep MLP of DCN-v2, DeepFM and Wide&Deep"
    )
    cross_depth: int = Field(2, ge=1, description="DCN-v2: number of cross layers")
    embedding_l2: float = Field(
        1e-4, ge=0, description="L2 penalty on every embedding table (and Wide&Deep's wide weights): rare ids are "
        "not memorised, unused rows (out-of-vocabulary) shrink to zero",
    )
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout after each hidden layer of the MLPs")
    optimizer: Literal["adam", "adagrad", "sgd"] = "adam"
    learning_rate: float = Field(6e-3, gt=0)
    batch_size: int = Field(1024, ge=1)
    epochs: int = Field(10, ge=1, description="at most this many; early_stopping_patience usually stops sooner")
    early_stopping_patience: Optional[int] = Field(
        1, ge=1, description="stop when validation AUC (retrieval: recall@k) has not improved for this many epochs; the best epoch is kept"
    )
    retrieval: RetrievalConfig = Field(default_factory=RetrievalConfig)
    candidates: Optional[Union[Literal["auto"], list[CandidateSpec]]] = Field(None, description=CANDIDATES_DESCRIPTION)
    classical: ClassicalConfig = Field(
        default_factory=ClassicalConfig, description="ease and item_knn (served like the deep retrieval models: "
        "model.retrieval's k, exclude_seen, unknown_users, rerank_with and candidates apply)"
    )
    autoencoder: AutoencoderConfig = Field(
        default_factory=AutoencoderConfig, description="mult_dae and mult_vae (scored from the user's history row and "
        "served like ease: model.retrieval's k, exclude_seen, unknown_users, rerank_with and candidates apply)"
    )

    @property
    def is_retrieval(self) -> bool:
        return self.type in RETRIEVAL_MODELS

    @property
    def is_classical(self) -> bool:
        """ease / item_knn: closed-form retrieval on the raw training positives (no TensorFlow model)."""
        return self.type in CLASSICAL_MODELS

    @property
    def scores_history(self) -> bool:
        """ease / item_knn / mult_dae / mult_vae: fitted on the raw training positives and scored from the user's
        history row (no ETL features; served by user id through the classical top-k version)."""
        return self.type in CLASSICAL_MODELS + AUTOENCODER_MODELS

    @model_validator(mode="after")
    def _candidates_of_one_family(self) -> "ModelConfig":
        if isinstance(self.candidates, list):
            if not self.candidates:
                raise ValueError("model.candidates: give at least one candidate (or null / 'auto')")
            kinds = {t in RETRIEVAL_MODELS for t in (c.type for c in self.candidates)}
            for spec in self.candidates:
                built = candidate_config(self, spec)  # an unknown type or a bad override names the candidate
                reads_history = built.type == "youtube_dnn" or (built.type == "two_tower" and built.retrieval.query_history)
                if reads_history and built.retrieval.history_length != self.retrieval.history_length:
                    raise ValueError(f"candidate '{spec.name or spec.type}': retrieval.history_length must stay "
                                     f"{self.retrieval.history_length} (model.retrieval.history_length): one ETL "
                                     "output serves every candidate")
            if len(kinds) > 1:
                raise ValueError(f"model.candidates mixes ranking and retrieval types "
                                 f"{[c.type for c in self.candidates]}: candidates belong to one family")
            candidate_names(self.candidates)
        return self

    @model_validator(mode="after")
    def _dlrm_bottom_matches_embeddings(self) -> "ModelConfig":
        if not self.bottom_mlp:
            raise ValueError("bottom_mlp needs at least one layer")
        if self.retrieval.rerank_with and not self.is_retrieval:
            raise ValueError("model.retrieval.rerank_with applies to retrieval models (two_tower, youtube_dnn, mf, ease, "
                             "item_knn)")
        if self.scores_history and self.retrieval.unknown_users == "model":
            raise ValueError(f"model.retrieval.unknown_users: model does not apply to model.type '{self.type}' (an "
                             "unknown user has no history to score): use popular or auto")
        if self.retrieval.rerank_with and self.retrieval.candidates < self.retrieval.k:
            raise ValueError(f"model.retrieval.candidates ({self.retrieval.candidates}) must be >= k ({self.retrieval.k})")
        dlrm = self.type == "dlrm" or self.retrieval.rerank_with == "dlrm"
        if dlrm and self.bottom_mlp[-1] != self.embedding_dim:
            raise ValueError(
                f"DLRM: the last bottom_mlp layer ({self.bottom_mlp[-1]}) must equal embedding_dim ({self.embedding_dim})"
            )
        return self


class GateConfig(_Strict):
    """Promotion gate, on the test split: the candidate must beat the best baseline of its family
    (same split and protocol) and must not be worse than the served version (both scored through
    their own exported versions from raw test rows). Each comparison is a paired bootstrap of the
    difference on the same units: promoted / refused when its interval is clear of zero (beyond
    ``tolerance``), inconclusive otherwise (``on_inconclusive``)."""

    enabled: bool = True
    metric: Literal["auto", "auc", "logloss", "recall", "ndcg", "mrr", "precision"] = Field(
        "auto", description="auto: auc for ranking models, recall@k for retrieval models"
    )
    tolerance: float = Field(0.0, ge=0, description="allowed degradation of the metric")
    require_beat_baseline: bool = Field(
        True, description="refuse a candidate that does not beat the best baseline of its family on the gate metric "
        "(same split and protocol; the first run of a model family too)"
    )
    min_lift_over_baseline: float = Field(
        0.0, ge=0, description="relative margin over the best baseline: 0.02 = the metric 2% better than it"
    )
    max_rows: int = Field(50_000, ge=100, description="test rows scored for the comparison with the served version")
    on_inconclusive: Literal["keep", "promote"] = Field(
        "keep", description="when a difference's confidence interval includes zero (beyond tolerance): keep the "
        "served version, or promote anyway. With nothing served, an inconclusive comparison with the baselines "
        "promotes (a run ends serving something)")


class ExportConfig(_Strict):
    model_repository: Path = Path("model_repository")
    model_name: str = Field("recsys", pattern=r"^[A-Za-z0-9_\-]+$")
    parity_rows: int = Field(256, ge=1, description="rows checked in-process before writing the ensemble")
    parity_atol: float = 1e-5
    keep_versions: int = Field(5, ge=1, description="retention: newest versions kept (the served one always is)")
    max_request_rows: int = Field(65536, ge=1, description="served requests with more rows get a clear error")
    max_string_bytes: int = Field(
        1024, ge=1, description="served requests: a string value (an id, a category) longer than this many bytes "
        "is refused (invalid-argument naming the input and row)")
    max_list_length: int = Field(
        10000, ge=1, description="served requests: a list input (history, tags, exclude_item_ids) with more values "
        "in one row is refused (invalid-argument naming the input and row)")
    fast_transform: bool = Field(
        True, description="serve the fitted workflow compiled to numpy (verified identical to NVTabular at export)"
    )
    compiled_model: Literal["auto", "off"] = Field(
        "auto", description="auto: serve the ranking model converted to ONNX (ONNX Runtime) for requests up to the "
        "largest batch size where it measured faster at export, if it equals the SavedModel within parity_atol on "
        "the held-out rows; else, and with off, the TensorFlow SavedModel serves (run_info.json says which and why)",
    )


class FeaturesConfig(_Strict):
    """The feature store behind user-id requests (pipeline_lib/features/, docs/serving.md#user-id-requests)."""

    enabled: bool = Field(
        True, description="retrieval, two-stage and ranking runs: keep a per-version snapshot of the user features, the "
        "user's recent items and the item features, and materialize it into a Feast store after each promotion, so the "
        "served model answers requests that carry only the user id (ranking: the user id and the item ids; classical "
        "ease / item_knn too: the user's train + validation positives; deep session versions: the item features, "
        "looked up by item id when a session request leaves them out)")
    online_store: Literal["sqlite", "redis"] = Field(
        "sqlite", description="the Feast online store: sqlite (a file beside the model repository, no server) or "
        "redis (redis_connection)")
    redis_connection: str = Field(
        "localhost:6379", description="online_store redis: Feast's connection string, host:port[,password=...,db=N]")
    repo: Optional[Path] = Field(
        None, description="the Feast repositories' folder (one per served model); default: feature_store/ beside "
        "export.model_repository")


class DynamicBatchingConfig(_Strict):
    """Triton's dynamic batcher for the served model (written into the version's config.pbtxt).

    With it on, one request is one batch entry: each input carries a leading batch dimension of 1
    (shape ``[1, rows]``; ``RecsysClient`` adds it by itself), every input is a ragged-batch input,
    and the model receives the queued requests together, encodes and scores their rows in one
    call, and answers each request with its own rows' scores."""

    enabled: bool = False
    max_batch_size: int = Field(32, ge=1, description="most requests Triton hands to one model call")
    max_queue_delay_microseconds: int = Field(
        0, ge=0, description="how long Triton may hold a request to form a larger batch (0: only what is queued)"
    )
    preferred_batch_size: list[int] = Field(default_factory=list, description="request counts Triton aims for")

    @model_validator(mode="after")
    def _preferred_within_max(self) -> "DynamicBatchingConfig":
        bad = [p for p in self.preferred_batch_size if not 1 <= p <= self.max_batch_size]
        if bad:
            raise ValueError(f"preferred_batch_size {bad} outside 1..max_batch_size ({self.max_batch_size})")
        return self


class SupervisorConfig(_Strict):
    """How `recsys serve` keeps the model answering (pipeline_lib/serving/supervisor.py)."""

    enabled: bool = Field(True, description="probe the served model and restart Triton / reload the model when it fails")
    probe_interval_s: float = Field(2.0, gt=0, description="seconds between probes (a real one-row inference)")
    probe_timeout_s: float = Field(10.0, gt=0, description="a probe slower than this counts as failed")
    max_failures: int = Field(5, ge=1, description="give up (exit non-zero) after more failures than this within window_s")
    window_s: float = Field(300.0, gt=0, description="the window max_failures counts in")
    backoff_initial_s: float = Field(0.5, ge=0, description="wait before the first recovery; doubles per failure in the window")
    backoff_max_s: float = Field(30.0, ge=0, description="longest wait before a recovery")


class ServingConfig(_Strict):
    host: str = "127.0.0.1"
    http_port: int = 8000
    grpc_port: int = 8001
    metrics_port: int = 8002
    startup_timeout_s: float = 180.0
    model_control: Literal["explicit", "poll", "none"] = Field(
        "explicit", description="explicit: promotion reloads the model via the API; poll: Triton watches the repository"
    )
    repository_poll_secs: int = Field(5, ge=1)
    instance_count: int = Field(1, ge=1, description="model instances (python backend processes)")
    dynamic_batching: DynamicBatchingConfig = Field(default_factory=DynamicBatchingConfig)
    admin_api_key: Optional[str] = Field(
        None, description="the key Triton's model-repository API (load/unload/upload) requires; default: env "
        "RECSYS_ADMIN_KEY, else a fresh key per server kept in a 0600 file (docs/serving.md)"
    )
    restrict_repository_api: bool = Field(
        True, description="refuse model-repository API calls (load/unload/upload) without the admin key"
    )
    supervisor: SupervisorConfig = Field(default_factory=SupervisorConfig)
    notify_live_server: bool = Field(True, description="after a promotion, switch a Triton running at host:http_port")
    smoke_rows: int = Field(8, ge=1, description="raw rows sent in the end-of-run smoke test")
    smoke_atol: float = 1e-5


class SessionSyntheticConfig(_Strict):
    """The embedded session generator (``task: session``): Markov transitions between items plus a
    session-level intent category (see :func:`pipeline_lib.data.sessions.generate_sessions`)."""

    n_sessions: int = Field(12_000, ge=20)
    n_items: int = Field(600, ge=10)
    n_categories: int = Field(20, ge=2)
    mean_length: float = Field(8.0, gt=1)
    min_length: int = Field(2, ge=1)
    max_length: int = Field(40, ge=2)
    successors: int = Field(4, ge=1, description="successor items per item (Markov transitions)")
    p_successor: float = Field(0.55, ge=0, le=1, description="share of moves to a successor of the current item")
    p_intent: float = Field(0.3, ge=0, le=1, description="share of moves to an item of the session's intent category")
    popularity_skew: float = Field(1.0, gt=0)
    days: int = Field(30, ge=1)

    @model_validator(mode="after")
    def _probabilities(self) -> "SessionSyntheticConfig":
        if self.p_successor + self.p_intent > 1:
            raise ValueError("p_successor + p_intent must be <= 1")
        if self.min_length > self.max_length:
            raise ValueError("min_length must be <= max_length")
        return self


class SessionColumns(_Strict):
    """Column roles of a session event log (one row per interaction)."""

    session_id: str = "session_id"
    item_id: str = "item_id"
    timestamp: str = "timestamp"
    item_features: list[str] = Field(
        default_factory=lambda: ["item_category"], description="categorical per-event item features (become lists)"
    )

    @property
    def raw_columns(self) -> list[str]:
        return [self.session_id, self.item_id, self.timestamp, *self.item_features]


class SessionEtlConfig(_Strict):
    min_session_length: int = Field(2, ge=2, description="shorter sessions are dropped (a target needs a prefix)")
    max_session_length: int = Field(20, ge=2, description="sessions are truncated to their last N events")


class SessionClassicalConfig(_Strict):
    """Options of the classical session types (``session_knn``, ``sequential_rules``; docs/sessions.md)."""

    neighbors: int = Field(100, ge=1, description="session_knn: the k most similar training sessions whose items "
                           "are scored (each by the sum of the similarities of the neighbours holding it)")
    sample_size: int = Field(500, ge=1, description="session_knn: candidate neighbours are the most recent this many "
                             "training sessions sharing an item with the session (the sample M of SKNN)")
    position_weighting: bool = Field(True, description="session_knn: weight the session's items by position in the "
                                     "cosine similarity, linearly from 1/n (first) to 1 (last) (V-SKNN); off: SKNN")
    max_distance: int = Field(10, ge=1, description="sequential_rules: a rule a -> b counts when b follows a within "
                              "this many events of a training session, weighted 1/distance")
    recency_decay: float = Field(0.0, ge=0, le=1, description="sequential_rules: the session's scores sum the rules "
                                 "of its items, the item t events before the last weighted recency_decay**t "
                                 "(0: the last item only, the literature's SR)")


SESSION_CLASSICAL_TYPES = ("session_knn", "sequential_rules")


class SessionModelConfig(_Strict):
    type: Literal["gru", "transformer", "session_knn", "sequential_rules"] = Field(
        "gru", description="gru: a GRU over the sequence; transformer: causal self-attention blocks; session_knn: "
        "nearest training sessions (V-SKNN); sequential_rules: item-to-item rules from the order of events within "
        "training sessions (SR). The last two are classical (numpy, no TensorFlow at serving; options: "
        "session.model.classical, the deep options are ignored)"
    )
    embedding_dim: int = Field(64, ge=4, description="item-id embedding size (other features: a quarter of it)")
    hidden_dim: int = Field(64, ge=4, description="GRU units / transformer d_model")
    num_layers: int = Field(1, ge=1)
    num_heads: int = Field(2, ge=1, description="transformer only")
    dropout: float = Field(0.1, ge=0, lt=1)
    learning_rate: float = Field(3e-3, gt=0)
    batch_size: int = Field(128, ge=1)
    epochs: int = Field(10, ge=1, description="at most; see early_stopping_on")
    validation_fraction: float = Field(
        0.1, ge=0, lt=1, description="early_stopping_on: train_share only: share of the training sessions kept out "
        "of the fit to pick the epoch (their recall@top_k after each epoch); 0: every session trains, all epochs run")
    early_stopping_patience: int = Field(2, ge=0, description="stop after this many epochs without a better "
                                         "validation recall (the best epoch's weights are kept); 0: never stop early")
    early_stopping_on: Literal["validation", "train_share"] = Field(
        "validation", description="where the epoch is picked: validation -- the validation split's sessions (the "
        "data candidates are chosen on; every training session fits); train_share -- a validation_fraction share "
        "of the training sessions kept out of the fit. Never the test split")
    tie_weights: bool = Field(False, description="score items with the input item embeddings (weight tying)")
    popularity_prior: bool = Field(True, description="start the output bias at the log training frequency of items")
    candidates: Optional[Union[Literal["auto"], list[CandidateSpec]]] = Field(None, description=CANDIDATES_DESCRIPTION)

    @model_validator(mode="after")
    def _candidates_validate(self) -> "SessionModelConfig":
        if isinstance(self.candidates, list):
            if not self.candidates:
                raise ValueError("session.model.candidates: give at least one candidate (or null / 'auto')")
            for spec in self.candidates:
                candidate_config(self, spec)
            candidate_names(self.candidates)
        return self

    classical: SessionClassicalConfig = Field(default_factory=SessionClassicalConfig,
                                              description="options of session_knn / sequential_rules")

    @property
    def is_classical(self) -> bool:
        """A classical type (fitted by counting, served in numpy): :mod:`pipeline_lib.models.session_classical`."""
        return self.type in SESSION_CLASSICAL_TYPES


class SessionConfig(_Strict):
    """Settings of ``task: session`` (next-item prediction); ignored by ranking runs."""

    synthetic: SessionSyntheticConfig = Field(default_factory=SessionSyntheticConfig)
    columns: SessionColumns = Field(default_factory=SessionColumns)
    etl: SessionEtlConfig = Field(default_factory=SessionEtlConfig)
    model: SessionModelConfig = Field(default_factory=SessionModelConfig)
    top_k: int = Field(10, ge=1, description="items returned per served session; Recall/NDCG/MRR cut-off")
    gate_metric: Literal["recall", "ndcg", "mrr"] = Field("recall", description="promotion gate metric (at top_k)")
    exclude_seen: bool = Field(
        True, description="never recommend an item already in the session so far (offline metrics, baselines and "
        "served top-k); turn off where repeat consumption is expected (re-orders, replays)"
    )


# -- the optional tune stage (pipeline_lib/models/tune.py) --------------------------------------------------

# Default search space. "float"/"int": [low, high] (low == high pins the value); "choice": the values.
# mlp_width/mlp_depth set the deep MLP (top_mlp: width, width/2, ...; DLRM's bottom_mlp ends at
# embedding_dim); tower_width sets every layer of retrieval.tower_mlp.
SEARCH_SPACE: dict[str, tuple[str, list, bool]] = {  # name: (kind, values, log scale)
    "learning_rate": ("float", [1e-4, 3e-2], True),
    "embedding_dim": ("choice", [8, 16, 32, 64], False),
    "batch_size": ("choice", [256, 512, 1024, 2048], False),
    "epochs": ("int", [1, 4], False),
    "mlp_width": ("choice", [32, 64, 128, 256], False),
    "mlp_depth": ("int", [1, 3], False),
    "cross_depth": ("int", [1, 3], False),
    "tower_width": ("choice", [32, 64, 128], False),
    "logits_temperature": ("float", [0.05, 1.0], True),
    "num_sampled": ("choice", [25, 50, 100, 200], False),
    "logq_correction": ("choice", [True, False], False),
}
_COMMON = ("learning_rate", "embedding_dim", "batch_size", "epochs")
TUNABLE: dict[str, tuple[str, ...]] = {
    "dlrm": _COMMON + ("mlp_width", "mlp_depth"),
    "dcn": _COMMON + ("mlp_width", "mlp_depth", "cross_depth"),
    "deepfm": _COMMON + ("mlp_width", "mlp_depth"),
    "wide_deep": _COMMON + ("mlp_width", "mlp_depth"),
    "two_tower": _COMMON + ("tower_width", "logq_correction"),
    "youtube_dnn": _COMMON + ("tower_width", "logits_temperature", "num_sampled"),
    "mf": _COMMON + ("logq_correction",),
    "ease": (),       # closed form: nothing the Optuna study trains per trial (tune.enabled is refused)
    "item_knn": (),
    "mult_dae": (),   # model.autoencoder's parameters are set directly (tune.enabled is refused)
    "mult_vae": (),
}


# -- candidates (docs/models.md, "Candidates") ---------------------------------------------------------------

DEFAULT_RETRIEVAL_MODEL = "two_tower"
# the deep candidates of a default retrieval run: mult_dae beat EASE on the MovieLens-layout log (benchmarks/README.md)
DEFAULT_DEEP_RETRIEVAL = (DEFAULT_RETRIEVAL_MODEL, "mult_dae")
DEFAULT_SESSION_MODEL = "gru"
DEEP_RETRIEVAL_MODELS = ("two_tower", "youtube_dnn", "mf") + AUTOENCODER_MODELS
DEEP_SESSION_MODELS = ("gru", "transformer")
LOGISTIC_TYPES = ("logistic_regression", "logreg")  # a servable ranking fallback, once a model.type has one


def accepted_types(model_cls: type[BaseModel]) -> tuple[str, ...]:
    """The values the ``type`` Literal of ``model_cls`` accepts (read at runtime: new types join by name)."""
    return tuple(get_args(model_cls.model_fields["type"].annotation))


def default_candidate_types(family: str, model_type: str) -> list[str]:
    """``candidates: auto``: retrieval -> two_tower and mult_dae plus every non-deep retrieval type the config
    accepts (the classical ones: ease, item_knn, ...); session -> gru and transformer plus every non-deep session type
    (session_knn, sequential_rules, ...); ranking -> model.type plus a logistic-regression type where one exists."""
    if family == "retrieval":
        return list(DEFAULT_DEEP_RETRIEVAL) + [t for t in accepted_types(ModelConfig)
                                               if t in RETRIEVAL_MODELS and t not in DEEP_RETRIEVAL_MODELS]
    if family == "session":  # both deep types: the transformer won on the structured log (benchmarks/README.md)
        return list(DEEP_SESSION_MODELS) + [t for t in accepted_types(SessionModelConfig) if t not in DEEP_SESSION_MODELS]
    return [model_type] + [t for t in accepted_types(ModelConfig) if t in LOGISTIC_TYPES and t != model_type]


class TuneConfig(_Strict):
    """The optional ``tune`` stage (docs/tuning.md): an Optuna study (TPE sampler seeded by ``seed``,
    median pruning on the per-epoch validation metric) over the main hyperparameters of
    ``model.type``, scored by the gate metric on the validation split; training then uses the best."""

    enabled: bool = Field(False, description="run the tune stage between ETL and training")
    n_trials: int = Field(20, ge=1, description="most trials of the study")
    timeout_s: Optional[float] = Field(
        600.0, gt=0, description="no trial starts after this many seconds (the running one finishes); null = no limit"
    )
    pruning: bool = Field(True, description="stop trials whose per-epoch validation metric is below the median "
                          "of earlier trials at the same epoch (ranking models)")
    space: dict[str, list] = Field(
        default_factory=dict,
        description="search-space overrides by parameter, e.g. learning_rate: [1e-4, 1e-2] (a range for float/int "
        "parameters, low == high pins it) or embedding_dim: [16, 32] (the choices); the parameters of each "
        "model.type and their default ranges: docs/tuning.md",
    )

    @field_validator("space")
    @classmethod
    def _space_values(cls, space: dict[str, list]) -> dict[str, list]:
        for name, values in space.items():
            if name not in SEARCH_SPACE:
                raise ValueError(f"tune.space: '{name}' is not a tunable parameter (tunable: {sorted(SEARCH_SPACE)})")
            kind, _, log = SEARCH_SPACE[name]
            if kind == "choice":
                if not values:
                    raise ValueError(f"tune.space.{name}: give at least one choice")
                continue
            if len(values) != 2 or not all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values):
                raise ValueError(f"tune.space.{name}: give a range [low, high] of numbers, got {values}")
            if values[0] > values[1] or (log and values[0] <= 0):
                raise ValueError(f"tune.space.{name}: need {'0 < ' if log else ''}low <= high, got {values}")
        return space


class ImpressionsConfig(_Strict):
    """The impression log of the served models (pipeline_lib/online/impressions.py, docs/online.md)."""

    enabled: bool = Field(True, description="served models log one record per request (request id, time, model, "
                          "version, user, items shown with ranks and scores) when Triton is started by recsys serve")
    path: Optional[Path] = Field(None, description="folder of the hour-partitioned parquet log (default: "
                                 "<runs_dir>/online/impressions); the place a log collector points at")
    flush_seconds: float = Field(1.0, gt=0, description="the log is written every this many seconds off the request "
                                 "thread: a crash loses at most this much, a clean stop nothing")
    user_columns: list[str] = Field(default_factory=list, description="request columns naming the user or session, "
                                    "first present wins (default: columns.user_id, session.columns.session_id)")


class OnlineConfig(_Strict):
    """Closing the loop: impressions, feedback, online evaluation (docs/online.md)."""

    impressions: ImpressionsConfig = Field(default_factory=ImpressionsConfig)
    feedback_path: Optional[Path] = Field(None, description="feedback folder (default: <runs_dir>/online/feedback): "
                                          "inbox/ is the file drop, accepted/ and rejected/ what recsys feedback made of it")
    attribution_window_s: float = Field(1800.0, gt=0, description="a click counts for the latest impression of the "
                                        "same user and item shown at most this many seconds before it")
    k: int = Field(10, ge=1, description="online metrics are computed on the first k items shown (CTR@k, hit rate@k)")
    auto_rollback: bool = Field(False, description="online evaluation rolls the served model back when the promoted "
                                "version's CTR is significantly below the previous version's")
    reports_path: Optional[Path] = Field(None, description="online evaluation reports (default: <runs_dir>/online/reports)")
    retrain_on_feedback: bool = Field(False, description="the run's data is the original log plus every item shown "
                                      "since retrain_since, labelled by its feedback (ranking / retrieval; needs "
                                      "split.method: time, so the newest feedback is the test set)")
    retrain_since: Optional[str] = Field(None, description="ISO time: impressions from then on are added "
                                         "(default: all of them)")


class RunConfig(_Strict):
    task: Literal["ranking", "retrieval", "session"] = Field(
        "ranking", description="ranking: click models on interactions (a retrieval model.type makes it a retrieval "
        "run); retrieval: top-k retrieval, by default a competition of the deep and classical retrieval types "
        "(model.candidates); session: next-item prediction (session:)"
    )
    seed: int = 42
    runs_dir: Path = Path("runs")
    run_name: Optional[str] = Field(None, description="default: a timestamp")
    data: DataConfig = Field(default_factory=DataConfig)
    columns: ColumnsConfig = Field(default_factory=ColumnsConfig)
    validation: ValidationConfig = Field(default_factory=ValidationConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    etl: EtlConfig = Field(default_factory=EtlConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    gate: GateConfig = Field(default_factory=GateConfig)
    evaluation: EvaluationConfig = Field(default_factory=EvaluationConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    serving: ServingConfig = Field(default_factory=ServingConfig)
    session: SessionConfig = Field(default_factory=SessionConfig)
    tune: TuneConfig = Field(default_factory=TuneConfig)
    features: FeaturesConfig = Field(default_factory=FeaturesConfig)
    online: OnlineConfig = Field(default_factory=OnlineConfig)

    @model_validator(mode="after")
    def _feedback_split_by_time(self) -> "RunConfig":
        if self.online.retrain_on_feedback and self.split.method != "time":
            raise ValueError("online.retrain_on_feedback needs split.method: time (the newest feedback is the test set)")
        if self.online.retrain_on_feedback and self.task == "session":
            raise ValueError("online.retrain_on_feedback works for task ranking or retrieval, not session")
        return self

    @model_validator(mode="after")
    def _tune_space_fits_the_model(self) -> "RunConfig":
        if self.tune.enabled and self.task == "session":
            raise ValueError("tune applies to task: ranking (ranking and retrieval models), not task: session")
        if self.tune.enabled and isinstance(self.model.candidates, list) and len(self.model.candidates) > 1:
            raise ValueError("tune searches one model.type: set tune.enabled: false or give no model.candidates")
        if self.tune.enabled and self.model.scores_history:
            section = "model.autoencoder" if self.model.type in AUTOENCODER_MODELS else "model.classical"
            raise ValueError(f"tune applies to the deep models with a search space (docs/tuning.md), not model.type "
                             f"'{self.model.type}' (set {section}'s parameters directly)")
        bad = [k for k in self.tune.space if k not in TUNABLE[self.model.type]]
        if bad:
            raise ValueError(f"tune.space: {', '.join(repr(k) for k in bad)} is not a tunable parameter of "
                             f"model.type '{self.model.type}' (tunable: {', '.join(TUNABLE[self.model.type])})")
        return self

    @model_validator(mode="after")
    def _history_needs_time(self) -> "RunConfig":
        if self.etl.history.enabled and self.task == "ranking" and not self.model.is_retrieval \
                and not self.columns.timestamp:
            raise ValueError("etl.history.enabled needs columns.timestamp (the features come from strictly earlier "
                             "events of the user): name the timestamp column or turn etl.history off")
        return self

    @model_validator(mode="after")
    def _session_sources(self) -> "RunConfig":
        if self.task == "session" and self.data.source == "movielens100k":
            raise ValueError("task: session reads data.source synthetic, parquet or files")
        return self

    @model_validator(mode="after")
    def _gate_metric_fits_the_model(self) -> "RunConfig":
        if self.serving.dynamic_batching.enabled and (self.model.is_retrieval or self.task == "session"):
            raise ValueError("serving.dynamic_batching applies to ranking models only (retrieval and session "
                             "models are served one request per call)")
        m = self.gate.metric
        if m != "auto":
            allowed = RETRIEVAL_METRICS if self.model.is_retrieval else RANKING_METRICS
            if m not in allowed:
                raise ValueError(f"gate.metric '{m}' does not apply to model.type '{self.model.type}' (use one of {allowed})")
        return self

    @model_validator(mode="after")
    def _resolve_candidates(self) -> "RunConfig":
        """Turn ``task: retrieval`` / ``task: session`` defaults and ``'auto'`` into explicit candidate lists
        (saved so in the run's config.yaml); see :func:`default_candidate_types`."""
        m, explicit_type = self.model, "type" in self.model.model_fields_set
        if self.task == "retrieval" and not explicit_type:
            if isinstance(m.candidates, list):
                m.type = m.candidates[0].type  # type: ignore[assignment]  # validated by the candidate's config
            else:
                m.type, m.candidates = DEFAULT_RETRIEVAL_MODEL, m.candidates or "auto"  # type: ignore[assignment]
        elif isinstance(m.candidates, list) and not explicit_type:
            m.type = m.candidates[0].type  # type: ignore[assignment]  # validated by the candidate's config
        if self.task == "retrieval" and not m.is_retrieval:
            raise ValueError(f"task: retrieval needs a retrieval model.type ({', '.join(RETRIEVAL_MODELS)}), "
                             f"got '{m.type}'")
        if isinstance(m.candidates, list) and (m.candidates[0].type in RETRIEVAL_MODELS) != m.is_retrieval:
            raise ValueError(f"model.candidates ({[c.type for c in m.candidates]}) and model.type '{m.type}' belong "
                             "to different families (ranking / retrieval)")
        if m.candidates == "auto":
            m.candidates = [CandidateSpec(type=t) for t in default_candidate_types(self.family, m.type)]
        s = self.session.model
        if self.task == "session" and s.candidates is None and "type" not in s.model_fields_set:
            s.candidates = "auto"
        if s.candidates == "auto":
            s.candidates = [CandidateSpec(type=t) for t in default_candidate_types("session", s.type)]
        return self

    @property
    def candidates(self) -> Optional[list[CandidateSpec]]:
        """The resolved candidate list of this run's family (None: a single-model run)."""
        c = self.session.model.candidates if self.task == "session" else self.model.candidates
        return c if isinstance(c, list) else None

    @property
    def unknown_users(self) -> str:
        """``model.retrieval.unknown_users`` with ``auto`` resolved: ``popular`` when the query tower
        sees nothing but the user id (its embedding of an unseen id was never trained), else ``model``."""
        u = self.model.retrieval.unknown_users
        if u != "auto":
            return u
        query_features = [f for f in self.columns.features if f.side != FeatureSide.item]
        alone = self.model.type in ("mf",) + CLASSICAL_MODELS + AUTOENCODER_MODELS \
            or (self.model.type == "two_tower" and not query_features)
        return "popular" if alone else "model"

    @property
    def family(self) -> Literal["ranking", "retrieval", "session"]:
        """The task family this run belongs to, the one switch ``pipeline_lib.families.get_family`` reads:
        ``task: session`` -> session; otherwise ``model.type`` picks ranking or retrieval (and two-stage)."""
        if self.task == "session":
            return "session"
        return "retrieval" if self.model.is_retrieval or self.task == "retrieval" else "ranking"

    @property
    def gate_metric(self) -> str:
        if self.gate.metric != "auto":
            return self.gate.metric
        return "recall" if self.model.is_retrieval else "auc"


def load_config(path: Optional[Path | str] = None, overrides: Optional[dict] = None) -> RunConfig:
    """Load a YAML config (or the embedded default when ``path`` is None) and apply overrides.

    ``overrides`` is a nested dict merged over the file's content, e.g.
    ``{"data": {"synthetic": {"n_interactions": 5000}}}``.
    """
    raw: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise FileNotFoundError(f"config file not found: {p}")
        raw = yaml.safe_load(p.read_text()) or {}
        if not isinstance(raw, dict):
            raise ValueError(f"config file {p} must hold a mapping at top level")
    if overrides:
        raw = _deep_merge(raw, overrides)
    return RunConfig.model_validate(raw)


def _deep_merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        if isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = _deep_merge(out[k], v)
        else:
            out[k] = v
    return out


def parse_set_options(items: list[str]) -> dict:
    """Turn ``["a.b=1", "c=x"]`` (CLI ``--set``) into a nested dict with YAML-typed values."""
    out: dict = {}
    for item in items:
        if "=" not in item:
            raise ValueError(f"--set expects KEY=VALUE, got '{item}'")
        key, value = item.split("=", 1)
        node = out
        parts = key.strip().split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = yaml.safe_load(value)
    return out
