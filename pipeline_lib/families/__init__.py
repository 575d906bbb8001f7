"""Task families: one interface (:class:`~pipeline_lib.families.base.TaskFamily`), three implementations.

``get_family(cfg)`` picks one by ``RunConfig.family`` (``task`` + ``model.type``). See docs/architecture.md.
"""
from __future__ import annotations

from pipeline_lib.config import RunConfig
from pipeline_lib.families.base import ServedReport, TaskFamily, Trained, Validated
from pipeline_lib.families.ranking import RankingFamily
from pipeline_lib.families.retrieval import RetrievalFamily
from pipeline_lib.families.session import SessionFamily

FAMILIES: dict[str, type[TaskFamily]] = {f.name: f for f in (RankingFamily, RetrievalFamily, SessionFamily)}

__all__ = ["FAMILIES", "RankingFamily", "RetrievalFamily", "ServedReport", "SessionFamily", "TaskFamily", "Trained",
           "Validated", "get_family"]


def get_family(cfg: RunConfig) -> TaskFamily:
    """The task family of ``cfg`` (``cfg.family``: ranking, retrieval or session)."""
    return FAMILIES[cfg.family](cfg)
