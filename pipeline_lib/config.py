"""One validated configuration describes a whole run.

A user brings new data by writing YAML that validates against :class:`RunConfig`;
the embedded default (``RunConfig()``) generates synthetic interaction logs.
"""
from __future__ import annotations

from enum import Enum
from pathlib import Path
from typing import Literal, Optional

import yaml
from pydantic import BaseModel, ConfigDict, Field, model_validator


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

    @model_validator(mode="after")
    def _log_only_for_continuous(self) -> "FeatureSpec":
        if self.log and self.kind != FeatureKind.continuous:
            raise ValueError(f"feature '{self.name}': 'log' applies to continuous features only")
        return self


class ColumnsConfig(_Strict):
    """Column roles of the interaction table."""

    user_id: str = "user_id"
    item_id: str = "item_id"
    label: str = "click"
    timestamp: Optional[str] = "timestamp"
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
        return self

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
    popularity_skew: float = Field(1.1, gt=0, description="Zipf exponent of item exposure")
    days: int = Field(30, ge=1)


class DataConfig(_Strict):
    source: Literal["synthetic", "parquet"] = "synthetic"
    path: Optional[Path] = Field(None, description="parquet file or directory when source=parquet")
    synthetic: SyntheticConfig = Field(default_factory=SyntheticConfig)

    @model_validator(mode="after")
    def _path_when_files(self) -> "DataConfig":
        if self.source != "synthetic" and self.path is None:
            raise ValueError("data.path is required when data.source is not 'synthetic'")
        return self


class SplitConfig(_Strict):
    method: Literal["random", "time"] = "random"
    valid_fraction: float = Field(0.2, gt=0, lt=1)


class EtlConfig(_Strict):
    device: Literal["auto", "cpu", "gpu"] = Field(
        "auto", description="auto = GPU (cudf + dask-cuda) when a GPU is visible, else CPU"
    )
    part_size: str = Field("256MB", description="NVTabular partition size")


class ModelConfig(_Strict):
    type: Literal["dlrm"] = "dlrm"
    embedding_dim: int = Field(16, ge=2)
    bottom_mlp: list[int] = Field(default_factory=lambda: [64, 16])
    top_mlp: list[int] = Field(default_factory=lambda: [64, 32])
    optimizer: Literal["adam", "adagrad", "sgd"] = "adam"
    learning_rate: float = Field(3e-3, gt=0)
    batch_size: int = Field(1024, ge=1)
    epochs: int = Field(2, ge=1)

    @model_validator(mode="after")
    def _dlrm_bottom_matches_embeddings(self) -> "ModelConfig":
        if not self.bottom_mlp:
            raise ValueError("bottom_mlp needs at least one layer")
        if self.type == "dlrm" and self.bottom_mlp[-1] != self.embedding_dim:
            raise ValueError(
                f"DLRM: the last bottom_mlp layer ({self.bottom_mlp[-1]}) must equal embedding_dim ({self.embedding_dim})"
            )
        return self


class ExportConfig(_Strict):
    model_repository: Path = Path("model_repository")
    model_name: str = Field("recsys", pattern=r"^[A-Za-z0-9_\-]+$")
    parity_rows: int = Field(256, ge=1, description="rows checked in-process before writing the ensemble")
    parity_atol: float = 1e-5
    keep_versions: int = Field(5, ge=1, description="retention: newest versions kept (the served one always is)")
    max_request_rows: int = Field(65536, ge=1, description="served requests with more rows get a clear error")


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
    admin_api_key: Optional[str] = Field(
        None, description="restrict Triton's model-repository API (load/unload) to requests with this key; "
        "default: env RECSYS_ADMIN_KEY"
    )
    notify_live_server: bool = Field(True, description="after a promotion, switch a Triton running at host:http_port")
    smoke_rows: int = Field(8, ge=1, description="raw rows sent in the end-of-run smoke test")
    smoke_atol: float = 1e-5


class RunConfig(_Strict):
    seed: int = 42
    runs_dir: Path = Path("runs")
    run_name: Optional[str] = Field(None, description="default: a timestamp")
    data: DataConfig = Field(default_factory=DataConfig)
    columns: ColumnsConfig = Field(default_factory=ColumnsConfig)
    split: SplitConfig = Field(default_factory=SplitConfig)
    etl: EtlConfig = Field(default_factory=EtlConfig)
    model: ModelConfig = Field(default_factory=ModelConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    serving: ServingConfig = Field(default_factory=ServingConfig)


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
