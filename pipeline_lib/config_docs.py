"""Render ``docs/configuration.md`` from ``RunConfig``'s JSON schema.

Types, allowed values, constraints, descriptions (``Field(description=...)``) and section texts
(class docstrings) come from ``RunConfig.model_json_schema()``; defaults come from the embedded
default ``RunConfig()`` (the schema omits ``default_factory`` values). The output is deterministic
(declaration order), so a test can compare it with the committed file.

    uv run --frozen --no-sync python -m pipeline_lib.config_docs --write   # docs/configuration.md
    uv run --frozen --no-sync python -m pipeline_lib.config_docs           # to stdout
    uv run --frozen --no-sync python -m pipeline_lib.config_docs --check   # exit 1 when out of date
"""
from __future__ import annotations

import argparse
import json
import re
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, get_args

from pydantic import BaseModel

from pipeline_lib.config import RunConfig

DOC_PATH = Path(__file__).resolve().parent.parent / "docs" / "configuration.md"
REGENERATE = "uv run --frozen --no-sync python -m pipeline_lib.config_docs --write"
_MISSING = object()

_HEADER = f"""# Configuration reference

<!-- Generated from RunConfig (pipeline_lib/config.py); do not edit by hand. Regenerate with:
     {REGENERATE} -->

One pydantic model, `RunConfig` in `pipeline_lib/config.py`, describes a run. Give it as YAML
(`recsys run --config my.yaml`) and/or as overrides (`--set model.epochs=3`, repeatable; the value is
parsed as YAML). Keys you leave out take the defaults below. `configs/default.yaml` writes the
embedded default out (all but `task` and the `session:` section; a test keeps it equal to
`RunConfig()`), and `configs/examples/` has one file per kind of data.
Unknown keys are rejected, and so are values outside the allowed ones, each error naming the key.
Checks across keys (for example `data.path` is required for `data.source: parquet`, `gate.metric`
must fit `model.type`) live in the validators of `pipeline_lib/config.py`.

This page is generated from the model's JSON schema and field descriptions, so it is exactly what
the code accepts. Type `X or null` means the key may be left empty (`null`).
"""


@dataclass
class Section:
    """One nested model: its key path, its text and its leaf rows."""

    path: str
    text: str = ""
    rows: list[tuple[str, str, str, str, str]] = field(default_factory=list)
    default_block: Optional[str] = None


def _resolve(node: dict, defs: dict) -> dict:
    """Follow a ``$ref`` (and ``allOf: [$ref]``) to its definition, keeping the node's own keys."""
    ref = node.get("$ref") or (node.get("allOf") or [{}])[0].get("$ref")
    if not ref:
        return node
    target = dict(defs[ref.split("/")[-1]])
    target.update({k: v for k, v in node.items() if k not in ("$ref", "allOf", "description", "title")})
    return target


def _split_null(node: dict, defs: dict) -> tuple[dict, bool]:
    """``anyOf: [X, null]`` -> (X, True); anything else -> (node, False)."""
    options = node.get("anyOf")
    if not options:
        return _resolve(node, defs), False
    kept = [o for o in options if o.get("type") != "null"]
    nullable = len(kept) < len(options)
    inner = dict(_resolve(kept[0], defs)) if len(kept) == 1 else {"anyOf": kept}
    inner.update({k: v for k, v in node.items() if k not in ("anyOf", "description", "title")})
    return inner, nullable


def _is_object(node: dict) -> bool:
    return node.get("type") == "object" and "properties" in node


def _type_name(node: dict, defs: dict) -> str:
    node, nullable = _split_null(node, defs)
    if "anyOf" in node:
        name = " or ".join(_type_name(o, defs) for o in node["anyOf"])
    elif node.get("type") == "array":
        name = "list of " + _type_name(node.get("items", {}), defs)
    elif node.get("type") == "object":
        extra = node.get("additionalProperties")
        name = "mapping of string to " + _type_name(extra, defs) if isinstance(extra, dict) else "mapping"
    elif node.get("format") == "path":
        name = "path"
    else:
        name = node.get("type", "any")
    return f"{name} or null" if nullable else name


_BOUNDS = (("minimum", "≥"), ("exclusiveMinimum", ">"), ("maximum", "≤"), ("exclusiveMaximum", "<"))


def _allowed(node: dict, defs: dict) -> str:
    node, _ = _split_null(node, defs)
    if node.get("type") == "array":
        inner = _allowed(node.get("items", {}), defs)
        return f"each: {inner}" if inner else ""
    parts = []
    if "enum" in node:
        parts.append(" \\| ".join(f"`{v}`" for v in node["enum"]))
    parts += [f"{sign} {_fmt_scalar(node[key])}" for key, sign in _BOUNDS if key in node]
    if "minLength" in node:
        parts.append(f"at least {node['minLength']} character(s)")
    if "pattern" in node:
        parts.append(f"matches `{node['pattern']}`")
    return ", ".join(parts)


