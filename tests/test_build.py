"""The compiled and pure builds (router/core/build.py, setup.py): the ROUTER_PURE switch, the
refusal of a stale extension module, and which build ``inference-router version`` reports."""

from __future__ import annotations

import ast
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

import orjson
import pytest

from router.core import build
from router.core.build import RouterFinder, StaleExtension

ROOT = Path(__file__).resolve().parent.parent
EXT = sysconfig.get_config_var("EXT_SUFFIX")


def _compiled_list() -> list[str]:
    """setup.py's COMPILED, read from its syntax tree (importing it would run setup())."""
    tree = ast.parse((ROOT / "setup.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "COMPILED":
            value = ast.literal_eval(node.value)
            assert isinstance(value, list)
            return [str(v) for v in value]
    raise AssertionError("setup.py has no COMPILED list")


def _module_name(path: str) -> str:
    return path.removesuffix(".py").replace("/", ".")


def _fake_package(root: Path, extension_age_s: float, shared_age_s: float = -60) -> Path:
    """root/fakepkg with sub/mod.py and, beside it, a (not loadable) extension module whose mtime
    is ``extension_age_s`` before the source's (negative: after it); the group's shared library
    fakepkg/compiled__mypyc, ``shared_age_s`` before the source."""
    package = root / "fakepkg" / "sub"
    package.mkdir(parents=True)
    (package.parent / "__init__.py").write_text("")
    (package / "__init__.py").write_text("")
    source = package / "mod.py"
    source.write_text("VALUE = 'source'\n")
    mtime = source.stat().st_mtime
    for path, age in ((package / f"mod{EXT}", extension_age_s),
                      (package.parent / f"compiled__mypyc{EXT}", shared_age_s)):
        path.write_bytes(b"not an ELF file")
        os.utime(path, (mtime - age, mtime - age))
    return package


def _finder(package: Path, *, pure: bool, check_stale: bool) -> RouterFinder:
    return RouterFinder(pure=pure, check_stale=check_stale, package="fakepkg",
                        root=package.parent)


# -- the finder, on a package of its own --------------------------------------------------------


def test_pure_finder_loads_the_source_beside_a_newer_extension(tmp_path: Path) -> None:
    package = _fake_package(tmp_path, extension_age_s=-60)
    spec = _finder(package, pure=True, check_stale=True).find_spec("fakepkg.sub.mod",
                                                                   [str(package)])
    assert spec is not None and spec.loader is not None and spec.origin == str(package / "mod.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    assert module.VALUE == "source"


def test_finder_prefers_a_fresh_extension(tmp_path: Path) -> None:
    package = _fake_package(tmp_path, extension_age_s=-60)
    spec = _finder(package, pure=False, check_stale=True).find_spec("fakepkg.sub.mod",
                                                                    [str(package)])
    assert spec is not None and spec.origin == str(package / f"mod{EXT}")
    assert isinstance(spec.loader, importlib.machinery.ExtensionFileLoader)


def test_finder_refuses_an_extension_older_than_its_source(tmp_path: Path) -> None:
    package = _fake_package(tmp_path, extension_age_s=60)
    finder = _finder(package, pure=False, check_stale=True)
    with pytest.raises(StaleExtension, match=r"older than .*mod\.py: run `make compile`"):
        finder.find_spec("fakepkg.sub.mod", [str(package)])


def test_finder_refuses_a_shared_library_older_than_a_source(tmp_path: Path) -> None:
    # The module's own extension is fresh, but the group's code (the shared library) is not.
    package = _fake_package(tmp_path, extension_age_s=-60, shared_age_s=60)
    finder = _finder(package, pure=False, check_stale=True)
    with pytest.raises(StaleExtension, match=r"older than .*mod\.py"):
        finder.find_spec("fakepkg.sub.mod", [str(package)])


def test_installed_trees_are_not_checked(tmp_path: Path) -> None:
    # pip does not keep file times: a wheel's source may be written after its extension.
    package = _fake_package(tmp_path, extension_age_s=60)
    spec = _finder(package, pure=False, check_stale=False).find_spec("fakepkg.sub.mod",
                                                                     [str(package)])
    assert spec is not None and spec.origin == str(package / f"mod{EXT}")


def test_finder_leaves_other_packages_to_python(tmp_path: Path) -> None:
    package = _fake_package(tmp_path, extension_age_s=60)
    finder = RouterFinder(pure=True, check_stale=True, package="router", root=package.parent)
    assert finder.find_spec("fakepkg.sub.mod", [str(package)]) is None
    assert finder.find_spec("router", None) is None  # top level: Python's own search


def test_pure_switch_reads_one_value() -> None:
    assert build.pure_requested({"ROUTER_PURE": "1"})
    assert not build.pure_requested({"ROUTER_PURE": "0"})
    assert not build.pure_requested({})


# -- the real package, in a process of its own --------------------------------------------------


def _copy_tree(dest: Path) -> Path:
    """The router package and setup.py (a source tree), without any extension module."""
    shutil.copy2(ROOT / "setup.py", dest / "setup.py")
    shutil.copytree(ROOT / "router", dest / "router",
                    ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    return dest


def _import(cwd: Path, module: str, *, pure: bool) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ROUTER_PURE"}
    if pure:
        env["ROUTER_PURE"] = "1"
    return subprocess.run(
        [sys.executable, "-c", f"import {module}; print({module}.__file__)"],
        cwd=cwd, env=env, capture_output=True, text=True, timeout=60)


def test_a_stale_extension_is_refused_and_the_pure_switch_sets_it_aside(tmp_path: Path) -> None:
    tree = _copy_tree(tmp_path)
    source = tree / "router" / "protocol" / "frames.py"
    extension = source.with_name(f"frames{EXT}")
    extension.write_bytes(b"compiled from older code")
    old = source.stat().st_mtime - 60
    os.utime(extension, (old, old))

    refused = _import(tree, "router.protocol.frames", pure=False)
    assert refused.returncode == 1
    assert "StaleExtension" in refused.stderr and "run `make compile`" in refused.stderr
    assert str(source) in refused.stderr

    pure = _import(tree, "router.protocol.frames", pure=True)
    assert pure.returncode == 0, pure.stderr
    assert pure.stdout.strip() == str(source)


def test_a_fresh_extension_is_what_loads(tmp_path: Path) -> None:
    tree = _copy_tree(tmp_path)
    source = tree / "router" / "protocol" / "frames.py"
    extension = source.with_name(f"frames{EXT}")
    extension.write_bytes(b"a fresh but unloadable extension")
    new = source.stat().st_mtime + 60
    os.utime(extension, (new, new))
    loaded = _import(tree, "router.protocol.frames", pure=False)
    # The loader tried the extension: dlopen's complaint, not the stale-extension refusal.
    assert loaded.returncode == 1
    assert str(extension) in loaded.stderr and "StaleExtension" not in loaded.stderr


def _run_version(pure: bool) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "ROUTER_PURE"}
    if pure:
        env["ROUTER_PURE"] = "1"
    return subprocess.run([sys.executable, "-m", "router", "version"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=60)


def _version(pure: bool) -> dict[str, object]:
    done = _run_version(pure)
    assert done.returncode == 0, done.stderr
    answer = orjson.loads(done.stdout)
    assert isinstance(answer, dict)
    return answer


def test_version_reports_the_pure_build_under_the_switch() -> None:
    answer = _version(pure=True)
    assert answer["build"] == "pure" and answer["compiled_modules"] == []


def test_version_reports_the_build_this_tree_holds() -> None:
    # Compiled (make compile): every listed module loads from its extension module; an
    # extension older than its source: refused; no extension modules: the pure build.
    listed = _compiled_list()
    extensions = {p: (ROOT / p).with_name(Path(p).stem + EXT) for p in listed}
    built = {p: e for p, e in extensions.items() if e.exists()}
    stale = [p for p, e in built.items() if (ROOT / p).stat().st_mtime > e.stat().st_mtime]
    if stale:
        done = _run_version(pure=False)
        assert done.returncode == 1 and "StaleExtension" in done.stderr, done.stderr
    elif built:
        answer = _version(pure=False)
        assert answer["build"] == "compiled"
        assert answer["compiled_modules"] == sorted(_module_name(p) for p in listed)
    else:
        answer = _version(pure=False)
        assert answer["build"] == "pure" and answer["compiled_modules"] == []


def test_the_compiled_list_names_modules_that_exist_and_not_the_build_switch() -> None:
    listed = _compiled_list()
    assert listed and all((ROOT / p).is_file() for p in listed)
    assert "router/core/build.py" not in listed
    assert not [p for p in listed if p.endswith("__init__.py")]


def test_architecture_names_every_compiled_module() -> None:
    text = (ROOT / "docs" / "architecture.md").read_text()
    section = text.split("## Compiled modules", 1)[1].split("\n## ", 1)[0]
    missing = [p for p in _compiled_list() if f"`{p.removeprefix('router/')}`" not in section]
    assert not missing, f"docs/architecture.md's compiled-modules section lacks {missing}"
