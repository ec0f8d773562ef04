"""router.core.config and the config side of router.cli: validation, error reporting, overrides."""

from __future__ import annotations

import math
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest
from pydantic import BaseModel

from router import cli
from router.core import config as config_mod
from router.core.config import (
    ECHO_COMMAND,
    MAX_DURATION_S,
    BackendConfig,
    HealthConfig,
    InstanceConfig,
    ModelGroupConfig,
    RouterConfig,
    from_mapping,
    load,
)
from router.core.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent

GOOD_TOML = """\
[listener]
listen = "127.0.0.1:7070"

[dispatch]
queue_size = 4
policy = "round_robin"

[pool]
idle_timeout_s = 30.0

[[backends]]
address = "127.0.0.1:9001"
weight = 2

[[backends]]
address = "[::1]:9002"
models = ["resnet"]
"""

# Three problems in three sections, all to be reported together.
BAD_TOML = """\
[listener]
listen = "nowhere"

[pool]
bogus = 1

[[backends]]
address = "127.0.0.1:9001"
weight = 0
"""


def problems_of(data: dict[str, Any], source: str = "cfg.toml") -> list[str]:
    with pytest.raises(ConfigError) as info:
        from_mapping(data, source)
    return info.value.problems


def write(tmp_path: Path, text: str, name: str = "router.toml") -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


# -- validation -----------------------------------------------------------------------------------


def test_defaults_are_valid() -> None:
    cfg = from_mapping({})
    assert cfg == RouterConfig()
    assert cfg.dispatch.policy == "least_connections"
    assert cfg.pool.idle_timeout_s > 0
    assert cfg.backends == ()


def test_config_is_frozen() -> None:
    cfg = from_mapping({})
    with pytest.raises(ValueError):
        cfg.dispatch.queue_size = 1  # type: ignore[misc]


def test_good_file_loads(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, GOOD_TOML))
    assert cfg.dispatch.queue_size == 4
    assert cfg.dispatch.policy == "round_robin"
    assert cfg.pool.idle_timeout_s == 30.0
    assert [(b.address, b.weight, b.models) for b in cfg.backends] == [
        ("127.0.0.1:9001", 2, ()),
        ("[::1]:9002", 1, ("resnet",)),
    ]


def test_unknown_key_names_file_and_key_path() -> None:
    assert problems_of({"pool": {"bogus": 1}}) == ["cfg.toml: pool.bogus: unknown key"]


def test_unknown_top_level_section() -> None:
    assert problems_of({"pools": {}}) == ["cfg.toml: pools: unknown key"]


def test_unknown_key_in_a_backend_names_its_index() -> None:
    [problem] = problems_of({"backends": [{"address": "h:1"}, {"address": "h:2", "wieght": 3}]})
    assert problem == "cfg.toml: backends[1].wieght: unknown key"


def test_every_problem_is_listed(tmp_path: Path) -> None:
    path = write(tmp_path, BAD_TOML)
    with pytest.raises(ConfigError) as info:
        load(path)
    problems = info.value.problems
    assert len(problems) >= 2
    assert all(p.startswith(f"{path}: ") for p in problems), problems
    paths = {p.split(": ")[1] for p in problems}
    assert {"listener.listen", "pool.bogus", "backends[0].weight"} <= paths, problems
    assert info.value.code == "CONFIG_INVALID"


@pytest.mark.parametrize(
    "address", ["nowhere", "host:", ":80", "host:port", "host:70000", "", "host:-1"]
)
def test_bad_addresses(address: str) -> None:
    cases: list[tuple[dict[str, Any], str]] = [
        ({"listener": {"listen": address}}, "listener.listen"),
        ({"admin": {"listen": address}}, "admin.listen"),
        ({"backends": [{"address": address}]}, "backends[0].address"),
    ]
    for data, key in cases:
        [problem] = problems_of(data)
        assert problem.startswith(f"cfg.toml: {key}: "), problem


@pytest.mark.parametrize("address", ["127.0.0.1:0", "localhost:7070", "[::1]:65535"])
def test_good_addresses(address: str) -> None:
    cfg = from_mapping({"listener": {"listen": address}, "backends": [{"address": address}]})
    assert cfg.listener.listen == address


def test_parse_host_port_strips_ipv6_brackets() -> None:
    assert config_mod.parse_host_port("[::1]:80") == ("::1", 80)
    assert config_mod.parse_host_port("example.com:443") == ("example.com", 443)