def _fmt_scalar(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    return json.dumps(value) if not isinstance(value, str) else value


def _fmt_default(value: Any) -> str:
    if value is _MISSING:
        return "required"
    if isinstance(value, str):
        return f"`{value}`" if value else '`""`'
    return f"`{json.dumps(value, ensure_ascii=False)}`"


def _cell(text: str) -> str:
    return " ".join(text.split()).replace("|", "\\|")


def _models(cls: type[BaseModel], found: Optional[dict] = None) -> dict[str, type[BaseModel]]:
    """Every pydantic model reachable from ``cls`` by its fields, by class name (= schema title)."""
    found = {} if found is None else found
    found[cls.__name__] = cls
    for info in cls.model_fields.values():
        stack = [info.annotation]
        while stack:
            tp = stack.pop()
            if isinstance(tp, type) and issubclass(tp, BaseModel) and tp.__name__ not in found:
                _models(tp, found)
            stack.extend(get_args(tp))
    return found


def _default_of(cls: Optional[type[BaseModel]], name: str, prop: dict) -> Any:
    """The default of one key (``default_factory`` called), JSON-like; ``_MISSING`` when required."""
    if cls is None or name not in cls.model_fields:  # a renamed model or an alias: the schema's default
        return prop.get("default", _MISSING)
    info = cls.model_fields[name]
    if info.is_required():
        return _MISSING
    value = info.get_default(call_default_factory=True)
    if isinstance(value, list) and value and isinstance(value[0], BaseModel):
        return [v.model_dump(mode="json", exclude_defaults=True) for v in value]
    if isinstance(value, BaseModel):
        return value.model_dump(mode="json")
    return json.loads(json.dumps(value, default=str))


def _list_block(items: list[dict]) -> str:
    lines = ["```yaml"]
    lines += ["- {" + ", ".join(f"{k}: {_fmt_scalar(v)}" for k, v in item.items()) + "}" for item in items]
    return "\n".join(lines + ["```"])


def _rst_to_md(text: str) -> str:
    """Docstrings use reST literals and roles; the page is markdown."""
    return re.sub(r":(?:func|class|meth|mod):`", "`", text.replace("``", "`"))


@dataclass
class _Ctx:
    defs: dict
    models: dict[str, type[BaseModel]]
    out: list[Section]
    list_defaults: dict[str, list] = field(default_factory=dict)


def _walk(path: str, node: dict, note: str, ctx: _Ctx) -> None:
    """Append the section of one object node, then (depth first) those of its nested objects."""
    cls = ctx.models.get(node.get("title", ""))
    text = "\n\n".join(part for part in (note, _rst_to_md(node.get("description", ""))) if part)
    section = Section(path=path, text=text)
    ctx.out.append(section)
    nested: list[tuple[str, dict, str]] = []
    for name, prop in node["properties"].items():
        key = f"{path}.{name}" if path else name
        inner, nullable = _split_null(prop, ctx.defs)
        default = _default_of(cls, name, prop)
        items = _resolve(inner.get("items", {}), ctx.defs) if inner.get("type") == "array" else {}
        own = prop.get("description", "")
        if _is_object(items):
            nested.append((key + "[]", items, _cell(f"A list; each entry has the keys below. {own}")))
            if isinstance(default, list) and default:
                ctx.list_defaults[key + "[]"] = default
        elif _is_object(inner):
            nested.append((key, inner, _cell(f"Optional: `null` (default) or a table with these keys. {own}")
                           if nullable else own))
        else:
            section.rows.append((f"`{key}`", _type_name(prop, ctx.defs), _fmt_default(default),
                                 _allowed(prop, ctx.defs), _cell(own)))
    for key, child, child_note in nested:
        start = len(ctx.out)
        _walk(key, child, child_note, ctx)
        default = ctx.list_defaults.get(key)
        if default:
            ctx.out[start].default_block = "Default:\n\n" + _list_block(default)


def sections() -> list[Section]:
    """Every section of the reference, in declaration order; the top-level keys come first."""
    schema = RunConfig.model_json_schema()
    ctx = _Ctx(defs=schema.get("$defs", {}), models=_models(RunConfig), out=[])
    _walk("", schema, "Top-level keys of `RunConfig`.", ctx)
    return ctx.out


def render() -> str:
    """The whole markdown page."""
    parts = [_HEADER]
    all_sections = sections()
    parts.append("Sections: " + ", ".join(f"[`{s.path or 'top level'}`](#{_anchor(s)})" for s in all_sections) + "\n")
    for s in all_sections:
        level = "##" if s.path.count(".") == 0 else "###"
        parts.append(f'{level} <a id="{_anchor(s)}"></a>`{s.path or "top level"}`\n')
        if s.text:
            parts.append(s.text.strip() + "\n")
        if s.default_block:
            parts.append(s.default_block + "\n")
        if s.rows:
            parts.append("| key | type | default | allowed | description |\n|---|---|---|---|---|")
            parts.append("\n".join("| " + " | ".join(row) + " |" for row in s.rows) + "\n")
    return "\n".join(parts).rstrip() + "\n"


def _anchor(section: Section) -> str:
    return "cfg-" + (section.path.replace(".", "-").replace("[]", "-item") or "top")


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description="Render the configuration reference from RunConfig.")
    parser.add_argument("--write", nargs="?", const=str(DOC_PATH), default=None, metavar="PATH",
                        help=f"write the page (default {DOC_PATH.name} in docs/) instead of printing it")
    parser.add_argument("--check", action="store_true", help="exit 1 when docs/configuration.md is not current")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        current = DOC_PATH.read_text() if DOC_PATH.is_file() else ""
        if current != text:
            print(f"{DOC_PATH} is out of date; regenerate it with: {REGENERATE}", file=sys.stderr)
            return 1
        return 0
    if args.write:
        Path(args.write).write_text(text)
        return 0
    sys.stdout.write(text)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
