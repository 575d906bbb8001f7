"""The one interface every task family implements (ranking, retrieval / two-stage, session).

A family knows its own rules -- which raw data it reads, how it is validated and transformed
(which features the ETL adds), what it trains and against which baselines, how a version is
exported, what the smoke test sends and compares, how the gate scores a version and which metrics
head the summary. ``flows/`` only wires these steps into Prefect tasks; the stages themselves are the
stage modules below (``data`` < ``validate`` < ``etl`` < ``models`` < ``export`` < ``serving`` < ``release``).

The steps, in run order::

    raw_data -> validate -> etl -> [tune] -> train [-> train_ranker] -> export -> gate
             -> smoke (smoke_rows, offline_reference, serve_and_compare) -> publish -> promote

The generic parts (drift, the ETL cache key, the gate around ``gate_scorer``, publish, promote)
are written once here; a family fills in the abstract methods.
"""
from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, ClassVar, Optional

import pandas as pd

from pipeline_lib import report
from pipeline_lib.config import ModelConfig, RunConfig
from pipeline_lib.export.ranking import StagedVersion
from pipeline_lib.features.stage import fill_store, restore
from pipeline_lib.features.store import FeatureStoreError
from pipeline_lib.models import evaluation, intervals
from pipeline_lib.paths import RunPaths
from pipeline_lib.release import gate, lineage
from pipeline_lib.serving import repository
from pipeline_lib.serving import server as serving
from pipeline_lib.validate import data as validate

SCORE = ("score", report.SCORE_COLUMNS)  # served HTTP = served gRPC = offline: one column in tables


@dataclass
class Validated:
    stats: Path               # validated/stats.json
    warnings: list[str]       # data the run accepts but the user should look at
    drift: dict               # validate.drift_report against the previous run


@dataclass
class Trained:
    """The train stage's output: the model (``model_dir``, ``metrics``, ``metrics_path``), its
    baselines on the same split and, for two-stage retrieval, the re-ranking model."""

    model: Any
    baselines: evaluation.BaselineReport
    ranker: Any = None


@dataclass
class ServedReport:
    """What a run shows of the smoke test's served answers."""

    table: pd.DataFrame       # the run summary's ``predictions``
    artifact: list[dict]      # the ``served-predictions`` table artifact
    description: str
    console: str              # printed at the end of the run