def test_backend_weight_zero_is_rejected() -> None:
    [problem] = problems_of({"backends": [{"address": "127.0.0.1:9001", "weight": 0}]})
    assert problem.startswith("cfg.toml: backends[0].weight: ")


def test_backend_needs_an_address() -> None:
    [problem] = problems_of({"backends": [{"weight": 2}]})
    assert problem.startswith("cfg.toml: backends[0].address: ")


def test_policy_must_be_a_known_one() -> None:
    [problem] = problems_of({"dispatch": {"policy": "fastest"}})
    assert problem.startswith("cfg.toml: dispatch.policy: ")
    assert "least_connections" in problem  # tells the operator the choices


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("pool", "idle_timeout_s", 0),
        ("pool", "connect_timeout_s", -1.0),
        ("dispatch", "queue_size", 0),
        ("dispatch", "max_retries", -1),
        ("listener", "max_frame_bytes", 0x8000_0000),
        ("health", "probe", "http"),
    ],
)
def test_out_of_range_values(section: str, key: str, value: object) -> None:
    [problem] = problems_of({section: {key: value}})
    assert problem.startswith(f"cfg.toml: {section}.{key}: ")


# -- health and gRPC channel options -------------------------------------------------------------


def test_health_options_live_in_their_own_section() -> None:
    cfg = from_mapping({"health": {"probe": "connect", "interval_s": 0.5, "timeout_s": 0.2,
                                   "failure_threshold": 5}})
    assert (cfg.health.probe, cfg.health.interval_s, cfg.health.timeout_s,
            cfg.health.failure_threshold) == ("connect", 0.5, 0.2, 5)
    assert RouterConfig().health == HealthConfig()
    assert (HealthConfig().interval_s, HealthConfig().failure_threshold) == (2.0, 3)


@pytest.mark.parametrize(
    "key", ["probe", "probe_interval_s", "probe_timeout_s", "failure_threshold"]
)
def test_health_keys_are_no_longer_pool_keys(key: str) -> None:
    assert problems_of({"pool": {key: 1}}) == [f"cfg.toml: pool.{key}: unknown key"]


# -- numbers: finite, bounded, strictly typed -----------------------------------------------------


def _fields_of_type(kind: type) -> list[tuple[str, str]]:
    """(section, key) of every option of ``kind`` (float: durations; int: counts)."""
    found = []
    for section, info in RouterConfig.model_fields.items():
        model = info.annotation
        if section == "backends":
            model = BackendConfig
        if section == "instances":
            model = InstanceConfig
        if section == "model_groups":
            model = ModelGroupConfig
        assert isinstance(model, type) and issubclass(model, BaseModel), section
        for key, field in model.model_fields.items():
            if field.annotation is kind:
                found.append((section, key))
    return found


DURATIONS = [(section, key) for section, key in _fields_of_type(float) if key.endswith("_s")]
# Floats that are neither durations nor fractions: factors, at least 1.
FACTORS = [("affinity", "load_bound")]
FRACTIONS = [(section, key) for section, key in _fields_of_type(float)
             if not key.endswith("_s") and (section, key) not in FACTORS]
INTEGERS = _fields_of_type(int)


def _entry(section: str, key: str, value: object) -> dict[str, Any]:
    if section == "backends":
        return {"backends": [{"address": "127.0.0.1:9001", key: value}]}
    if section == "instances":
        return {"instances": [{"name": "x", "command": ["x", "{port}"], key: value}]}
    return {section: {key: value}}


def _key_path(section: str, key: str) -> str:
    if section in ("backends", "instances"):
        return f"{section}[0].{key}"
    return f"{section}.{key}"


def test_every_duration_is_named_in_seconds() -> None:
    assert {("drain", "linger_s"), ("health", "interval_s")} <= set(DURATIONS), DURATIONS
    assert all(key.endswith("_s") for _, key in DURATIONS), DURATIONS
    assert {("dispatch", "queue_size"), ("backends", "weight")} <= set(INTEGERS), INTEGERS


@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan, 1e308, MAX_DURATION_S * 2])
@pytest.mark.parametrize(("section", "key"), DURATIONS)
def test_durations_must_be_finite_and_at_most_a_day(section: str, key: str, value: float) -> None:
    [problem] = problems_of(_entry(section, key, value))
    assert problem.startswith(f"cfg.toml: {_key_path(section, key)}: "), problem


