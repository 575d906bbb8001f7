"""Optional stage between ETL and training: an Optuna search over the main hyperparameters.

One study per run (``tune:`` in the config, docs/tuning.md): a TPE sampler seeded by ``cfg.seed``
proposes values from :data:`pipeline_lib.config.SEARCH_SPACE` (the parameters of
``TUNABLE[model.type]``, with ``tune.space`` overrides); each trial trains on the ETL output's
training split and is scored by the gate metric on the validation split (AUC for ranking models,
recall@k for retrieval models; ``gate.metric`` when set). ``tune.n_trials`` and ``tune.timeout_s``
bound the study.

- Ranking trials train in memory (no SavedModel written) and report Keras' per-epoch validation
  AUC (or loss, for logloss) to a ``MedianPruner``, which stops trials that fall below the median
  of earlier trials at the same epoch. Their value is the exact AUC/logloss of the last epoch, as
  :func:`pipeline_lib.models.ranking.train` computes it.
- Retrieval trials run :func:`pipeline_lib.models.retrieval.train` (full-catalogue top-k after every
  epoch; value = the best epoch's metric, the epoch that training keeps). Its epoch loop has no
  hook, so their per-epoch values are recorded after the trial and they are not pruned.

Outputs in ``out_dir``: ``trials.csv`` (every trial: number, state, value, seconds, params, note),
``best_config.json`` (the best trial and the full ``model:`` section it implies) and
``history.png`` (the optimisation history). Training then uses :attr:`TuneResult.best_model`.
"""
from __future__ import annotations

import json
import logging
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, Optional

import optuna
import pandas as pd

from pipeline_lib import report
from pipeline_lib.config import SEARCH_SPACE, TUNABLE, ModelConfig, RunConfig
from pipeline_lib.etl.workflow import EtlOutput
from pipeline_lib.models import ranking as train
from pipeline_lib.models import retrieval
from pipeline_lib.models.common import import_tf, parquet_dataset

log = logging.getLogger(__name__)

TRIALS_CSV, BEST_JSON, HISTORY_PNG = "trials.csv", "best_config.json", "history.png"


@dataclass
class TuneResult:
    metric: str
    direction: str  # "maximize" | "minimize"
    best_trial: int
    best_value: float
    best_params: dict
    best_model: ModelConfig
    trials: pd.DataFrame  # one row per trial: number, state, value (pruned: last per-epoch value), seconds, <params>, note
    out_dir: Path
    seconds: float = 0.0

    @property
    def history_png(self) -> Path:
        return self.out_dir / HISTORY_PNG

    def summary(self) -> dict:
        """The figures the run summary shows (``summary["tune"]``)."""
        states = self.trials["state"].value_counts().to_dict()
        return {"metric": self.metric, "best_trial": self.best_trial, "best_value": self.best_value,
                "best_params": self.best_params, "n_trials": int(len(self.trials)),
                "completed": int(states.get("COMPLETE", 0)), "pruned": int(states.get("PRUNED", 0)),
                "failed": int(states.get("FAIL", 0)), "seconds": round(self.seconds, 1)}


def search_space(model_type: str, overrides: Optional[dict[str, list]] = None) -> dict[str, tuple[str, list, bool]]:
    """``{param: (kind, values, log)}`` searched for ``model_type``: the defaults, ``overrides`` replacing values."""
    overrides = overrides or {}
    unknown = sorted(set(overrides) - set(TUNABLE[model_type]))
    if unknown:
        raise ValueError(f"tune.space: {unknown} not tunable for '{model_type}' (tunable: {list(TUNABLE[model_type])})")
    return {name: (SEARCH_SPACE[name][0], list(overrides.get(name, SEARCH_SPACE[name][1])), SEARCH_SPACE[name][2])
            for name in TUNABLE[model_type]}


def suggest(trial, space: dict[str, tuple[str, list, bool]]) -> dict[str, Any]:
    """One value per parameter from an Optuna trial."""
    params: dict[str, Any] = {}
    for name, (kind, values, log_scale) in space.items():
        if kind == "float":
            params[name] = trial.suggest_float(name, float(values[0]), float(values[1]), log=log_scale)
        elif kind == "int":
            params[name] = trial.suggest_int(name, int(values[0]), int(values[1]), log=log_scale)
        else:
            params[name] = trial.suggest_categorical(name, list(values))
    return params


def apply_params(model: ModelConfig, params: dict[str, Any]) -> ModelConfig:
    """``model`` with the searched values set (validated again). mlp_width/depth -> top_mlp
    (width, width/2, ...); tower_width -> every retrieval.tower_mlp layer; DLRM's bottom_mlp ends
    at embedding_dim."""
    data = model.model_dump()
    for key in ("learning_rate", "embedding_dim", "batch_size", "epochs", "cross_depth"):
        if key in params:
            data[key] = params[key]
    for key in ("learning_rate", "epochs"):  # retrieval models read their own (model.retrieval.*) first
        if key in params and model.is_retrieval:
            data["retrieval"][key] = params[key]
    if "mlp_width" in params or "mlp_depth" in params:
        width = int(params.get("mlp_width", model.top_mlp[0]))
        data["top_mlp"] = [max(1, width >> i) for i in range(max(1, int(params.get("mlp_depth", len(model.top_mlp)))))]
    for key in ("logits_temperature", "num_sampled", "logq_correction"):
        if key in params:
            data["retrieval"][key] = params[key]
    if "tower_width" in params:
        data["retrieval"]["tower_mlp"] = [int(params["tower_width"])] * max(1, len(model.retrieval.tower_mlp))
    if "dlrm" in (model.type, model.retrieval.rerank_with):
        data["bottom_mlp"] = [*model.bottom_mlp[:-1], data["embedding_dim"]]
    return ModelConfig.model_validate(data)