class TaskFamily(ABC):
    """One task family for one run config. Construct with :func:`pipeline_lib.families.get_family`."""

    name: ClassVar[str]
    title: ClassVar[str] = "recsys pipeline run"

    def __init__(self, cfg: RunConfig):
        self.cfg = cfg

    # -- raw -> validated -------------------------------------------------------------------------
    @abstractmethod
    def raw_data(self, paths: RunPaths) -> Path:
        """Write (or read) the run's raw data under ``paths.raw``; returns its path."""

    @abstractmethod
    def check_raw(self, paths: RunPaths, raw_path: Path) -> tuple[Path, list[str]]:
        """Validate the raw data (``DataValidationError`` when unusable); returns stats.json and warnings."""

    def validate(self, paths: RunPaths, raw_path: Path) -> Validated:
        """:meth:`check_raw`, then the statistics compared with the previous run's (drift)."""
        stats, warnings = self.check_raw(paths, raw_path)
        drift = validate.drift_report(stats, self.cfg.runs_dir, paths.root, self.cfg.validation.drift,
                                      paths.validated / "drift.json")
        return Validated(stats, list(warnings), drift)

    # -> transformed ----------------------------------------------------------------------------
    @abstractmethod
    def etl_inputs(self) -> dict:
        """Everything besides the raw data and the code that the ETL output depends on (the cache key)."""

    @abstractmethod
    def etl(self, paths: RunPaths, raw_path: Path) -> Any:
        """Split, fit and transform; the output has ``workflow_dir``, ``device`` and ``split`` (raw train/valid)."""

    def etl_cache_key(self, raw_path: Path) -> str:
        """Same raw data (content hash) + same ETL inputs + same ETL code and packages -> the same ETL output.
        The code is the hash of the ETL's source files and package versions
        (:func:`~pipeline_lib.release.lineage.etl_code_fingerprint`), not the git commit: an uncommitted edit
        and an image without ``.git`` invalidate it too. Where the ETL runs (``etl.dask``) does not change
        its output and is not part of it."""
        return f"etl-{self.name}-" + lineage.config_fingerprint({
            "data": lineage.file_fingerprint(raw_path), "inputs": self.etl_inputs(),
            "code": lineage.etl_code_fingerprint()})

    # -> model --------------------------------------------------------------------------------
    @property
    def tunable(self) -> bool:
        """Whether this run searches hyperparameters before training (``tune.enabled``)."""
        return False

    def tune(self, paths: RunPaths, etl_out: Any) -> Any:
        raise NotImplementedError(f"the {self.name} family has no tune stage")

    def with_model(self, model: ModelConfig) -> "TaskFamily":
        """The same family for the run config with ``model`` (e.g. the best tuning trial)."""
        return type(self)(self.cfg.model_copy(update={"model": model}))

    def with_config(self, cfg: RunConfig) -> "TaskFamily":
        """The same family for another run config (a candidate's: :mod:`pipeline_lib.families.candidates`)."""
        return type(self)(cfg)

    @property
    def selection_metric(self) -> str:
        """The key of the trained model's (validation) metrics that candidates compete on, higher is better."""
        return self.gate_metric

    def selection_score(self, trained: Trained) -> float:
        return float(trained.model.metrics[self.selection_metric])

    def selection_interval(self, trained: Trained, etl_out: Any) -> Optional[tuple[float, float]]:
        """The 95% confidence interval of :meth:`selection_score` on the validation split (the leaderboard's
        error bar); None: not computed (the protocol's bootstrap plugs in here)."""
        return None

    def latency_probe(self, paths: RunPaths, etl_out: Any, trained: Trained) -> Optional[Callable[[pd.DataFrame], Any]]:
        """A callable that scores request rows offline with ``trained`` (the leaderboard's latency); this
        default stages the candidate under ``paths.ensemble`` (parity on 8 rows) and calls
        :meth:`offline_reference` on it. None: not measured."""
        cfg = self.cfg
        small = self.with_config(cfg.model_copy(update={"export": cfg.export.model_copy(
            update={"parity_rows": min(8, cfg.export.parity_rows), "compiled_model": "off"})}))
        exp = small.export(paths, etl_out, trained)
        return lambda rows: small.offline_reference(etl_out, exp, rows)

    @abstractmethod
    def train(self, paths: RunPaths, etl_out: Any) -> Trained:
        """Train the model and score the family's baselines on the same split."""

    @property
    def has_ranker(self) -> bool:
        """Two-stage: a re-ranking model is trained after the retrieval model."""
        return False

    def train_ranker(self, paths: RunPaths, etl_out: Any) -> Any:
        raise NotImplementedError(f"the {self.name} family has no re-ranker")

    def learning_curves(self, trained: Trained) -> list[tuple[str, Optional[Path]]]:
        """(title, metrics.json path) of each trained model: their learning_curve.png is shown."""
        return [(self.model_label(trained), trained.model.metrics_path)]

    def model_label(self, trained: Trained) -> str:
        return self.cfg.model.type

    # -> staged version -----------------------------------------------------------------------
    @abstractmethod
    def export(self, paths: RunPaths, etl_out: Any, trained: Trained) -> StagedVersion:
        """Stage version 1 under ``paths.ensemble`` (checked against offline); publish numbers it."""

    def run_info(self, paths: RunPaths, trained: Trained) -> dict:
        return {"run_dir": str(paths.root), "metrics": trained.model.metrics}

    # smoke test: served == offline -----------------------------------------------------------
    @abstractmethod
    def smoke_rows(self, etl_out: Any, n: int) -> pd.DataFrame:
        """``n`` held-out raw requests, as a client sends them."""

    @abstractmethod
    def offline_reference(self, etl_out: Any, exp: StagedVersion, rows: pd.DataFrame) -> Any:
        """What the version must answer for ``rows``: the training-time path (workflow + model)."""

    @abstractmethod
    def serve_and_compare(self, paths: RunPaths, exp: StagedVersion, rows: pd.DataFrame, offline: Any) -> Any:
        """Serve the staged repository with Triton, send ``rows`` over HTTP and gRPC, compare with ``offline``."""

    def smoke(self, paths: RunPaths, etl_out: Any, exp: StagedVersion) -> Any:
        rows = self.smoke_rows(etl_out, self.cfg.serving.smoke_rows)
        return self.serve_and_compare(paths, exp, rows, self.offline_reference(etl_out, exp, rows))

    # gate ------------------------------------------------------------------------------------
    @property
    @abstractmethod
    def gate_metric(self) -> str:
        """The key of :meth:`gate_scorer`'s metrics that the gate compares."""

    def gate_rows(self, etl_out: Any) -> pd.DataFrame:
        """The held-out raw rows every version is scored on (``gate.max_rows`` of the test split)."""
        return pd.read_parquet(etl_out.split.test).head(self.cfg.gate.max_rows)

    def split_report(self, etl_out: Any) -> dict:
        """Sizes of the train / validation / test split (rows or sessions, and positive labels) and
        ``warnings`` naming a held-out split too small to mean much (``evaluation.min_positives`` /
        ``min_units``)."""
        e, label = self.cfg.evaluation, self.cfg.columns.label
        out: dict = {"method": self.cfg.split.method, "valid_fraction": self.cfg.split.valid_fraction,
                     "test_fraction": self.cfg.split.test_fraction}
        warnings: list[str] = []
        for name, what in (("train", "training split"), ("valid", "validation split"), ("test", "test split")):
            path = getattr(etl_out.split, name, None)
            if path is None or not Path(path).is_file():
                continue
            df = pd.read_parquet(path)
            if self.name == "session":
                out[name] = {"sessions": int(len(df))}
                w = None if name == "train" else intervals.too_small(what, len(df), e.min_units, "sessions")
            else:
                pos = int((pd.to_numeric(df[label], errors="coerce") > 0).sum()) if label in df.columns else 0
                out[name] = {"rows": int(len(df)), "positives": pos}
                w = None if name == "train" else intervals.too_small(what, pos, e.min_positives, "positive labels")
            if w:
                warnings.append(w)
        out["warnings"] = warnings
        return out

    @abstractmethod
    def gate_scorer(self, etl_out: Any, exp: Optional[StagedVersion] = None) -> gate.Scorer:
        """How a version (candidate or served) is scored on this run's held-out data; ``exp``: the staged
        candidate, whose in-process parts export already loaded (a family may score it with them)."""

    def gate(self, paths: RunPaths, etl_out: Any, exp: StagedVersion,
             baselines: Optional[evaluation.BaselineReport]) -> gate.GateDecision:
        """The one promotion gate (:func:`pipeline_lib.release.gate.decide`) on the test split, saved as gate.json."""
        cfg = self.cfg
        repo, name = cfg.export.model_repository, cfg.export.model_name
        served = repository.served_version(repo, name)
        served_dir = Path(repo) / name / str(served) if served else None
        if not cfg.gate.enabled:
            decision = gate.GateDecision(True, self.gate_metric, float("nan"), None, served, cfg.gate.tolerance, 0,
                                         "gate disabled (gate.enabled: false)", outcome="promoted")
        else:
            small = [w for w in self.split_report(etl_out)["warnings"] if w.startswith("the test split")]
            decision = gate.decide(exp.version_dir, served_dir, served, self.gate_scorer(etl_out, exp),
                                   self.gate_metric, cfg.gate.tolerance, gate.baseline_args(cfg.gate, baselines),
                                   gate.GateOptions.from_config(cfg), small)
        decision.save(paths.root / "gate.json")
        return decision

    # publish and promote ---------------------------------------------------------------------
    def publish(self, paths: RunPaths, raw_path: Path, etl_out: Any, trained: Trained,
                exp: StagedVersion) -> tuple[int, Path, dict]:
        """Copy the staged version into the model repository with its lineage; returns (version, dir, lineage)."""
        ranker = getattr(trained, "ranker", None)  # a two-stage version's re-ranker: fingerprinted too
        info = lineage.build_lineage(paths.root, raw_path, self.cfg.model_dump(mode="json"), etl_out.workflow_dir,
                                     trained.model.model_dir, trained.model.metrics,
                                     {"ranker": ranker.model_dir} if ranker is not None else None)
        version, path = repository.publish(exp.version_dir, exp.config_path, self.cfg.export.model_repository,
                                           exp.model_name, info)
        return version, path, info

    def promote(self, version: int) -> dict:
        """Serve ``version``; a Triton started by ``recsys serve`` (explicit mode) switches without restart."""
        cfg = self.cfg
        live = serving.live_server(cfg.serving) if cfg.serving.notify_live_server else None
        event = repository.promote(cfg.export.model_repository, cfg.export.model_name, version, live,
                                   cfg.serving.instance_count)
        event["pruned"] = repository.prune(cfg.export.model_repository, cfg.export.model_name, cfg.export.keep_versions)
        return event

    def features(self, version: int, previous: Optional[int] = None) -> Optional[dict]:
        """After promotion: the served ``version``'s feature snapshot into the model's feature store (user-id
        requests); None when the version has none (classical session versions, ``features.enabled`` off). When the
        store cannot be written (Redis down), ``version`` must not stay served beside another version's features:
        ``previous`` (served before this run) serves again, and the :class:`FeatureStoreError` says so."""
        try:
            return fill_store(self.cfg, version)
        except FeatureStoreError as exc:
            raise FeatureStoreError(f"{exc}. {self.step_back(version, previous)}") from exc

    def step_back(self, version: int, previous: Optional[int]) -> str:
        """Serve ``previous`` again after ``version``'s features could not be stored, and put its features back where
        the store allows; returns what is served now (for the run's error)."""
        cfg = self.cfg
        repo, model = cfg.export.model_repository, cfg.export.model_name
        if previous is None or previous == version:
            return (f"Nothing was served before this run: version {version} serves full-feature requests; its user-id "
                    f"requests answer 503 until `recsys features` fills the store")
        live = serving.live_server(cfg.serving) if cfg.serving.notify_live_server else None
        try:
            repository.promote(repo, model, previous, live, cfg.serving.instance_count, reason="rollback")
        except Exception as exc:  # noqa: BLE001 - said in the run's error
            return (f"Going back to version {previous} failed too ({type(exc).__name__}: {exc}): version {version} "
                    f"still serves; its user-id requests answer 503 until `recsys features` fills the store")
        try:
            restore(repo, model, previous)
            kept = "its features rewritten"
        except Exception as exc:  # noqa: BLE001 - the store is still out of reach
            kept = (f"its features could not be rewritten either ({type(exc).__name__}); the store still holds them "
                    f"unless the failed write got part-way: run `recsys features` once the store is back")
        return f"Version {version} is not served: version {previous} serves again ({kept})"

    # the run's summary -----------------------------------------------------------------------
    @abstractmethod
    def headline_metrics(self, trained: Trained) -> dict:
        """The model's metrics that head the summary: the test split (``trained.baselines.model``)."""

    @abstractmethod
    def validation_metrics(self, trained: Trained) -> dict:
        """The model's figures on the validation split (what early stopping and tuning saw), labelled so."""

    def metric_intervals(self, trained: Trained) -> dict:
        """``{metric: "0.812 [0.801, 0.823]"}`` of the headline (test) metrics that have an interval."""
        b = trained.baselines
        return {m: t for m in self.headline_metrics(trained) if (t := b.interval_text("model", m))}

    def summary_fields(self, trained: Trained, exp: StagedVersion) -> dict:
        b = trained.baselines
        return {"model": self.model_label(trained), "metrics_split": b.split,
                "metrics": self.headline_metrics(trained), "intervals": self.metric_intervals(trained),
                "intervals_detail": b.intervals, "lift_interval": b.lift_interval,
                "validation_metrics": self.validation_metrics(trained)}

    def metrics_table(self, trained: Trained) -> tuple[list[dict], str]:
        """Rows and description of the ``metrics`` artifact: the model's test metrics (with their
        intervals) and its baselines', then the validation figures, labelled."""
        b = trained.baselines
        keep = ("auc", "logloss", "recall", "ndcg", "mrr")
        rows = [{"metric": f"{b.split} {m}", "value": b.interval_text("model", m) or report.num(v)}
                for m, v in self.headline_metrics(trained).items() if not isinstance(v, (dict, list))]
        rows += [{"metric": f"baseline {name}: {b.split} {m}", "value": b.interval_text(name, m) or report.num(v)}
                 for name, r in b.baselines.items() for m, v in r.items()
                 if m == "skipped" or m.split("@")[0] in keep]
        rows += [{"metric": "lift over the best baseline", "value": b.lift}]
        rows += [{"metric": f"validation {m}", "value": report.num(v)}
                 for m, v in self.validation_metrics(trained).items() if not isinstance(v, (dict, list))]
        return rows, (f"{b.split} metrics of this run's model and its baselines with {self.cfg.evaluation.confidence:.0%} "
                      "intervals (bootstrap), then the validation figures (4 significant digits)")

    def served_fields(self, result: Any) -> dict:
        return {"max_abs_diff_served_vs_offline": result.max_abs_diff}

    @abstractmethod
    def served_report(self, result: Any, rows: pd.DataFrame, summary: dict) -> ServedReport:
        """The smoke test's served answers for ``rows`` as a table, an artifact and a console line."""