@pytest.mark.parametrize(("section", "key"), DURATIONS)
def test_a_day_is_the_longest_duration(section: str, key: str) -> None:
    cfg = from_mapping(_entry(section, key, MAX_DURATION_S))
    holder = cfg.backends[0] if section == "backends" else getattr(cfg, section)
    assert getattr(holder, key) == MAX_DURATION_S


def test_an_integer_is_a_fine_duration() -> None:
    cfg = from_mapping({"dispatch": {"queue_timeout_s": 5}, "drain": {"linger_s": 1}})
    assert (cfg.dispatch.queue_timeout_s, cfg.drain.linger_s) == (5.0, 1.0)


@pytest.mark.parametrize("value", [True, False, "3", 3.0])
@pytest.mark.parametrize(("section", "key"), INTEGERS)
def test_an_integer_option_takes_only_an_integer(section: str, key: str, value: object) -> None:
    [problem] = problems_of(_entry(section, key, value))
    assert problem.startswith(f"cfg.toml: {_key_path(section, key)}: Input should be a valid "
                              "integer"), problem


@pytest.mark.parametrize("value", [True, "5"])
@pytest.mark.parametrize(("section", "key"), DURATIONS[:3])
def test_a_duration_takes_only_a_number(section: str, key: str, value: object) -> None:
    [problem] = problems_of(_entry(section, key, value))
    assert problem.startswith(f"cfg.toml: {_key_path(section, key)}: "), problem


@pytest.mark.parametrize("value", [1, "true"])
def test_a_flag_takes_only_a_bool(value: object) -> None:
    [problem] = problems_of({"listener": {"reuse_port": value}})
    assert problem.startswith("cfg.toml: listener.reuse_port: "), problem


def test_an_integer_option_true_in_a_file_is_an_error(tmp_path: Path) -> None:
    path = write(tmp_path, "[dispatch]\nqueue_size = true\n\n[drain]\nlinger_s = inf\n"
                 "shutdown_grace_s = nan\n\n[pool]\nidle_timeout_s = 1e308\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    keys = sorted(p.split(": ")[1] for p in info.value.problems)
    assert keys == ["dispatch.queue_size", "drain.linger_s", "drain.shutdown_grace_s",
                    "pool.idle_timeout_s"], info.value.problems
    assert all(p.startswith(f"{path}: ") for p in info.value.problems)


# -- one address, one listener --------------------------------------------------------------------


# An admin API off loopback needs credentials (router.core.config.AdminConfig).
TOKEN = {"token_file": "admin.token"}


@pytest.mark.parametrize(
    ("data", "key", "earlier"),
    [
        ({"listener": {"listen": "127.0.0.1:9000"}, "grpc": {"listen": "127.0.0.1:9000"}},
         "grpc.listen", "listener.listen"),
        ({"listener": {"listen": "127.0.0.1:9000"}, "admin": {"listen": "127.0.0.1:9000"}},
         "admin.listen", "listener.listen"),
        ({"grpc": {"listen": "127.0.0.1:7072"}}, "admin.listen", "grpc.listen"),  # default admin
        ({"admin": {"listen": "LOCALHOST:7070"}, "listener": {"listen": "localhost:7070"}},
         "admin.listen", "listener.listen"),
        ({"listener": {"listen": "0.0.0.0:9000"}, "grpc": {"listen": "127.0.0.1:9000"}},
         "grpc.listen", "listener.listen"),  # the wildcard takes the port on every address
        ({"listener": {"listen": "[::1]:9000"}, "admin": {"listen": "[::]:9000", **TOKEN}},
         "admin.listen", "listener.listen"),
    ],
)
def test_two_listeners_on_one_address_are_an_error(
    data: dict[str, Any], key: str, earlier: str
) -> None:
    [problem] = problems_of(data)
    assert problem.startswith(f"cfg.toml: {key}: "), problem
    assert problem.endswith(f" is already used by {earlier}"), problem


def test_three_listeners_on_one_address_list_both_conflicts() -> None:
    same = {"listen": "127.0.0.1:9000"}
    problems = problems_of({"listener": same, "grpc": same, "admin": same})
    assert problems == [
        "cfg.toml: grpc.listen: '127.0.0.1:9000' is already used by listener.listen",
        "cfg.toml: admin.listen: '127.0.0.1:9000' is already used by listener.listen",
        "cfg.toml: admin.listen: '127.0.0.1:9000' is already used by grpc.listen",
    ]


@pytest.mark.parametrize(
    "data",
    [
        {"listener": {"listen": "127.0.0.1:0"}, "grpc": {"listen": "127.0.0.1:0"},
         "admin": {"listen": "127.0.0.1:0"}},  # port 0: each gets a free port of its own
        {"listener": {"listen": "127.0.0.1:9000"}, "grpc": {"listen": "127.0.0.2:9000"}},
        {"listener": {"listen": "127.0.0.1:9000"}, "grpc": {"listen": "127.0.0.1:9001"}},
        {"listener": {"listen": "0.0.0.0:9000"}, "admin": {"listen": "0.0.0.0:9001", **TOKEN}},
    ],
)
def test_distinct_listeners_are_fine(data: dict[str, Any]) -> None:
    from_mapping(data)


def test_a_backend_listed_twice_is_an_error_but_port_zero_is_not() -> None:
    spawned = {"address": "127.0.0.1:0", "command": list(ECHO_COMMAND)}
    problems = problems_of({"backends": [
        {"address": "127.0.0.1:9001"}, spawned, spawned, {"address": "127.0.0.1:9001"},
    ]})
    assert problems == [
        "cfg.toml: backends[3].address: '127.0.0.1:9001' is already used by backends[0].address"
    ]


def test_an_address_clash_in_a_file_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, '[listener]\nlisten = "127.0.0.1:7072"\n')  # the admin default
    result = check_config(path)
    assert result.returncode == 2, result
    assert result.stderr.strip() == (
        f"{path}: admin.listen: '127.0.0.1:7072' is already used by listener.listen"
    )


