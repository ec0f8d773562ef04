"""Configuration of the gRPC front door and of gRPC backends, and the CLI flag."""

from __future__ import annotations

import pytest

from router.cli import _parser, build_config
from router.core import config as config_mod
from router.core.errors import ConfigError
from router.core.types import Protocol
from router.dispatch.backends import Backend, Registry
from router.health.ejection import PassiveEjection
from tests.fakes import make_backend


def test_grpc_is_off_by_default_and_backends_default_to_tcp() -> None:
    cfg = config_mod.from_mapping({"backends": [{"address": "127.0.0.1:1"}]})
    assert cfg.grpc.listen is None
    assert cfg.backends[0].protocol == "tcp"


def test_grpc_section_and_backend_protocol_and_models() -> None:
    cfg = config_mod.from_mapping({
        "grpc": {"listen": "127.0.0.1:0", "max_calls_per_backend": 8},
        "backends": [{"address": "127.0.0.1:1", "protocol": "grpc", "models": ["a", "b:2"]}],
    })
    assert cfg.grpc.max_calls_per_backend == 8
    assert (cfg.backends[0].protocol, cfg.backends[0].models) == ("grpc", ("a", "b:2"))


@pytest.mark.parametrize(
    ("data", "problem"),
    [
        ({"grpc": {"listen": "nope"}}, "<t>: grpc.listen: Value error, expected HOST:PORT"),
        ({"grpc": {"colour": 1}}, "<t>: grpc.colour: unknown key"),
        ({"grpc": {"max_calls_per_backend": 0}}, "<t>: grpc.max_calls_per_backend: Input"),
        ({"backends": [{"address": "h:1", "protocol": "http"}]}, "<t>: backends[0].protocol:"),
        ({"backends": [{"address": "h:1", "models": ["sum:"]}]}, "<t>: backends[0].models[0]:"),
        ({"backends": [{"address": "h:1", "models": [":1"]}]}, "<t>: backends[0].models[0]:"),
        ({"grpc": {"channel_idle_timeout_s": 0}}, "<t>: grpc.channel_idle_timeout_s: Input"),
        ({"grpc": {"reconnect_backoff_max_s": float("inf")}},
         "<t>: grpc.reconnect_backoff_max_s: Input"),
        ({"grpc": {"listen": "127.0.0.1:7072"}},  # the admin API's default address
         "<t>: admin.listen: '127.0.0.1:7072' is already used by grpc.listen"),
    ],
)
def test_bad_grpc_settings_name_their_key(data: dict[str, object], problem: str) -> None:
    with pytest.raises(ConfigError) as caught:
        config_mod.from_mapping(data, "<t>")
    assert any(p.startswith(problem) for p in caught.value.problems), caught.value.problems


def test_grpc_channels_have_their_own_keys() -> None:
    default = config_mod.GrpcConfig()
    assert (default.channel_idle_timeout_s, default.reconnect_backoff_max_s) == (60.0, 2.0)
    cfg = config_mod.from_mapping({
        "grpc": {"channel_idle_timeout_s": 5, "reconnect_backoff_max_s": 0.5},
        "pool": {"idle_timeout_s": 1.0},  # the TCP pools' key no longer reaches gRPC channels
    })
    assert (cfg.grpc.channel_idle_timeout_s, cfg.grpc.reconnect_backoff_max_s) == (5.0, 0.5)
    with pytest.raises(ConfigError) as caught:  # below gRPC's first reconnect wait, 100 ms
        config_mod.from_mapping({"grpc": {"reconnect_backoff_max_s": 0.05}}, "<t>")
    [problem] = caught.value.problems
    assert problem.startswith("<t>: grpc.reconnect_backoff_max_s: ")


def test_grpc_listen_flag() -> None:
    args = _parser().parse_args(
        ["serve", "--backend", "127.0.0.1:1", "--grpc-listen", "127.0.0.1:7071"]
    )
    assert build_config(args).grpc.listen == "127.0.0.1:7071"


def _backend(port: int, kind: Protocol, models: tuple[str, ...] = ()) -> Backend:
    return make_backend(f"127.0.0.1:{port}", kind, models)


def test_candidates_are_of_one_kind_and_serve_the_model() -> None:
    registry = Registry()
    tcp = _backend(1, "tcp")
    plain = _backend(2, "grpc", ("sum", "identity"))
    versioned = _backend(3, "grpc", ("sum:2",))
    for backend in (tcp, plain, versioned):
        registry.add(backend)
    assert registry.candidates() == [tcp]
    assert registry.candidates(kind="grpc") == [plain, versioned]
    assert registry.candidates(kind="grpc", model="sum") == [plain, versioned]
    assert registry.candidates(kind="grpc", model="sum:2") == [plain, versioned]
    assert registry.candidates(kind="grpc", model="sum:1") == [plain]
    assert registry.candidates(kind="grpc", model="identity:7") == [plain]
    assert registry.candidates((plain,), kind="grpc", model="sum") == [versioned]
    assert not registry.knows_model("sum", "tcp")
    assert registry.knows_model("sum:9", "grpc") and not registry.knows_model("other", "grpc")
    assert list(registry.view("grpc")) == [plain, versioned]
    assert list(registry.view("tcp")) == [tcp]


def test_listeners_hear_every_flip_in_and_out_of_rotation() -> None:
    registry = Registry(on_failure=PassiveEjection(3))
    backend = _backend(1, "grpc")
    registry.add(backend)
    heard: list[tuple[bool, str]] = []
    registry.add_listener(lambda b, reason: heard.append((b.healthy, reason)))
    backend.mark_up("probe")  # already up: no flip
    for _ in range(3):
        backend.record_failure()  # the third marks it down
    backend.mark_down("operator")  # already down: no flip
    backend.mark_up("answered a probe")
    assert heard == [(False, "ejected after 3 consecutive failures"), (True, "answered a probe")]


def test_candidates_follow_every_change_of_who_is_in_rotation() -> None:
    """The healthy lists are cached per (kind, model); every way in or out of rotation must
    show up in the next answer, through the registry and through its views alike."""
    registry = Registry(on_failure=PassiveEjection(3))
    first, second = _backend(1, "tcp"), _backend(2, "tcp", ("m",))
    registry.add(first)
    view = registry.view("tcp")
    assert registry.candidates() == [first] and view.candidates(model="m") == []
    registry.add(second)
    assert view.candidates() == [first, second] and view.candidates(model="m") == [second]
    for _ in range(3):
        second.record_failure()  # passive health marks it down
    assert registry.candidates() == [first] and view.candidates(model="m") == []
    second.mark_up()
    first.healthy = False  # set directly, not through mark_down
    assert registry.candidates() == [second] and view.candidates(model="m") == [second]
    registry.remove(second.address)
    assert registry.candidates() == [] and view.candidates(model="m") == []
    first.healthy = True
    assert view.candidates() == [first]
    assert registry.candidates((first,)) == []  # a request that already tried it
