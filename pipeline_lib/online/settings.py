"""Where the online loop's files live, from a run's config (``online:``): impressions, feedback, reports."""
from __future__ import annotations

from pathlib import Path

from pipeline_lib.config import RunConfig
from pipeline_lib.online import impressions


def online_root(cfg: RunConfig) -> Path:
    return Path(cfg.runs_dir) / "online"


def impressions_dir(cfg: RunConfig) -> Path:
    """``online.impressions.path`` (default ``<runs_dir>/online/impressions``)."""
    return Path(cfg.online.impressions.path or online_root(cfg) / "impressions")


def feedback_dir(cfg: RunConfig) -> Path:
    """``online.feedback_path`` (default ``<runs_dir>/online/feedback``)."""
    return Path(cfg.online.feedback_path or online_root(cfg) / "feedback")


def reports_dir(cfg: RunConfig) -> Path:
    """``online.reports_path`` (default ``<runs_dir>/online/reports``)."""
    return Path(cfg.online.reports_path or online_root(cfg) / "reports")


def user_columns(cfg: RunConfig) -> list[str]:
    """The request columns that name the user (the user-id seam): configured, else the run's user / session id."""
    return list(cfg.online.impressions.user_columns) or [cfg.columns.user_id, cfg.session.columns.session_id]


def server_env(cfg: RunConfig) -> dict[str, str]:
    """Environment for a Triton whose served models log impressions ({} when ``online.impressions`` is off)."""
    imp = cfg.online.impressions
    if not imp.enabled:
        return {}
    return impressions.server_env(impressions_dir(cfg), imp.flush_seconds, user_columns(cfg), cfg.columns.item_id)