# -- echoed values are short ----------------------------------------------------------------------


def test_a_huge_value_or_key_is_echoed_truncated() -> None:
    huge = "h" * 1_000_000
    problems = problems_of({"listener": {"listen": huge}, "backends": [
        {"address": "h:1", "models": [huge + ":"]}], "pool": {huge: 1}})
    assert len(problems) == 3, problems
    assert all(len(p) < 400 for p in problems), [len(p) for p in problems]
    assert any(p.startswith("cfg.toml: listener.listen: ") and "(1000000 bytes)" in p
               for p in problems), problems
    assert any(p.startswith("cfg.toml: pool.'hhhh") and p.endswith("unknown key")
               for p in problems), problems


def test_toml_syntax_error_names_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, "[pool\nmax_connections = 3\n")
    with pytest.raises(ConfigError) as info:
        load(path)
    [problem] = info.value.problems
    assert problem.startswith(f"{path}: ")
    assert "TOML" in problem


def test_missing_file_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load(path)
    [problem] = info.value.problems
    assert problem.startswith(f"{path}: ")


# -- check-config ---------------------------------------------------------------------------------


def check_config(path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "router", "check-config", str(path)],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=30, check=False,
    )


def test_check_config_lists_every_error_and_exits_2(tmp_path: Path) -> None:
    path = write(tmp_path, BAD_TOML)
    result = check_config(path)
    assert result.returncode == 2, result
    lines = result.stderr.strip().splitlines()
    assert len(lines) >= 3, result.stderr
    for key in ("listener.listen", "pool.bogus", "backends[0].weight"):
        assert any(line.startswith(f"{path}: {key}: ") for line in lines), result.stderr
    assert f"{path}: pool.bogus: unknown key" in lines


def test_check_config_good_file_exits_0(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD_TOML)
    result = check_config(path)
    assert result.returncode == 0, result
    assert result.stdout.strip() == f"{path}: ok"
    assert result.stderr == ""


# -- cli.build_config -----------------------------------------------------------------------------


def build(*argv: str) -> RouterConfig:
    return cli.build_config(cli._parser().parse_args(["serve", *argv]))


def test_flags_override_the_file(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD_TOML)
    cfg = build("--config", str(path), "--queue-size", "9", "--listen", "0.0.0.0:8080")
    assert cfg.dispatch.queue_size == 9
    assert cfg.listener.listen == "0.0.0.0:8080"
    assert cfg.dispatch.policy == "round_robin"  # the rest of the section is kept
    assert [b.address for b in cfg.backends] == ["127.0.0.1:9001", "[::1]:9002"]


def test_backend_flags_replace_the_files_backends(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD_TOML)
    cfg = build("--config", str(path), "--backend", "10.0.0.5:9000:3", "--backend", "h:9001")
    assert [(b.address, b.weight) for b in cfg.backends] == [("10.0.0.5:9000", 3), ("h:9001", 1)]


def test_backend_flag_with_ipv6_and_weight() -> None:
    cfg = build("--backend", "[::1]:9000:4")
    assert [(b.address, b.weight) for b in cfg.backends] == [("[::1]:9000", 4)]