def direction_of(metric: str) -> Literal["minimize", "maximize"]:
    return "minimize" if metric == "logloss" else "maximize"


def _pruning_callback(trial, monitor: str, prune: bool):
    """A Keras callback: report ``logs[monitor]`` per epoch to the trial; stop training when pruned."""
    class Report(import_tf().keras.callbacks.Callback):  # type: ignore[misc]  # TensorFlow is imported lazily
        pruned_at: Optional[int] = None

        def on_epoch_end(self, epoch, logs=None):
            value = (logs or {}).get(monitor)
            if value is None:
                return
            trial.report(float(value), epoch)
            if prune and trial.should_prune():
                self.pruned_at, self.model.stop_training = epoch + 1, True

    return Report()


def _ranking_trial(trial, cfg: RunConfig, mcfg: ModelConfig, etl_out: EtlOutput, metric: str) -> float:
    """Train a ranking model in memory; per-epoch validation figures feed the pruner."""
    import merlin.models.tf as mm

    import_tf().keras.utils.set_random_seed(cfg.seed)
    label = cfg.columns.label
    train_ds, valid_ds = parquet_dataset(etl_out.train_dir), parquet_dataset(etl_out.valid_dir)
    model = train.compiled_model(train_ds.schema, mcfg, label)
    reporter = _pruning_callback(trial, "val_auc" if metric == "auc" else "val_loss", cfg.tune.pruning)
    model.fit(mm.Loader(train_ds, batch_size=mcfg.batch_size, shuffle=True), epochs=mcfg.epochs, verbose=0,
              validation_data=mm.Loader(valid_ds, batch_size=mcfg.batch_size, shuffle=False), callbacks=[reporter])
    if reporter.pruned_at is not None:
        trial.set_user_attr("note", f"pruned after epoch {reporter.pruned_at}")
        raise optuna.TrialPruned()
    scores = train.predict_dataset(model, valid_ds, mcfg.batch_size)
    labels = valid_ds.to_ddf()[label].compute().to_numpy()
    return float(train.ranking_metrics(labels, scores)[metric])


def _retrieval_trial(trial, cfg: RunConfig, mcfg: ModelConfig, etl_out: EtlOutput, metric: str,
                     work_dir: Path) -> float:
    """Train a retrieval model (written to a scratch folder, removed after); value = best epoch's metric."""
    trial_dir = work_dir / f"trial-{trial.number}"
    try:
        out = retrieval.train(etl_out.workflow_dir, etl_out.train_dir, etl_out.split.train, etl_out.split.valid,
                              cfg.columns, mcfg, cfg.seed, trial_dir)
    finally:
        shutil.rmtree(trial_dir, ignore_errors=True)
    for epoch, value in enumerate(out.history.get(f"val_{metric}", [])):
        trial.report(float(value), epoch)  # recorded for the table/plot; this trial is already over
    return float(out.metrics[metric])


