"""Published versions keep loading across refactors: what they refer to by module path stays importable.

A version folder holds its own copy of the served ``model.py`` (imports from ``pipeline_lib``) and pickles
that reference project classes; a refactor that moves one of those names breaks every version published
before it. tests/fixtures/served_api.txt records them; here: every recorded name resolves today, and the
current model.py templates import nothing unrecorded (the pickles: test_repository.py)."""
import ast
import importlib
from pathlib import Path

from pipeline_lib.paths import TRITON_MODELS
from tests.support import ROOT

API_FILE = ROOT / "tests" / "fixtures" / "served_api.txt"


def recorded_api() -> set[str]:
    return {line.strip() for line in API_FILE.read_text().splitlines() if line.strip() and not line.startswith("#")}


def resolves(ref: str) -> bool:
    """``module:name`` imports today (an attribute of the module, or a submodule)."""
    module, name = ref.split(":")
    try:
        mod = importlib.import_module(module)
    except ImportError:
        return False
    return hasattr(mod, name) or importlib.util.find_spec(f"{module}.{name}") is not None


def template_imports(path: Path) -> set[str]:
    """``module:name`` of every ``from pipeline_lib... import name`` in a served model.py template."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("pipeline_lib"):
            out |= {f"{node.module}:{a.name}" for a in node.names}
    return out


def test_every_name_a_published_version_refers_to_still_resolves():
    missing = sorted(ref for ref in recorded_api() if not resolves(ref))
    assert not missing, f"moved or removed, published versions import them (keep a re-export): {missing}"


def test_the_served_model_templates_import_only_recorded_names():
    templates = sorted(TRITON_MODELS.glob("*.py"))
    assert {t.name for t in templates} >= {"ranking.py", "topk.py"}
    used = set().union(*(template_imports(t) for t in templates))
    assert used, "no pipeline_lib import found: the check would prove nothing"
    unrecorded = sorted(used - recorded_api())
    assert not unrecorded, f"record these in {API_FILE.name} (published versions will import them): {unrecorded}"
