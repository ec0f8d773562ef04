"""The build backend: setuptools', with mypy (mypyc) and the project's runtime dependencies among
the isolated build's requirements when ROUTER_COMPILE=1 asks setup.py to compile the hot
modules: mypyc type-checks them as ``mypy --strict`` does (pyproject's [tool.mypy], its pydantic
plugin included), which needs the packages they import.

The requirement hooks answer without running setup.py (setuptools' own would, and setup.py
imports mypyc when compiling): it declares no setup_requires, so build-system.requires plus
these is the whole list.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path

from setuptools.build_meta import *  # noqa: F403  (the PEP 517 hooks, re-exported)

# The mypy of the test extra, which the compiled modules are checked and built with.
MYPYC_REQUIREMENT = "mypy==2.4.1"


PYPROJECT = Path(__file__).resolve().parent.parent / "pyproject.toml"


def _compile_requires() -> list[str]:
    if os.environ.get("ROUTER_COMPILE") != "1":
        return []
    dependencies = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    return [MYPYC_REQUIREMENT, *dependencies]


def get_requires_for_build_wheel(config_settings: dict[str, object] | None = None) -> list[str]:
    return _compile_requires()


def get_requires_for_build_editable(
    config_settings: dict[str, object] | None = None,
) -> list[str]:
    return _compile_requires()
