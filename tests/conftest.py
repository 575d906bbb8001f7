"""Shared fixtures: one small synthetic run (ETL + training) reused by the stage tests.

Everything here is real: NVTabular on CPU, Merlin Models/TensorFlow, merlin-systems, and the
tritonserver binary from the nvidia-pytriton wheel. No GPU exists on CI machines; the GPU path
is only checked for its selection logic (see test_etl.py).
"""
from __future__ import annotations

import os

import flows  # noqa: F401 - the project's Prefect defaults (start-up wait, storage under PREFECT_HOME) and known-harmless warning filters, before Prefect loads

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# Persisted task results (the ETL cache) live in a per-session folder: a test run never reuses
# results of an earlier session whose run folders pytest may have deleted.
import tempfile  # noqa: E402

os.environ["PREFECT_LOCAL_STORAGE_PATH"] = tempfile.mkdtemp(prefix="prefect-storage-")

from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from pipeline_lib.data import sources as data
from pipeline_lib.etl import workflow as etl
from pipeline_lib.models import ranking as train
from pipeline_lib.config import RunConfig, load_config

SMALL = {
    "data": {"synthetic": {"n_users": 300, "n_items": 150, "n_interactions": 6000}},
    "model": {"epochs": 1, "batch_size": 256, "retrieval": {"epochs": 1}},  # retrieval's own default is 20
    "export": {"parity_rows": 64},
    "serving": {"notify_live_server": False},  # never switch a server someone runs on the default port
    # a 1-epoch model on 6,000 interactions does not beat logistic regression: tests about other
    # things turn the gate's baseline requirement off (test_gate.py and test_flow.py check it on)
    "gate": {"require_beat_baseline": False},
}


def small_config(tmp: Path, **extra) -> RunConfig:
    over = {**SMALL, "runs_dir": str(tmp / "runs"), "export": {**SMALL["export"], "model_repository": str(tmp / "model_repository")}}
    for k, v in extra.items():
        over[k] = {**over.get(k, {}), **v} if isinstance(v, dict) else v
    return load_config(None, over)


@dataclass
class Trained:
    cfg: RunConfig
    root: Path
    raw: Path
    split: etl.SplitPaths
    etl: etl.EtlOutput
    model: train.TrainOutput

    def valid_rows(self, n: int) -> pd.DataFrame:
        return pd.read_parquet(self.split.valid).head(n)[self.cfg.columns.serving_columns].reset_index(drop=True)

    def publish(self, model_dir: Path, rows: pd.DataFrame, repo: Path, name: str, version: int, staging: Path):
        """Export ``model_dir`` with this run's workflow, publish it as ``name`` version ``version`` in
        ``repo`` (not promoted) and return its offline scores for ``rows``."""
        import nvtabular as nvt

        from pipeline_lib.export import ranking as export
        from pipeline_lib.serving import repository

        exp = export.export_ensemble(self.etl.workflow_dir, model_dir, rows, self.cfg.columns.label, staging, name, version)
        assert repository.publish(exp.version_dir, exp.config_path, repo, name)[0] == version
        return export.offline_scores(nvt.Workflow.load(str(self.etl.workflow_dir)), model_dir, rows, self.cfg.columns.label)


class RankingZoo(Mapping[str, train.TrainOutput]):
    """Ranking model type -> that model trained (1 epoch) on the shared small run, trained when first asked
    for: a worker trains each type once, for every test file that uses it, and none that no test uses."""

    KINDS = ("dlrm", "dcn", "deepfm", "wide_deep")

    def __init__(self, trained: Trained, tmp: Path):
        self.trained, self.tmp = trained, tmp
        self.models = {"dlrm": trained.model}

    def __getitem__(self, kind: str) -> train.TrainOutput:
        if kind not in self.KINDS:
            raise KeyError(kind)
        if kind not in self.models:
            t = self.trained
            cfg = t.cfg.model.model_copy(update={"type": kind, "epochs": 1})
            self.models[kind] = train.train(t.etl.train_dir, t.etl.valid_dir, cfg, "click", 0, self.tmp / kind)
        return self.models[kind]

    def __iter__(self) -> Iterator[str]:
        return iter(self.KINDS)

    def __len__(self) -> int:
        return len(self.KINDS)


