"""docs/configuration.md is current with RunConfig, and the markdown links of the docs resolve."""
from __future__ import annotations

import re
import unicodedata
from pathlib import Path

import pytest

from pipeline_lib import config_docs
from pipeline_lib.config import RunConfig
from tests.support import ROOT

DOC = ROOT / "docs" / "configuration.md"


def _leaf_paths(node: dict, defs: dict, prefix: str = "") -> list[str]:
    """Every leaf key of the JSON schema, walked here independently of the renderer."""
    out = []
    for name, prop in node.get("properties", {}).items():
        key = f"{prefix}.{name}" if prefix else name
        options = [o for o in prop.get("anyOf", [prop]) if o.get("type") != "null"]
        target = options[0] if len(options) == 1 else {}
        suffix = ""
        if target.get("type") == "array" and "$ref" in target.get("items", {}):
            target, suffix = target["items"], "[]"
        ref = target.get("$ref")
        child = defs[ref.split("/")[-1]] if ref else {}
        if "properties" in child:
            out += _leaf_paths(child, defs, key + suffix)
        else:
            out.append(key)
    return out


def test_configuration_doc_is_current():
    committed = DOC.read_text() if DOC.is_file() else ""
    assert committed == config_docs.render(), (
        f"docs/configuration.md is out of date with pipeline_lib/config.py; regenerate it with:\n"
        f"    {config_docs.REGENERATE}"
    )
    assert config_docs.main(["--check"]) == 0


def test_every_leaf_field_is_documented():
    schema = RunConfig.model_json_schema()
    leaves = _leaf_paths(schema, schema["$defs"])
    assert len(leaves) > 100 and "model.retrieval.k" in leaves and "columns.features[].kind" in leaves
    text = DOC.read_text()
    rows = {m.group(1) for m in re.finditer(r"^\| `([^`]+)` \|", text, re.M)}
    missing = [leaf for leaf in leaves if leaf not in rows]
    assert not missing, f"not in docs/configuration.md: {missing}; regenerate: {config_docs.REGENERATE}"
    assert rows == set(leaves), f"documented keys that RunConfig lacks: {sorted(rows - set(leaves))}"


def test_rendered_rows_carry_defaults_constraints_and_descriptions():
    text = config_docs.render()
    assert "| `model.retrieval.k` | integer | `10` | ≥ 1 | items returned per request" in text
    assert "| `model.type` | string | `dlrm` | `dlrm` \\| `dcn` \\|" in text
    assert "| `model.bottom_mlp` | list of integer | `[64, 16]` |" in text
    assert "| `data.interactions.path` | string | required |" in text
    assert "| `data.interactions.rename` | mapping of string to string | `{}` |" in text
    assert "- {name: item_price, kind: continuous, side: item, log: true}" in text
    assert "Promotion gate" in text  # a class docstring as section text
    assert text == config_docs.render()  # deterministic


def _markdown_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "CHANGELOG.md", ROOT / "benchmarks" / "README.md"]
    return [f for f in files if f.is_file()] + sorted((ROOT / "docs").glob("*.md"))


def _slug(heading: str) -> str:
    """GitHub's heading anchor: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"<[^>]+>", "", heading).strip().lower()
    text = "".join(c for c in text if c in " -_" or unicodedata.category(c)[0] in "LN")
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    text = path.read_text()
    text = re.sub(r"```.*?```", "", text, flags=re.S)
    anchors = set(re.findall(r'<a id="([^"]+)">', text))
    anchors |= {_slug(h) for h in re.findall(r"^#+ (.+)$", text, re.M)}
    return anchors


_LINK = re.compile(r"(?<!!)\[[^\]]*\]\(([^)\s]+)\)")


@pytest.mark.parametrize("md", _markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_resolve(md: Path):
    text = re.sub(r"```.*?```", "", md.read_text(), flags=re.S)
    broken = []
    for target in _LINK.findall(text):
        if re.match(r"[a-z]+:", target):
            continue  # http(s), mailto
        file_part, _, fragment = target.partition("#")
        dest = (md.parent / file_part).resolve() if file_part else md
        if not dest.exists():
            broken.append(target)
            continue
        if fragment and dest.suffix == ".md" and fragment not in _anchors(dest):
            broken.append(target)
    assert not broken, f"{md.relative_to(ROOT)}: links that do not resolve: {broken}"


def _doc_text() -> str:
    return "\n".join(p.read_text() for p in [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))])


def test_recsys_commands_in_the_docs_exist():
    """Every `recsys <command> --option` shown in README.md and docs/ is a real command and option."""
    import typer.main

    from flows.cli import app

    group = typer.main.get_command(app)
    shown = re.findall(r"\brecsys ((?:[a-z][a-z-]*)(?:[ \t]+[^\s#`|)]+)*)", _doc_text())
    assert len(shown) > 20
    wrong = []
    for line in shown:
        words = line.split()
        command = group.commands.get(words[0])
        if command is None:
            wrong.append(line)
            continue
        options = {o for p in command.params for o in p.opts}
        wrong += [f"{line}  ({w})" for w in words[1:] if w.startswith("-") and w.lstrip("[") not in options]
    assert not wrong, f"commands shown in the docs that `recsys` does not have: {wrong}"


def test_make_targets_configs_and_modules_in_the_docs_exist():
    import importlib.util

    from pipeline_lib.config import load_config

    text = _doc_text()
    targets = set(re.findall(r"^([a-z]+):", (ROOT / "Makefile").read_text(), re.M))
    shown = set(re.findall(r"(?:^|`)make ([a-z]+)\b", text, re.M))  # in code, not in prose
    assert {"run", "test"} <= shown and shown <= targets, f"make targets not in the Makefile: {shown - targets}"
    configs = set(re.findall(r"\b(configs/[\w/.-]+\.yaml)\b", text))
    assert "configs/examples/session.yaml" in configs
    for cfg in sorted(configs):
        load_config(ROOT / cfg)  # exists and validates
    for module in sorted(set(re.findall(r"python -m ([\w.]+)", text))):
        assert importlib.util.find_spec(module) is not None, f"python -m {module}: no such module"
