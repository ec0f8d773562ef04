"""Which build of the router runs: the mypyc-compiled hot modules or the pure-Python sources.

The ``.py`` files are the only source; ``make compile`` (setup.py with ROUTER_COMPILE=1) puts an
extension module beside each module setup.py lists. ``router/__init__.py`` calls ``install()``
before any other router module is imported, which puts one finder ahead of Python's own for
``router.*``:

- ``ROUTER_PURE=1`` (read once, at that first import; subprocesses inherit the variable): every
  router module loads from its ``.py`` source even where an extension module sits beside it.
- otherwise, in a source tree (setup.py beside ``router/``), the extension modules are refused
  with StaleExtension, never imported, while any compiled source is newer than its extension
  module or than the group's shared library: they were compiled from other code.
  Installed wheels are not checked (pip does not keep file times, and nothing edits them).

This module is never compiled: it decides how the compiled ones load.
"""

from __future__ import annotations

import functools
import importlib.machinery
import os
import sys
from collections.abc import Mapping, Sequence
from importlib.abc import MetaPathFinder
from importlib.machinery import ExtensionFileLoader, FileFinder, ModuleSpec, SourceFileLoader
from pathlib import Path
from types import ModuleType

PURE_ENV = "ROUTER_PURE"
ROUTER_DIR = Path(__file__).resolve().parent.parent
SOURCE_TREE = (ROUTER_DIR.parent / "setup.py").is_file()
EXTENSION_SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]


class StaleExtension(ImportError):
    """An extension module older than its source: rebuild it (``make compile``) or run the
    pure build (``ROUTER_PURE=1``)."""


def pure_requested(environ: Mapping[str, str] = os.environ) -> bool:
    return environ.get(PURE_ENV, "") == "1"


def stale_sources(root: Path) -> list[Path]:
    """The sources under ``root`` newer than what was compiled from them: the extension module
    beside each, or the group's shared library (``*__mypyc`` in ``root``), which holds the
    code of every compiled module (compiled modules import each other through it, not through
    the import system, so the whole group is checked at once)."""
    shared = [p.stat().st_mtime for p in root.glob(f"*__mypyc{EXTENSION_SUFFIX}")]
    shared_mtime = min(shared, default=float("inf"))
    stale: list[Path] = []
    for extension in sorted(root.rglob(f"*{EXTENSION_SUFFIX}")):
        if extension.name.endswith(f"__mypyc{EXTENSION_SUFFIX}"):
            continue
        source = extension.with_name(extension.name.removesuffix(EXTENSION_SUFFIX) + ".py")
        try:
            if source.stat().st_mtime > min(extension.stat().st_mtime, shared_mtime):
                stale.append(source)
        except FileNotFoundError:
            continue
    return stale


class RouterFinder(MetaPathFinder):
    """Finds ``package.*`` modules (the package at ``root``): sources only when ``pure``; else
    Python's own search, with extension modules refused while any is stale (``check_stale``;
    checked once, at the first extension module found)."""

    def __init__(self, *, pure: bool, check_stale: bool, package: str = "router",
                 root: Path = ROUTER_DIR) -> None:
        self.pure = pure
        self.check_stale = check_stale
        self._prefix = package + "."
        self._root = root
        self._stale: list[Path] | None = None

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None,
    ) -> ModuleSpec | None:
        if path is None or not fullname.startswith(self._prefix):
            return None
        if self.pure:
            for entry in path:
                finder = FileFinder(entry, (SourceFileLoader, importlib.machinery.SOURCE_SUFFIXES))
                spec = finder.find_spec(fullname, target)
                if spec is not None:
                    return spec
            return None
        spec = importlib.machinery.PathFinder.find_spec(fullname, path, target)
        if self.check_stale and spec is not None and isinstance(spec.loader, ExtensionFileLoader):
            if self._stale is None:
                self._stale = stale_sources(self._root)
            if self._stale:
                names = ", ".join(str(p) for p in self._stale[:3])
                more = f" and {len(self._stale) - 3} more" if len(self._stale) > 3 else ""
                raise StaleExtension(
                    f"{spec.origin}: the compiled modules are older than {names}{more}: run "
                    f"`make compile` to rebuild them, or {PURE_ENV}=1 for the pure-Python build",
                    name=fullname)
        return spec


_finder: RouterFinder | None = None


def install() -> None:
    """Put the router finder first on ``sys.meta_path`` (once; router/__init__.py calls it)."""
    global _finder
    if _finder is None:
        _finder = RouterFinder(pure=pure_requested(), check_stale=SOURCE_TREE)
        sys.meta_path.insert(0, _finder)


def compiled_modules() -> list[str]:
    """The router modules imported so far that were loaded from extension modules (not the
    group's shared library, router.compiled__mypyc)."""
    return sorted(name for name, module in list(sys.modules.items())
                  if name.startswith("router.") and not name.endswith("__mypyc")
                  and _from_extension(module))


def _from_extension(module: ModuleType) -> bool:
    spec = getattr(module, "__spec__", None)
    return spec is not None and isinstance(spec.loader, ExtensionFileLoader)


def build() -> str:
    """``compiled`` when any router module came from an extension module, else ``pure``."""
    return "compiled" if compiled_modules() else "pure"


@functools.cache
def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("inference-router")
    except PackageNotFoundError:
        return "unknown"
