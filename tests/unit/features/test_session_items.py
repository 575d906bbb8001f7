"""A session version's item-feature snapshot in a real Feast store (SQLite): written from raw training sessions,
materialized without users, read back by item id per event (repeats, unknown items), the store's version checked.
No Triton (served: tests/integration/test_sessions.py)."""
import json

import numpy as np
import pandas as pd
import pytest

from pipeline_lib.config import SessionColumns
from pipeline_lib.export.staging import StagedVersion
from pipeline_lib.features import snapshot, store
from pipeline_lib.features.lookup import ItemLookup
from pipeline_lib.features.sessions import UNKNOWN_INT, write_session_snapshot

COLS = SessionColumns()
CONFIG = "\n".join(f'input {{ name: "{c}__{p}" data_type: TYPE_INT64 dims: -1 }}'
                   for c in ("item_id", "item_category", "timestamp") for p in ("values", "offsets"))


def _staged(tmp_path, sessions: pd.DataFrame) -> StagedVersion:
    staged = StagedVersion(tmp_path / "staged", "m", 1)
    art = staged.version_dir / "topk"
    art.mkdir(parents=True)
    (art / "spec.json").write_text(json.dumps({"request_columns": ["item_id", "item_category", "timestamp"]}))
    staged.config_path.write_text(CONFIG)
    sessions.to_parquet(tmp_path / "train.parquet")
    write_session_snapshot(staged, tmp_path / "train.parquet", COLS)
    return staged


def test_item_features_are_looked_up_per_event_by_item_id(tmp_path):
    sessions = pd.DataFrame({"session_id": [1, 2], "item_id": [[10, 11, 10], [12, 11]],
                             "item_category": [[3, 4, 5], [6, 7]], "timestamp": [[1, 2, 3], [4, 5]]})
    staged = _staged(tmp_path, sessions)
    art = staged.version_dir / "topk"
    snap = snapshot.Snapshot.load(snapshot.snapshot_dir(art))
    assert snap.item_columns == ["item_category"] and snap.n_users == 0 and snap.n_items == 3
    assert "optional: true" in staged.config_path.read_text()  # the item feature lists, not the ids
    settings = store.StoreSettings(tmp_path / "fs" / "m")
    assert store.materialize(settings, art, 1)["items"] == 3
    (tmp_path / "m").mkdir()
    store.write_pointer(tmp_path / "m", settings)
    lookup = ItemLookup(art, tmp_path / "m")
    arrays = {"item_id__values": np.array([10, 12, 99, 10], dtype=np.int64),
              "item_id__offsets": np.array([0, 3, 4], dtype=np.int32)}
    out = lookup.complete_items(arrays, ["item_category"])
    # each item's value on its last training event; an unknown item gets the out-of-vocabulary value
    assert out["item_category__values"].tolist() == [5, 6, UNKNOWN_INT, 5]
    assert out["item_category__offsets"].tolist() == [0, 3, 4]
    # another version's snapshot in the store: refused (UNAVAILABLE), never its features
    other = _staged(tmp_path / "v2", sessions.assign(item_category=[[1, 1, 1], [1, 1]]))
    store.materialize(settings, other.version_dir / "topk", 2)
    with pytest.raises(store.FeatureStoreError, match="holds version 2's features"):
        lookup.complete_items(arrays, ["item_category"])
