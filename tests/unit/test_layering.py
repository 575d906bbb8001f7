"""The import-linter contracts (pyproject.toml, run by ``make check`` in .ci/run) cover every stage.

``make check`` itself is not run here (CI runs it); this test keeps a new stage package or top-level
module from escaping the layering contract, which import-linter would only notice for ``exhaustive``
containers it knows about.
"""
from __future__ import annotations

import re
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGE = ROOT / "pipeline_lib"


def _contracts() -> dict[str, dict]:
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert set(config["root_packages"]) >= {"pipeline_lib", "flows"}
    return {c["id"]: c for c in config["contracts"]}


def _stages_on_disk(package: Path = PACKAGE) -> set[str]:
    """The children of pipeline_lib: packages (folders with __init__.py) and top-level modules."""
    packages = {p.parent.name for p in package.glob("*/__init__.py")}
    modules = {p.stem for p in package.glob("*.py") if p.stem != "__init__"}
    return packages | modules


def _layer_names(layers: list[str]) -> list[set[str]]:
    return [set(filter(None, re.split(r"\s*[:|]\s*", layer.strip()))) for layer in layers]


def test_the_layers_contract_lists_every_stage_once_in_the_documented_order():
    stages = _contracts()["stages"]
    assert stages["type"] == "layers" and stages["containers"] == ["pipeline_lib"] and stages["exhaustive"]
    layers = _layer_names(stages["layers"])
    listed = [name for layer in layers for name in layer]
    assert len(listed) == len(set(listed)), f"a stage is listed twice: {listed}"
    on_disk = _stages_on_disk()
    assert set(listed) == on_disk, (f"not in the contract: {sorted(on_disk - set(listed))}; "
                                    f"in the contract but not in pipeline_lib/: {sorted(set(listed) - on_disk)}")
    # docs/architecture.md: the stage packages from the bottom layer up (the contract lists the top first)
    packages = [next(iter(layer)) for layer in reversed(layers) if len(layer) == 1]
    assert packages == ["data", "validate", "etl", "models", "export", "features", "online", "serving", "release",
                        "families"]
    assert layers[-1] == on_disk - set(packages), "the bottom layer holds the top-level modules"


def test_cycles_and_prefect_are_checked_for_the_whole_package():
    contracts = _contracts()
    assert contracts["no-cycles"]["type"] == "acyclic_siblings"
    assert contracts["no-cycles"]["ancestors"] == ["pipeline_lib"]
    forbidden = contracts["no-prefect"]
    assert forbidden["type"] == "forbidden" and forbidden["source_modules"] == ["pipeline_lib"]
    assert set(forbidden["forbidden_modules"]) >= {"prefect", "flows"}


def test_a_new_stage_package_or_module_would_be_reported(tmp_path):
    """What the first test compares sees a package or module the contract does not list (a copy of the
    tree's layout with one new package and one new top-level module)."""
    fake = tmp_path / "pipeline_lib"
    (fake / "newstage").mkdir(parents=True)
    (fake / "newstage" / "__init__.py").touch()
    (fake / "helpers.py").touch()
    (fake / "notapackage").mkdir()  # a folder without __init__.py (data, caches) is no stage
    for name in _stages_on_disk():
        if (PACKAGE / f"{name}.py").exists():
            (fake / f"{name}.py").touch()
        else:
            (fake / name).mkdir()
            (fake / name / "__init__.py").touch()
    listed = {n for layer in _layer_names(_contracts()["stages"]["layers"]) for n in layer}
    assert _stages_on_disk(fake) - listed == {"newstage", "helpers"}
