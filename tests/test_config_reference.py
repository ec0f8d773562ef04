"""docs/configuration.md is generated from the config schema and must match it."""

from __future__ import annotations

import subprocess
import sys
import typing
from pathlib import Path

import pytest
from pydantic import BaseModel

from router.core.config import BackendConfig, InstanceConfig, ModelGroupConfig, RouterConfig
from router.core.config_reference import render

REPO_ROOT = Path(__file__).resolve().parent.parent
DOC = REPO_ROOT / "docs" / "configuration.md"


def _sections() -> list[tuple[str, type[BaseModel]]]:
    found: list[tuple[str, type[BaseModel]]] = []
    for name, info in RouterConfig.model_fields.items():
        arrays: dict[str, type[BaseModel]] = {"backends": BackendConfig,
                                              "instances": InstanceConfig,
                                              "model_groups": ModelGroupConfig}
        model = arrays.get(name) or type(info.default)
        assert issubclass(model, BaseModel), name
        found.append((name, model))
    return found


def _nested_model(annotation: object) -> type[BaseModel] | None:
    """The section model of a key whose value is a table (``ServerTlsConfig | None``)."""
    for candidate in (annotation, *typing.get_args(annotation)):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def test_the_committed_reference_is_what_the_schema_renders() -> None:
    assert DOC.read_text() == render(), "docs/configuration.md is stale: run `make docs`"


@pytest.mark.parametrize(("name", "model"), _sections())
def test_every_option_has_a_description_and_a_row(name: str, model: type[BaseModel]) -> None:
    text = render()
    arrays = ("backends", "instances", "model_groups")
    header = f"## `[[{name}]]`" if name in arrays else f"## `[{name}]`"
    assert header in text
    section = text.split(header, 1)[1].split("\n## ", 1)[0]
    assert model.__doc__
    assert " ".join(model.__doc__.replace("``", "`").split()) in " ".join(section.split())
    for key, field in model.model_fields.items():
        assert field.description and len(field.description) > 20, f"{name}.{key}"
        nested = _nested_model(field.annotation)
        if nested is not None:  # a table of its own: [listener.tls], with its own rows
            sub = text.split(f"## `[{name}.{key}]`", 1)[1].split("\n## ", 1)[0]
            assert " ".join(field.description.split()) in " ".join(sub.split())
            assert all(f"| `{k}` |" in sub for k in nested.model_fields), f"{name}.{key}"
            continue
        [row] = [line for line in section.splitlines() if line.startswith(f"| `{key}` |")]
        assert row.count(" | ") == 4, row  # key, type, default, constraints, description


def test_rows_carry_type_default_and_range() -> None:
    text = render()
    assert ("| `queue_size` | integer | `4096` | ≥ 1 | ") in text
    assert "| `queue_timeout_s` | float | `5.0` | > 0, ≤ 86400 | " in text
    assert '| `probe` | `"frame"` \\| `"connect"` | `"frame"` |  | ' in text
    assert "| `listen` | HOST:PORT | unset |  | " in text  # [grpc]: off by default
    assert "| `address` | HOST:PORT or unix:/path | required |  | " in text


def test_config_reference_command_prints_and_writes_it(tmp_path: Path) -> None:
    command = [sys.executable, "-m", "router", "config-reference"]
    printed = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT,
                             timeout=30, check=True)
    assert printed.stdout == render()
    out = tmp_path / "configuration.md"
    subprocess.run([*command, "--output", str(out)], cwd=REPO_ROOT, timeout=30, check=True)
    assert out.read_text() == render()
