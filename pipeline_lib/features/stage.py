"""The ``features`` stage: after a promotion (and a rollback), the model's feature store gets the served version's
snapshot, so user-id requests are answered with the features of the version that serves them."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

from pipeline_lib.config import SESSION_CLASSICAL_TYPES
from pipeline_lib.export.topk import TOPK_DIR
from pipeline_lib.features.snapshot import has_snapshot
from pipeline_lib.features.store import (FeatureStoreError, StoreSettings, check_reachable, materialize, read_pointer,
                                         write_pointer)


RANKING_DIR = "ensemble"  # pipeline_lib.export.ranking.ENSEMBLE_SUBDIR (not imported: it loads merlin)


def version_artifacts(repo: Path, model: str, version: int) -> Path:
    """Where a published version keeps its snapshot: ``<repo>/<model>/<version>/topk`` (top-k) or ``.../ensemble``
    (ranking: the one that holds a snapshot)."""
    vdir = Path(repo) / model / str(version)
    return vdir / RANKING_DIR if has_snapshot(vdir / RANKING_DIR) else vdir / TOPK_DIR


def check_store(cfg) -> None:
    """Before a run: the Redis online store its ``features`` stage will write must answer (:class:`FeatureStoreError`
    naming it otherwise), so a run with Redis down fails in a second, not after training and promotion."""
    if cfg.features.enabled and cfg.features.online_store == "redis" and writes_snapshot(cfg):
        check_reachable(StoreSettings.from_config(cfg))


def writes_snapshot(cfg) -> bool:
    """Whether the run's version may keep a feature snapshot: every family but a session run whose candidates are all
    classical (session_knn / sequential_rules read no item features)."""
    if cfg.task != "session":
        return True
    m = cfg.session.model
    if m.candidates == "auto":
        return True
    types = [c.type for c in m.candidates] if isinstance(m.candidates, list) else [m.type]
    return any(t not in SESSION_CLASSICAL_TYPES for t in types)


def fill_store(cfg, version: int) -> Optional[dict]:
    """Materialize the promoted ``version``'s snapshot into the model's store (``features``) and point the served
    model at the store; None when features are off or the version has no snapshot (classical session versions)."""
    repo, model = Path(cfg.export.model_repository), cfg.export.model_name
    art = version_artifacts(repo, model, version)
    if not cfg.features.enabled or not has_snapshot(art):
        return None
    settings = StoreSettings.from_config(cfg)
    info = materialize(settings, art, version)
    write_pointer(repo / model, settings)
    return info


def check_restorable(repo: Path, model: str, version: int) -> None:
    """Before a rollback to ``version``: refuse it (:class:`FeatureStoreError`) when the model serves user-id requests
    from a store and ``version`` has no snapshot to restore (its users would get another version's features)."""
    if read_pointer(Path(repo) / model) is not None and not has_snapshot(version_artifacts(repo, model, version)):
        raise FeatureStoreError(
            f"version {version} of '{model}' has no feature snapshot (exported without features.enabled), but the "
            f"served model answers user-id requests from the feature store: rolling back would leave the store "
            f"with another version's features. Refused; promote a version with a snapshot instead")


def restore(repo: Path, model: str, version: int) -> Optional[dict]:
    """After a rollback to ``version``: put its snapshot back into the model's store (None: no store in use)."""
    settings = read_pointer(Path(repo) / model)
    if settings is None:
        return None
    return materialize(settings, version_artifacts(repo, model, version), version)