def _objective(cfg: RunConfig, etl_out: EtlOutput, space: dict, metric: str, work_dir: Path):
    def objective(trial) -> float:
        params = suggest(trial, space)
        try:
            mcfg = apply_params(cfg.model, params)
            if mcfg.is_retrieval:
                return _retrieval_trial(trial, cfg, mcfg, etl_out, metric, work_dir)
            return _ranking_trial(trial, cfg, mcfg, etl_out, metric)
        except optuna.TrialPruned:
            raise
        except Exception as exc:  # recorded as a FAIL trial with its reason; the study goes on
            trial.set_user_attr("note", f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            raise
        finally:
            import_tf().keras.backend.clear_session()  # free the trial's graph before the next one

    return objective


def _log_trial(n_trials: int, metric: str):
    def callback(study, trial) -> None:
        value = "-" if trial.value is None else report.num(trial.value)
        params = ", ".join(f"{k}={report.num(v)}" for k, v in trial.params.items())
        log.info("tune trial #%d (%d of at most %d) %s: %s %s (%s) %s", trial.number, trial.number + 1, n_trials,
                 trial.state.name.lower(), metric, value, params, trial.user_attrs.get("note", ""))

    return callback


def run_study(cfg: RunConfig, etl_out: EtlOutput, out_dir: Path) -> TuneResult:
    """Search ``cfg.model``'s hyperparameters within ``cfg.tune``'s budget; write trials.csv,
    best_config.json and history.png to ``out_dir``; return the best trial and its ModelConfig."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial comes from _log_trial
    t, metric = cfg.tune, cfg.gate_metric
    space = search_space(cfg.model.type, t.space)
    sampler = optuna.samplers.TPESampler(seed=cfg.seed, n_startup_trials=max(1, min(10, t.n_trials // 2)))
    pruner = optuna.pruners.MedianPruner(n_startup_trials=2, n_warmup_steps=1) if t.pruning else optuna.pruners.NopPruner()
    study = optuna.create_study(direction=direction_of(metric), sampler=sampler, pruner=pruner,
                                study_name=f"tune-{cfg.model.type}")
    out_dir.mkdir(parents=True, exist_ok=True)
    log.info("tune %s: up to %d trials%s, %s on the validation split, over %s", cfg.model.type, t.n_trials,
             f" or {t.timeout_s:g} s" if t.timeout_s else "", metric, ", ".join(space))
    t0 = time.perf_counter()
    study.optimize(_objective(cfg, etl_out, space, metric, out_dir), n_trials=t.n_trials, timeout=t.timeout_s,
                   catch=(Exception,), callbacks=[_log_trial(t.n_trials, metric)])
    seconds = time.perf_counter() - t0
    table = trials_table(study)
    if not (table["state"] == "COMPLETE").any():
        notes = "; ".join(f"#{r.number} {r.state}: {r.note}" for r in table.itertuples())
        raise RuntimeError(f"tune: no trial of {cfg.model.type} completed ({notes})")
    best = study.best_trial
    result = TuneResult(metric=metric, direction=direction_of(metric), best_trial=best.number,
                        best_value=float(best.value), best_params=dict(best.params),  # type: ignore[arg-type]
                        best_model=apply_params(cfg.model, best.params), trials=table, out_dir=out_dir,
                        seconds=seconds)
    save(result)
    log.info("tune: best trial #%d of %d: %s %s (%s)", best.number, len(table), metric, report.num(best.value),
             ", ".join(f"{k}={report.num(v)}" for k, v in best.params.items()))
    return result


def trials_table(study) -> pd.DataFrame:
    """Every trial of ``study``: number, state, value, seconds, best, its params, note (pruned/failed)."""
    best = study.best_trial.number if any(t.state.name == "COMPLETE" for t in study.trials) else None
    rows = []
    for t in study.trials:
        seconds = t.duration.total_seconds() if t.duration is not None else None
        rows.append({"number": t.number, "state": t.state.name, "value": t.value, "seconds": seconds,
                     "best": t.number == best, **t.params, "note": t.user_attrs.get("note", "")})
    return pd.DataFrame(rows)


def save(result: TuneResult) -> None:
    """trials.csv, best_config.json (its ``model`` key is a complete ``model:`` config section), history.png."""
    result.trials.to_csv(result.out_dir / TRIALS_CSV, index=False)
    best = {"metric": result.metric, "direction": result.direction, "best_trial": result.best_trial,
            "value": result.best_value, "params": result.best_params,
            "model": result.best_model.model_dump(mode="json")}
    (result.out_dir / BEST_JSON).write_text(json.dumps(best, indent=2))
    plot_history(result.trials, result.metric, result.direction, result.history_png,
                 f"{result.best_model.type}: best {result.metric} {report.num(result.best_value)} "
                 f"(trial #{result.best_trial})")


def plot_history(trials: pd.DataFrame, metric: str, direction: str, path: Path, title: str = "") -> Path:
    """The optimisation history as a PNG: each completed trial's value, the best so far, and
    pruned/failed trials marked along the bottom."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    done = trials[trials["state"] == "COMPLETE"].sort_values("number")
    values = done["value"].astype(float)
    best = values.cummax() if direction == "maximize" else values.cummin()
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(done["number"], values, "o", label=f"trial {metric}")
    last = int(trials["number"].max())  # the best-so-far line runs to the last trial
    ax.step([*done["number"], last], [*best, best.iloc[-1]], "-", where="post", color="C1", label="best so far")
    other = trials[trials["state"] != "COMPLETE"]
    if len(other):
        ax.plot(other["number"], [values.min()] * len(other), "x", color="grey", label="pruned / failed")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"validation {metric}")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_title(title, fontsize="medium")
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def history_markdown(result: TuneResult) -> str:
    """The ``tune-history`` artifact: the best trial and the optimisation-history PNG (data URI)."""
    s = result.summary()
    params = ", ".join(f"`{k}={report.num(v)}`" for k, v in result.best_params.items())
    return "\n".join([
        "# hyperparameter search", "",
        f"- best trial **#{result.best_trial}**: validation {result.metric} **{report.num(result.best_value)}** "
        f"({result.direction})",
        f"- params: {params}",
        f"- trials: {s['n_trials']} ({s['completed']} complete, {s['pruned']} pruned, {s['failed']} failed) "
        f"in {s['seconds']:.0f} s",
        f"- files: `{result.out_dir / TRIALS_CSV}`, `{result.out_dir / BEST_JSON}`", "",
        report.image_markdown(result.history_png, "optimisation history", f"`{result.history_png}`"),
    ])
