"""Fuzz target: the config loader (router/core/config.py ``from_mapping`` and ``load``).

Mappings shaped like a config file (the real sections and keys, values of every TOML type,
valid or not, unknown keys of any spelling, sections that are not tables) and files of any
bytes (TOML written from such mappings, then mutated). The loader either returns a config or
raises ``ConfigError``, nothing else; every problem is one line, ``SOURCE: KEY PATH: why``,
and its key path is one the input has (or a missing key of a table the input has).
"""

from __future__ import annotations

import datetime as dt
import math
import re
import tempfile
from pathlib import Path
from typing import Any

import tomli_w
from hypothesis import example, given
from hypothesis import strategies as st
from pydantic import BaseModel

from router.core.config import RouterConfig, from_mapping, load
from router.core.errors import ConfigError, quoted
from tests.fuzz.budget import fuzz_target

SOURCE = "fuzz.toml"


def _fields(model: type[BaseModel]) -> dict[str, Any]:
    return {name: info.annotation for name, info in model.model_fields.items()}


def _model_of(annotation: Any) -> type[BaseModel] | None:
    """The config model a field holds, directly or as ``Model | None``."""
    for candidate in (annotation, *getattr(annotation, "__args__", ())):
        if isinstance(candidate, type) and issubclass(candidate, BaseModel):
            return candidate
    return None


def _tables(model: type[BaseModel], prefix: str = "") -> dict[str, type[BaseModel]]:
    """Every table of the schema by its key path, nested ones ([listener.tls]) included."""
    found: dict[str, type[BaseModel]] = {}
    for name, info in model.model_fields.items():
        nested = _model_of(info.annotation)
        if nested is not None:
            path = f"{prefix}{name}"
            found[path] = nested
            found |= _tables(nested, f"{path}.")
    return found


SECTIONS: dict[str, type[BaseModel]] = _tables(RouterConfig)
# The arrays of tables ([[instances]], [[model_groups]], ...): each entry's model, by array name.
ARRAYS: dict[str, type[BaseModel]] = {
    name: item for name, info in RouterConfig.model_fields.items()
    if getattr(info.annotation, "__origin__", None) is tuple
    and (item := _model_of(info.annotation.__args__[0])) is not None
}
BACKEND_KEYS = ["address", "weight", "models", "protocol", "command"]

keys = st.one_of(
    st.sampled_from(["listen", "address", "weight", "models", "timeout_s", "x"]),
    st.text(max_size=12),
    st.text(min_size=60, max_size=80),  # past the 64 characters a problem quotes in full
)
scalars = st.one_of(
    st.integers(-(2**70), 2**70),
    st.sampled_from([0, 1, -1, 2**31, 65536, 86_400, 86_401]),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=20),
    st.sampled_from(["127.0.0.1:0", "127.0.0.1:7070", "[::1]:9000", "host:65536", ":80", "a:b",
                     "0.0.0.0:7070", "unix:/tmp/x", "sum", "sum:1", "sum:", " sum", "tcp", "grpc",
                     "round_robin", "frame", "127.0.0.1:\u0661\u0662", "h:\u00b2"]),
    st.datetimes(timezones=st.none() | st.just(dt.UTC)),
    st.dates(),
    st.times(),
)
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(keys, inner, max_size=3),
    max_leaves=4,
)


@st.composite
def sections(draw: st.DrawFn, model: type[BaseModel]) -> dict[str, Any]:
    names = list(_fields(model))
    chosen = draw(st.lists(st.sampled_from(names), max_size=len(names), unique=True))
    table = {name: draw(values) for name in chosen}
    table.update(draw(st.dictionaries(keys, values, max_size=2)))
    return table


@st.composite
def mappings(draw: st.DrawFn) -> dict[str, Any]:
    data: dict[str, Any] = {}
    for name in draw(st.lists(st.sampled_from(sorted(SECTIONS)), unique=True)):
        data[name] = draw(st.one_of(sections(SECTIONS[name]), values))
    if draw(st.booleans()):
        backend = st.fixed_dictionaries(
            {}, optional={key: values for key in BACKEND_KEYS}
        ) | st.dictionaries(keys, values, max_size=3)
        data["backends"] = draw(st.one_of(st.lists(backend, max_size=3), values))
    data.update(draw(st.dictionaries(keys, values, max_size=2)))
    return data


def _component(name: str) -> str:
    """A key as a problem names it: bare TOML keys as they are, any other quoted."""
    return name if re.fullmatch(r"[A-Za-z0-9_-]{1,64}", name) else quoted(name, 64)


