"""The feature snapshot of a session version (docs/sessions.md, "Feature store"): the item features of the training
sessions' items, so a session request may send only its item ids (and timestamps) and the served model looks the
item feature lists up by id (:class:`pipeline_lib.features.lookup.ItemLookup`). There is no user in a session
request: the snapshot holds no users (the store's user view stays empty) and ``cold_start`` is not answered.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd

from pipeline_lib.export.staging import StagedVersion
from pipeline_lib.export.topk import TOPK_DIR
from pipeline_lib.features.snapshot import META_FILE, Snapshot, snapshot_dir, write_tables

UNKNOWN_STRING = "__unknown_item__"  # an item the store does not hold: a value outside every vocabulary
UNKNOWN_INT = -1


def item_table(sessions: pd.DataFrame, item_id: str, features: list[str]) -> pd.DataFrame:
    """One row per item of the sessions (lists per row): each feature as on the item's last event, by item id."""
    events = pd.DataFrame({c: [v for row in sessions[c] for v in row] for c in [item_id, *features]})
    return events.drop_duplicates(item_id, keep="last").sort_values(item_id, kind="stable").reset_index(drop=True)


def _unknown(dtype: np.dtype):
    return UNKNOWN_INT if np.dtype(dtype).kind in "iu" else (float("nan") if np.dtype(dtype).kind == "f" else UNKNOWN_STRING)


def write_session_snapshot(staged: StagedVersion, raw_train: Path, columns) -> Snapshot:
    """``<N>/topk/features/`` of a session version from its raw training sessions (``columns``: the run's
    ``SessionColumns``); the item features of its requests become optional inputs (:func:`allow_item_lookup`)."""
    art = staged.version_dir / TOPK_DIR
    request = json.loads((art / "spec.json").read_text())["request_columns"]
    features = [c for c in columns.item_features if c in request]
    sessions = pd.read_parquet(raw_train, columns=[columns.session_id, columns.item_id, *features])
    items = item_table(sessions, columns.item_id, features)
    out = snapshot_dir(art)
    out.mkdir(parents=True, exist_ok=True)
    digest = write_tables(out, sessions[[columns.session_id]].head(0), items)
    snap = Snapshot(id=digest, user_id=columns.session_id, item_id=columns.item_id, user_columns=[], list_columns=[],
                    item_columns=features, dtypes={c: str(items[c].dtype) for c in items.columns}
                    | {columns.session_id: str(sessions[columns.session_id].dtype)},
                    item_defaults={c: _unknown(items[c].dtype) for c in features}, n_users=0, n_items=len(items))
    (out / META_FILE).write_text(json.dumps(asdict(snap), indent=2, default=str))
    allow_item_lookup(staged.config_path, features)
    return snap


def allow_item_lookup(config_path: Path, features: list[str]) -> None:
    """Rewrite a session version's ``config.pbtxt``: the item feature list inputs optional."""
    import tritonclient.grpc.model_config_pb2 as mc
    from google.protobuf import text_format

    cfg = text_format.Parse(Path(config_path).read_text(), mc.ModelConfig())
    names = {f"{c}__{part}" for c in features for part in ("values", "offsets")}
    for inp in cfg.input:
        if inp.name in names:
            inp.optional = True
    Path(config_path).write_text(text_format.MessageToString(cfg))
