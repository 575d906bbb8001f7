"""Every top-k recommender by spec.json's ``kind``, and the one way to open a version's ``topk/`` folder
(the served ``model.py``, the gate and the tools read versions of any top-k kind through it)."""
from __future__ import annotations

import json
from pathlib import Path

from pipeline_lib.export.classical import ClassicalRecommender
from pipeline_lib.export.session import SessionRecommender
from pipeline_lib.export.session_classical import ClassicalSessionRecommender
from pipeline_lib.export.topk import TopKRecommender, TopKRoute

RECOMMENDERS: dict[str, type[TopKRoute]] = {cls.kind: cls for cls in (TopKRecommender, SessionRecommender,
                                                                       ClassicalRecommender, ClassicalSessionRecommender)}


def recommender_kind(artifact_dir: Path) -> type[TopKRoute]:
    """The recommender class of a version's ``topk/`` folder (spec.json's ``kind``; ``retrieval`` when absent)."""
    kind = json.loads((Path(artifact_dir) / "spec.json").read_text()).get("kind", TopKRecommender.kind)
    if kind not in RECOMMENDERS:
        raise ValueError(f"{artifact_dir}: unknown top-k kind '{kind}' (known: {sorted(RECOMMENDERS)})")
    return RECOMMENDERS[kind]


def open_recommender(artifact_dir: Path) -> TopKRoute:
    """The recommender of a version's ``topk/`` folder, whatever its kind."""
    return recommender_kind(artifact_dir)(artifact_dir)