def test_no_file_and_no_backend_gives_the_embedded_default() -> None:
    cfg = build()
    assert cfg.backends == ()
    [instance] = cfg.instances  # two managed echo replicas, each on a port of its own
    assert (instance.name, instance.command, instance.replicas) == ("echo", ECHO_COMMAND, 2)
    assert instance.base_port is None
    assert cfg.dispatch == RouterConfig().dispatch


def test_flags_apply_on_top_of_the_embedded_default() -> None:
    cfg = build("--queue-size", "10", "--shutdown-grace", "1.5")
    assert cfg.dispatch.queue_size == 10
    assert cfg.drain.shutdown_grace_s == 1.5
    assert [i.replicas for i in cfg.instances] == [2]
    assert "dispatch" not in config_mod.EMBEDDED_DEFAULT  # the default itself is untouched


def test_replicas_flag_runs_the_command_after_the_dashes() -> None:
    cfg = build("--replicas", "3", "--protocol", "grpc", "--model", "identity", "--",
                "python", "-m", "backends.kserve", "--port", "{port}")
    [instance] = cfg.instances
    assert instance.command == ("python", "-m", "backends.kserve", "--port", "{port}")
    assert (instance.replicas, instance.protocol, instance.models) == (3, "grpc", ("identity",))
    assert cfg.backends == ()  # not the embedded default's echo replicas as well


def test_replicas_flag_needs_a_command_and_a_command_needs_the_flag() -> None:
    with pytest.raises(ConfigError, match="needs the command after --"):
        build("--replicas", "2")
    with pytest.raises(ConfigError, match="needs --replicas N"):
        build("--", "python", "-m", "backends.echo")


def test_bad_flag_value_is_a_config_error_naming_the_command_line() -> None:
    with pytest.raises(ConfigError) as info:
        build("--backend", "h:1", "--queue-size", "0")
    assert info.value.problems[0].startswith("<command line>: dispatch.queue_size: ")


def test_bad_flag_over_a_file_reports_the_key_path(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD_TOML)
    with pytest.raises(ConfigError) as info:
        build("--config", str(path), "--listen", "nowhere")
    [problem] = info.value.problems
    assert ": listener.listen: " in problem


# -- examples/router.toml -------------------------------------------------------------------------


def test_the_example_lists_every_key_at_its_default() -> None:
    path = REPO_ROOT / "examples" / "router.toml"
    cfg = load(path)
    data = tomllib.loads(path.read_text())
    for section, info in RouterConfig.model_fields.items():
        if section in ("backends", "instances", "model_groups"):
            continue
        assert getattr(cfg, section) == info.default, section
        model = type(info.default)
        # Off by default: the gRPC front door, the state file, the access log; nested tables
        # ([listener.tls]) and unset paths are commented out too.
        commented = {"grpc": {"listen"}, "state": {"file"}, "access_log": {"path"}}.get(
            section, set())
        commented |= {key for key, field in model.model_fields.items() if field.default is None}
        assert set(data[section]) | commented == set(model.model_fields), section
    assert len(cfg.backends) >= 2
    assert cfg.instances and data["instances"]  # an example instance, at least
    # Off by default: a model group is shown commented out, every key of it named.
    assert cfg.model_groups == ()
    for key in ModelGroupConfig.model_fields:
        assert f"\n# {key} = " in path.read_text(), key


@pytest.mark.parametrize("value", [0.5, -1.0, 101.0, math.inf, math.nan, True, "2"])
@pytest.mark.parametrize(("section", "key"), FACTORS)
def test_a_factor_is_a_finite_number_from_one(section: str, key: str, value: object) -> None:
    [problem] = problems_of(_entry(section, key, value))
    assert problem.startswith(f"cfg.toml: {_key_path(section, key)}: "), problem
    assert getattr(from_mapping(_entry(section, key, 2)).affinity, key) == 2.0


@pytest.mark.parametrize("value", [-0.1, 1.5, math.inf, math.nan, True, "0.5"])
@pytest.mark.parametrize(("section", "key"), FRACTIONS)
def test_a_fraction_is_a_number_from_zero_to_one(section: str, key: str, value: object) -> None:
    assert FRACTIONS == [("health", "panic_threshold")]
    [problem] = problems_of(_entry(section, key, value))
    assert problem.startswith(f"cfg.toml: {_key_path(section, key)}: "), problem
