"""A classical version's served model starts without TensorFlow.

The top-k ``model.py`` of every version imports :mod:`pipeline_lib.export.recommenders`; for EASE,
item-kNN, session-kNN and sequential rules nothing on that path may import TensorFlow, merlin-systems or
NVTabular, or a crashed stub takes ~15 s instead of ~1 s to come back (measured by ``make robustness``).
Checked in a fresh interpreter, since this test session has imported them already.
"""
import json
import subprocess
import sys

HEAVY = ("tensorflow", "merlin.systems", "merlin.models", "nvtabular")


def _imported_after(module: str) -> dict:
    code = (f"import json, sys; import {module}; "
            f"print(json.dumps({{m: m in sys.modules for m in {list(HEAVY)!r}}}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_served_topk_path_imports_no_tensorflow():
    for module in ("pipeline_lib.export.recommenders", "pipeline_lib.export.topk", "pipeline_lib.validate.requests",
                   "pipeline_lib.serving.bytes_tensor"):
        assert _imported_after(module) == {m: False for m in HEAVY}, module


def test_ranking_export_still_reexports_the_staging_names():
    from pipeline_lib.export import ranking, staging

    for name in ("ExportOptions", "StagedVersion", "raw_to_columns"):
        assert getattr(ranking, name) is getattr(staging, name)