def _paths(value: Any, prefix: str = "") -> tuple[set[str], set[str]]:
    """(every key path in ``value``, the paths of its tables), spelled as problems spell them."""
    paths: set[str] = set()
    tables: set[str] = set()
    if isinstance(value, dict):
        tables.add(prefix)
        for key, item in value.items():
            path = f"{prefix}.{_component(key)}" if prefix else _component(key)
            paths.add(path)
            sub_paths, sub_tables = _paths(item, path)
            paths |= sub_paths
            tables |= sub_tables
    elif isinstance(value, list):
        for i, item in enumerate(value):
            path = f"{prefix}[{i}]"
            paths.add(path)
            sub_paths, sub_tables = _paths(item, path)
            paths |= sub_paths
            tables |= sub_tables
    return paths, tables


def _check_problems(error: ConfigError, data: dict[str, Any] | None) -> None:
    assert error.problems
    paths, tables = _paths(data) if data is not None else (set(), set())
    # Or a key the schema declares, missing from a table the input has.
    paths |= {f"{t}.{f}" if t else f for t in tables for f in _known(t)}
    for problem in error.problems:
        assert "\n" not in problem and "\r" not in problem, problem
        assert problem.startswith(f"{SOURCE}: "), problem
        if data is None:
            continue  # a file that is not TOML: the problem names the file
        path, sep, _ = problem[len(SOURCE) + 2:].rpartition(": ")
        while sep and path not in paths and path != "(top level)":
            path, sep, _ = path.rpartition(": ")  # the reason itself may hold ": "
        assert sep, (problem, sorted(paths))


def _known(table_path: str) -> list[str]:
    """Keys the schema declares for the table at ``table_path`` (required ones may be missing)."""
    if re.fullmatch(r"backends\[\d+\]", table_path):
        return BACKEND_KEYS
    array = re.fullmatch(r"(\w+)\[\d+\]", table_path)
    if array is not None and array.group(1) in ARRAYS:
        return list(_fields(ARRAYS[array.group(1)]))
    model = SECTIONS.get(table_path)
    return list(_fields(model)) if model is not None else []


@fuzz_target(smoke_examples=150)
@given(mappings())
# Arabic-Indic digits: int() reads them, so the port was taken.
@example({"listener": {"listen": "127.0.0.1:\u0661\u0662"}})
@example({"listener": {"listen": "127.0.0.1:\u00b2"}})  # isdigit() but not int()
# Found by this target: a key with a line break split its problem over two lines.
@example({"\r": []})
@example({"listener": {"": 1}})  # the empty key, which named no key at all
@example({"instances": [{}]})  # its required keys are named by their path
@example({"model_groups": [{}]})
def test_any_mapping_loads_or_names_every_problem_by_its_key_path(data: dict[str, Any]) -> None:
    try:
        config = from_mapping(data, SOURCE)
    except ConfigError as error:
        _check_problems(error, data)
        return
    assert isinstance(config, RouterConfig)
    for _, address in _addresses(config):
        port = address.rpartition(":")[2]
        assert port.isascii() and port.isdigit(), address


def _addresses(config: RouterConfig) -> list[tuple[str, str]]:
    found = [("listener", config.listener.listen), ("admin", config.admin.listen)]
    if config.grpc.listen is not None:
        found.append(("grpc", config.grpc.listen))
    found += [(f"backends[{i}]", b.address) for i, b in enumerate(config.backends)]
    return found


def _toml(data: dict[str, Any]) -> bytes:
    try:
        return tomli_w.dumps(data).encode()
    except (TypeError, ValueError):
        return b"x = 1\n"  # nan/inf and the like have TOML spellings tomli_w refuses: any file


@st.composite
def files(draw: st.DrawFn) -> bytes:
    text = bytearray(_toml(draw(mappings())))
    for _ in range(draw(st.integers(0, 3))):
        at = draw(st.integers(0, len(text)))
        op = draw(st.sampled_from(["insert", "delete", "flip"]))
        if op == "insert":
            text[at:at] = draw(st.one_of(
                st.binary(min_size=1, max_size=4),
                st.sampled_from([b"[", b"]", b"=", b'"', b"\n", b"[[x]]\n", b"\xff", b"\xc3"]),
            ))
        elif op == "delete":
            del text[at:at + draw(st.integers(1, 8))]
        elif at < len(text):
            text[at] ^= 1 << draw(st.integers(0, 7))
    return bytes(text)


_workdir = tempfile.TemporaryDirectory(prefix="router-fuzz-config-")  # removed at exit


@fuzz_target(smoke_examples=100)
@given(st.one_of(files(), st.binary(max_size=80)))
# Found by this target: a file that is not UTF-8 raised UnicodeDecodeError.
@example(b"\x80")
@example(b"a = " + b"[" * 3000)  # nested deeper than tomllib recurses: RecursionError
def test_any_file_loads_or_fails_with_config_error(content: bytes) -> None:
    path = Path(_workdir.name) / SOURCE
    path.write_bytes(content)
    try:
        config = load(path)
    except ConfigError as error:
        assert error.problems
        for problem in error.problems:
            assert "\n" not in problem, problem
            assert problem.startswith(f"{path}: "), problem
        return
    assert isinstance(config, RouterConfig)
    assert not math.isnan(config.dispatch.queue_timeout_s)
