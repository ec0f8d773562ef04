"""The build backend: setuptools', plus mypy (mypyc) among the isolated build's requirements
when ROUTER_COMPILE=1 asks setup.py to compile the hot modules."""

from __future__ import annotations

import os

from setuptools import build_meta as _setuptools
from setuptools.build_meta import *  # noqa: F403  (the PEP 517 hooks, re-exported)

# The mypy of the test extra, which the compiled modules are checked and built with.
MYPYC_REQUIREMENT = "mypy==2.4.1"


def _compile_requires() -> list[str]:
    return [MYPYC_REQUIREMENT] if os.environ.get("ROUTER_COMPILE") == "1" else []


def get_requires_for_build_wheel(config_settings: dict[str, object] | None = None) -> list[str]:
    return [*_setuptools.get_requires_for_build_wheel(config_settings), *_compile_requires()]


def get_requires_for_build_editable(
    config_settings: dict[str, object] | None = None,
) -> list[str]:
    return [*_setuptools.get_requires_for_build_editable(config_settings), *_compile_requires()]
