"""docs/configuration.md, rendered from the config schema (``RouterConfig``'s JSON schema).

One table per section (key, type, default, constraints, description), then the
``[[backends]]`` table. A key whose value is itself a table (``[listener.tls]``,
``[backends.tls]``) gets a section of its own after its parent's. Everything in it comes from
``router.core.config``: the section docstrings, each field's ``description``, type, default
and range. So the page cannot drift from the code: ``tests/test_config_reference.py`` fails
when the committed file differs from ``render()``, and ``make docs`` (``python -m router
config-reference --output ...``) regenerates it. Pure: no I/O here.
"""

from __future__ import annotations

import json
from typing import Any

from router.core.config import MAX_DURATION_S, RouterConfig

Schema = dict[str, Any]

INTRO = f"""\
<!-- Generated from router/core/config.py by `make docs`; edit the schema, not this file. -->
# Configuration reference

The router reads one TOML file (`inference-router serve --config FILE`; validate one with
`inference-router check-config FILE`); command-line flags of `serve` override it
(`inference-router serve --help`). Every key is optional except a backend's `address`. The
tables below give each key's type, default, allowed range and meaning, section by section;
[`examples/router.toml`](../examples/router.toml) lists every key at its default.

Durations are in seconds (their names end in `_s`): greater than 0, at most
{MAX_DURATION_S:.0f} (one day). Numbers must be finite, and types are strict: `true` is not an
integer, `"5"` is not a number. The TCP, gRPC and admin listeners need distinct addresses
(port 0, "any free port", never collides; a wildcard host such as `0.0.0.0` collides with
every host on its port), and a backend address other than port 0 may appear once. Unknown keys
are errors. Every problem is reported at once, each with its key path and file.
"""


def _literal(value: Any) -> str:
    """A value as TOML spells it."""
    if value is None:
        return "unset"
    return f"`{json.dumps(value)}`"


def _type(prop: Schema) -> str:
    if "enum" in prop:
        return " | ".join(_literal(v) for v in prop["enum"])
    if "const" in prop:
        return _literal(prop["const"])
    if "anyOf" in prop:
        kinds = [_type(p) for p in prop["anyOf"] if p.get("type") != "null"]
        return " or ".join(kinds)
    kind = prop.get("type")
    if kind == "array":
        return f"list of {_type(prop.get('items', {}))}"
    if kind == "string" and "format" in prop:
        return str(prop["format"])
    names = {"integer": "integer", "number": "float", "boolean": "bool", "string": "string"}
    return names.get(str(kind), str(kind))


def _number(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else str(value)


def _constraints(prop: Schema) -> str:
    bounds = [("exclusiveMinimum", ">"), ("minimum", "≥"), ("maximum", "≤"),
              ("exclusiveMaximum", "<")]
    found = [f"{sign} {_number(prop[key])}" for key, sign in bounds if key in prop]
    return ", ".join(found)


def _cell(text: str) -> str:
    return text.replace("``", "`").replace("|", "\\|").replace("\n", " ")


def _nested_ref(prop: Schema) -> str | None:
    """The model a key's value is, when it is a table of its own (optional or not)."""
    for candidate in (prop, *prop.get("anyOf", ())):
        if "$ref" in candidate:
            return str(candidate["$ref"])
    return None


def _table(section: Schema) -> list[str]:
    required = set(section.get("required", ()))
    lines = ["| key | type | default | constraints | description |",
             "|---|---|---|---|---|"]
    for key, prop in section["properties"].items():
        if _nested_ref(prop) is not None:
            continue  # a table of its own, rendered after this one
        default = "required" if key in required else _literal(prop.get("default"))
        row = [f"`{key}`", _cell(_type(prop)), default, _constraints(prop),
               _cell(prop.get("description", ""))]
        lines.append("| " + " | ".join(row) + " |")
    return lines


def _section_def(schema: Schema, prop: Schema) -> Schema:
    ref = _nested_ref(prop) or prop.get("items", {}).get("$ref")
    if ref is None:
        raise ValueError(f"config section without a model: {prop}")
    definition: Schema = schema["$defs"][ref.rsplit("/", 1)[1]]
    return definition


def render() -> str:
    """The whole of docs/configuration.md."""
    schema = RouterConfig.model_json_schema()
    out = [INTRO]
    for name, prop in schema["properties"].items():
        header = f"[[{name}]]" if prop.get("type") == "array" else f"[{name}]"
        out += _section(schema, _section_def(schema, prop), header, name, "")
    return "\n".join(out)


def _section(schema: Schema, section: Schema, header: str, path: str, intro: str) -> list[str]:
    """A section's heading, text and table, then each of its nested tables' sections."""
    text = " ".join(t for t in (intro, _cell(section.get("description", ""))) if t)
    out = [f"## `{header}`\n", text + "\n", "\n".join(_table(section)) + "\n"]
    for key, prop in section["properties"].items():
        if _nested_ref(prop) is not None:
            nested = f"{path}.{key}"
            intro = _cell(prop.get("description", ""))
            out += _section(schema, _section_def(schema, prop), f"[{nested}]", nested, intro)
    return out
