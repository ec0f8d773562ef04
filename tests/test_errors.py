"""The error tree of router.core.errors: where errors live, their codes and status hints, and
``quoted``, which keeps echoed input short."""

from __future__ import annotations

import importlib
import pkgutil
import sys
from typing import get_args

import grpc
import pytest

import router
from router.control.spawner import Spawner
from router.core import errors
from router.core.errors import Fault, RouterError, SpawnError, quoted


def _every_router_module() -> list[str]:
    names = [info.name for info in pkgutil.walk_packages(router.__path__, "router.")]
    return [name for name in names if not name.endswith("__main__")]  # that one runs the CLI


def _subclasses(cls: type[RouterError]) -> list[type[RouterError]]:
    found = []
    for sub in cls.__subclasses__():
        found += [sub, *_subclasses(sub)]
    return found


def _tree() -> list[type[RouterError]]:
    for name in _every_router_module():
        importlib.import_module(name)
    return [RouterError, *_subclasses(RouterError)]


def test_every_router_error_is_declared_in_core_errors() -> None:
    tree = _tree()
    assert len(tree) >= 20  # the walk found the tree (and imported every module)
    elsewhere = [f"{cls.__module__}.{cls.__qualname__}" for cls in tree
                 if cls.__module__ != errors.__name__]
    assert elsewhere == []


def test_every_code_is_unique() -> None:
    by_code: dict[str, list[str]] = {}
    for cls in _tree():
        by_code.setdefault(cls.code, []).append(cls.__name__)
    shared = {code: names for code, names in by_code.items() if len(names) > 1}
    assert shared == {}


@pytest.mark.parametrize("cls", _tree(), ids=lambda cls: cls.__name__)
def test_status_hints_are_valid(cls: type[RouterError]) -> None:
    assert cls.grpc_status in grpc.StatusCode.__members__, cls.grpc_status
    assert cls.grpc_status != "OK"
    assert 400 <= cls.http_status <= 599, cls.http_status
    assert cls.fault in get_args(Fault)
    assert cls.code == cls.code.upper() and " " not in cls.code


def test_errors_moved_into_the_tree_keep_their_codes() -> None:
    assert (errors.MalformedMessage.code, errors.MalformedMessage.grpc_status) == (
        "MALFORMED_MESSAGE", "INVALID_ARGUMENT")
    assert issubclass(errors.MalformedMessage, errors.ClientProtocolError)
    assert (SpawnError.code, SpawnError.fault) == ("SPAWN_FAILED", "config")
    assert (errors.Dropped.code, errors.Dropped.grpc_status) == ("DROPPED", "UNAVAILABLE")
    assert (errors.UnknownService.code, errors.UnknownService.grpc_status) == (
        "UNKNOWN_SERVICE", "NOT_FOUND")


# -- quoted -----------------------------------------------------------------------------------


@pytest.mark.parametrize("value", ["", "sum", "sum:1", "x" * 128, b"raw", "é" * 64])
def test_short_values_are_their_repr(value: str | bytes) -> None:
    assert quoted(value) == repr(value)


def test_a_long_string_keeps_its_head_and_says_its_size() -> None:
    text = quoted("m" * (1 << 20))
    assert text == repr("m" * 128) + f"... ({1 << 20} bytes)"


def test_a_long_value_is_cut_on_bytes_never_inside_a_character() -> None:
    text = quoted("é" * 100, limit=9)  # 2 bytes each: 9 bytes hold four whole characters
    assert text == "'éééé'... (200 bytes)"
    assert quoted(b"\x00" * 300, limit=4) == repr(b"\x00" * 4) + "... (300 bytes)"


def test_quoting_escapes_what_a_terminal_or_a_header_would_misread() -> None:
    text = quoted("a\nb\r\x00" * 100, limit=16)
    assert "\n" not in text and "\r" not in text and "\x00" not in text
    assert text.endswith("... (500 bytes)")
    assert len(quoted("\x00" * 10_000)) < 4 * 128 + 32  # repr escapes at most 4x


# -- spawn failures ---------------------------------------------------------------------------


async def test_a_backend_that_prints_no_ready_line_is_a_spawn_error() -> None:
    spawner = Spawner(ready_timeout_s=20.0)
    script = "import sys; sys.stdout.write('x' * 60000 + '\\n')"
    with pytest.raises(RouterError) as caught:
        await spawner.spawn([sys.executable, "-c", script])
    assert isinstance(caught.value, SpawnError)
    assert caught.value.code == "SPAWN_FAILED"
    assert "(60000 bytes)" in caught.value.message  # the line, without its newline
    assert len(caught.value.message) < 1000
    await spawner.stop_all()
