"""The difference a reload applies (router.core.config_diff): pure functions, no I/O."""

from __future__ import annotations

from typing import Any

import pytest

from router.core.config import RouterConfig, from_mapping
from router.core.config_diff import LIVE_KEYS, ReloadOutcome, diff, match_backends, plan_sync
from router.core.errors import InvalidInput
from router.core.types import BackendSpec

ECHO = ["{python}", "-m", "backends.echo", "--port", "{port}"]


def cfg(*backends: dict[str, Any], **sections: dict[str, Any]) -> RouterConfig:
    return from_mapping({**sections, "backends": list(backends)}, "<t>")


def test_the_same_config_is_no_change() -> None:
    config = cfg({"address": "127.0.0.1:1"}, dispatch={"policy": "random"})
    same = cfg({"address": "127.0.0.1:1"}, dispatch={"policy": "random"})
    d = diff(config, same)
    assert d.empty and d.describe(config, same) == []
    assert d.kept == ((0, 0),)


def test_backends_are_added_removed_and_changed_by_identity() -> None:
    old = cfg({"address": "127.0.0.1:1"}, {"address": "127.0.0.1:2", "weight": 1},
              {"address": "127.0.0.1:3"})
    new = cfg({"address": "127.0.0.1:2", "weight": 5}, {"address": "127.0.0.1:4"},
              {"address": "127.0.0.1:3"})
    d = diff(old, new)
    assert (d.added, d.removed, d.kept) == ((1,), (0,), ((1, 0), (2, 2)))
    assert d.restart == () and d.settings == ()
    assert d.describe(old, new) == [
        "backend 127.0.0.1:4: added",
        "backend 127.0.0.1:1: removed (drains, then leaves)",
        "backend 127.0.0.1:2: weight 1 -> 5",
    ]


def test_a_new_protocol_is_another_backend() -> None:
    old = cfg({"address": "127.0.0.1:1"})
    new = cfg({"address": "127.0.0.1:1", "protocol": "grpc", "models": ["m"]})
    d = diff(old, new)
    assert (d.added, d.removed, d.kept) == ((0,), (0,), ())
    assert d.describe(old, new)[0] == "backend 127.0.0.1:1 (grpc): added"


def test_identical_spawned_entries_pair_one_to_one() -> None:
    spawned = {"address": "127.0.0.1:0", "command": ECHO}
    added, removed, kept = match_backends(cfg(spawned, spawned).backends,
                                          cfg(spawned, spawned, spawned).backends)
    assert (added, removed, kept) == ([2], [], [(0, 0), (1, 1)])
    added, removed, kept = match_backends(cfg(spawned, spawned).backends, cfg(spawned).backends)
    assert (added, removed, kept) == ([], [1], [(0, 0)])


def test_live_settings_are_listed_with_both_values() -> None:
    old = cfg(dispatch={"policy": "least_connections"}, health={"interval_s": 2})
    new = cfg(dispatch={"policy": "round_robin", "request_timeout_s": 3},
              health={"interval_s": 1}, drain={"shutdown_grace_s": 9})
    d = diff(old, new)
    assert d.restart == ()
    assert d.describe(old, new) == [
        "dispatch.request_timeout_s: 30.0 -> 3.0",
        "dispatch.policy: 'least_connections' -> 'round_robin'",
        "health.interval_s: 2.0 -> 1.0",
        "drain.shutdown_grace_s: 30.0 -> 9.0",
    ]


@pytest.mark.parametrize(("section", "key", "value"), [
    ("listener", "listen", "127.0.0.1:7171"),
    ("admin", "listen", "127.0.0.1:7173"),
    ("grpc", "listen", "127.0.0.1:7174"),
    ("listener", "processes", 2),
    ("listener", "max_frame_bytes", 1024),
    ("pool", "pipeline_depth", 4),
    ("grpc", "max_message_bytes", 1024),
])
def test_what_a_running_router_cannot_take_needs_a_restart(
    section: str, key: str, value: object
) -> None:
    old = cfg({"address": "127.0.0.1:1"})
    new = from_mapping({section: {key: value}, "backends": [{"address": "127.0.0.1:2"}]})
    d = diff(old, new)
    assert f"{section}.{key}" not in LIVE_KEYS
    [message] = d.restart
    assert message.startswith(f"{section}.{key}: ") and message.endswith("needs a restart")
    assert d.added == (0,)  # still computed: the caller refuses the whole reload


def test_every_live_key_is_a_key_of_the_schema() -> None:
    defaults = RouterConfig()
    for key in LIVE_KEYS:
        section, _, name = key.partition(".")
        assert hasattr(defaults, section), key
        assert not name or hasattr(getattr(defaults, section), name), key


def test_plan_sync_joins_updates_and_drains_by_address() -> None:
    def spec(address: str, **extra: Any) -> BackendSpec:
        return BackendSpec(id=address, address=address, **extra)

    current = {"a:1": spec("a:1"), "b:1": spec("b:1"), "c:1": spec("c:1"),
               "d:1": spec("d:1")}
    desired = {"a:1": spec("a:1"), "b:1": spec("b:1", weight=4), "e:1": spec("e:1"),
               "d:1": spec("d:1", protocol="grpc")}
    plan = plan_sync(current, desired)
    assert [s.address for s in plan.join] == ["e:1", "d:1"]
    assert plan.update == (spec("b:1", weight=4),)
    assert plan.drain == ("c:1", "d:1")  # d:1 changed protocol: drains, and one joins
    assert plan_sync(current, current) == plan_sync({}, {})


def test_an_outcome_is_reloaded_unless_it_carries_an_error() -> None:
    assert ReloadOutcome(("x",)).reloaded
    refused = ReloadOutcome(error=InvalidInput(["<t>: dispatch.policy: bad"]))
    assert not refused.reloaded and refused.error is not None
    assert refused.error.code == "VALIDATION_ERROR" and refused.error.http_status == 400
