"""The layer table of DESIGN.md, enforced over router/*.py with ast.

A module may import router modules from its own layer or lower ones, never higher; L0 and L1
(pure code) never import asyncio. Every module must be placed in the table: a new module fails
this test until it is given a layer. Imports inside functions count too (a lazy import is still
a dependency).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROUTER = Path(__file__).resolve().parent.parent / "router"

LAYERS: dict[str, int] = {
    # L0: error tree, injectable clock, frozen config. The empty package marker sits here too.
    "__init__": 0,
    "errors": 0,
    "clock": 0,
    "config": 0,
    # L1: pure functions and sans-IO state machines
    "wire": 1,
    "balance": 1,
    "kserve": 1,
    # L2: asyncio machinery, no sockets except through injected dialers
    "registry": 2,
    "pool": 2,
    "health": 2,
    "dispatch": 2,
    "drain": 2,
    "metrics": 2,
    # L3: network and processes
    "acceptor": 3,
    "upstream": 3,
    "admin": 3,
    "spawner": 3,
    "client": 3,
    "federation": 3,
    "grpc_upstream": 3,
    "grpc_proxy": 3,
    "grpc_kserve": 3,
    "grpc_front": 3,
    # L4: composition root and entry points
    "app": 4,
    "cli": 4,
    "supervisor": 4,
    "__main__": 4,
}
PURE_LAYERS = {0, 1}

MODULES = sorted(path.stem for path in ROUTER.glob("*.py"))


def _tree(module: str) -> ast.Module:
    path = ROUTER / f"{module}.py"
    return ast.parse(path.read_text(), filename=str(path))


def _imports(module: str) -> list[tuple[int, str]]:
    """(line, fully qualified name) of every import in the module, at any depth."""
    found: list[tuple[int, str]] = []
    for node in ast.walk(_tree(module)):
        if isinstance(node, ast.Import):
            found.extend((node.lineno, alias.name) for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: from . import x / from .x import y
                base = "router" + (f".{node.module}" if node.module else "")
            else:
                base = node.module or ""
            found.append((node.lineno, base))
            found.extend((node.lineno, f"{base}.{alias.name}") for alias in node.names)
    return found


def _router_modules_imported(module: str) -> set[tuple[int, str]]:
    """Router modules a module depends on. ``from router import x`` names module ``x`` when
    router/x.py exists, else it is a name from the package (``__init__``)."""
    deps: set[tuple[int, str]] = set()
    for line, name in _imports(module):
        parts = name.split(".")
        if parts[0] != "router":
            continue
        if len(parts) == 1:
            deps.add((line, "__init__"))
        elif (ROUTER / f"{parts[1]}.py").exists():
            deps.add((line, parts[1]))
    return deps


def test_every_module_is_in_the_layer_table() -> None:
    unplaced = [m for m in MODULES if m not in LAYERS]
    assert not unplaced, f"give these modules a layer in DESIGN.md and here: {unplaced}"


def test_the_table_names_no_missing_module() -> None:
    assert sorted(set(LAYERS) - set(MODULES)) == []


@pytest.mark.parametrize("module", MODULES)
def test_imports_only_from_the_same_or_lower_layers(module: str) -> None:
    if module not in LAYERS:
        pytest.fail(f"router/{module}.py is not in the layer table")
    layer = LAYERS[module]
    upward = sorted(
        f"router/{module}.py:{line} (L{layer}) imports router.{dep} (L{LAYERS[dep]})"
        for line, dep in _router_modules_imported(module)
        if dep in LAYERS and LAYERS[dep] > layer
    )
    unknown = sorted(
        f"router/{module}.py:{line} imports unplaced router.{dep}"
        for line, dep in _router_modules_imported(module)
        if dep not in LAYERS
    )
    assert not upward + unknown, "\n".join(upward + unknown)


@pytest.mark.parametrize("module", [m for m in MODULES if LAYERS.get(m) in PURE_LAYERS])
def test_pure_layers_do_not_import_asyncio(module: str) -> None:
    offending = [
        f"router/{module}.py:{line} imports {name}"
        for line, name in _imports(module)
        if name == "asyncio" or name.startswith("asyncio.")
    ]
    assert not offending, "\n".join(offending)


# -- the checker itself -------------------------------------------------------------------------


def test_checker_sees_lazy_and_package_imports() -> None:
    # cli imports router.app inside a function and router.config as "from router import config".
    deps = {dep for _, dep in _router_modules_imported("cli")}
    assert {"app", "config", "errors", "client"} <= deps