@pytest.fixture(scope="session")
def prefect_harness():
    """One temporary Prefect API (its own SQLite database) for every in-process flow run of the session.

    The wait is the project's own start-up timeout: a fresh database is migrated on first start,
    which on a busy 2-core machine takes longer than Prefect's 20 s default.
    """
    from prefect.testing.utilities import prefect_test_harness

    from prefect.settings import PREFECT_API_URL

    with prefect_test_harness(server_startup_timeout=flows.EPHEMERAL_STARTUP_TIMEOUT_S):
        yield PREFECT_API_URL.value()  # its URL, for subprocesses that should report to it


@pytest.fixture(scope="session")
def trained(tmp_path_factory) -> Trained:
    root = tmp_path_factory.mktemp("trained")
    cfg = small_config(root)
    raw = data.write_raw(cfg.data, cfg.seed, root / "raw")
    split = etl.split_raw(raw, cfg.split, cfg.columns, cfg.seed, root / "split")
    etl_out = etl.fit_transform(cfg.columns, cfg.etl, split, root / "transformed")
    model = train.train(etl_out.train_dir, etl_out.valid_dir, cfg.model, cfg.columns.label, cfg.seed, root / "model")
    return Trained(cfg, root, raw, split, etl_out, model)


@pytest.fixture(scope="session")
def untrained(trained, tmp_path_factory) -> train.TrainOutput:
    """The shared run's model trained with a learning rate of 1e-9: a clearly worse model (the gate's
    tests) and a second version whose scores differ from `trained`'s (the promotion test)."""
    cfg = trained.cfg.model.model_copy(update={"learning_rate": 1e-9})
    return train.train(trained.etl.train_dir, trained.etl.valid_dir, cfg, "click", 3, tmp_path_factory.mktemp("untrained"))


@pytest.fixture(scope="session")
def exported(trained, tmp_path_factory):
    """The shared run exported once with the default options (the export stage's unit tests, the gate's)."""
    from pipeline_lib.export import ranking as export

    staging = tmp_path_factory.mktemp("export") / "ensemble"
    rows = trained.valid_rows(64)
    out = export.export_ensemble(trained.etl.workflow_dir, trained.model.model_dir, rows, "click",
                                 staging, "recsys", 1, export.ExportOptions(run_info={"run": "test"}))
    return out, rows


@pytest.fixture(scope="session")
def ranking_zoo(trained, tmp_path_factory) -> RankingZoo:
    """Every ranking model type trained on the shared small run (dlrm is `trained` itself), each on first use."""
    return RankingZoo(trained, tmp_path_factory.mktemp("zoo"))


@pytest.fixture(scope="session")
def small_split(tmp_path_factory):
    """The suite's small synthetic run, raw data split only (no training), in several row groups."""
    import pyarrow.parquet as pq

    root = tmp_path_factory.mktemp("split")
    cfg = small_config(root)
    raw = data.write_raw(cfg.data, cfg.seed, root / "raw")
    split = etl.split_raw(raw, cfg.split, cfg.columns, cfg.seed, root / "split")
    # small row groups: NVTabular partitions by row group, so the data spans several partitions
    for path in (split.train, split.valid):
        pq.write_table(pq.read_table(path), path, row_group_size=500)
    return cfg, split


@pytest.fixture(scope="session")
def session_etl(tmp_path_factory):
    """A small synthetic session log through the session ETL (task: session)."""
    from pipeline_lib.data import sessions as session_data
    from pipeline_lib.etl import sessions

    root = tmp_path_factory.mktemp("sess")
    cfg = load_config(None, {"task": "session", "session": {
        "synthetic": {"n_sessions": 3000, "n_items": 200, "n_categories": 10},
        "model": {"epochs": 3, "batch_size": 128}}})  # 3 epochs: still far above most-popular (test_session.py)
    raw = session_data.write_raw_events(cfg.data, cfg.session, cfg.seed, root / "raw")
    return cfg, root, sessions.run_session_etl(raw, cfg, root / "transformed", root / "split")
