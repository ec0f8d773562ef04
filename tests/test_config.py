"""router.core.config and the config side of router.cli: validation, error reporting, overrides."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from router import cli
from router.core import config as config_mod
from router.core.config import ECHO_COMMAND, RouterConfig, from_mapping, load
from router.core.errors import ConfigError

REPO_ROOT = Path(__file__).resolve().parent.parent

GOOD_TOML = """\
[listener]
listen = "127.0.0.1:7070"

[dispatch]
workers = 4
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
        cfg.dispatch.workers = 1  # type: ignore[misc]


def test_good_file_loads(tmp_path: Path) -> None:
    cfg = load(write(tmp_path, GOOD_TOML))
    assert cfg.dispatch.workers == 4
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
        ("dispatch", "workers", 0),
        ("dispatch", "max_retries", -1),
        ("listener", "max_frame_bytes", 0x8000_0000),
        ("health", "probe", "http"),
    ],
)
def test_out_of_range_values(section: str, key: str, value: object) -> None:
    [problem] = problems_of({section: {key: value}})
    assert problem.startswith(f"cfg.toml: {section}.{key}: ")


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
    cfg = build("--config", str(path), "--workers", "9", "--listen", "0.0.0.0:8080")
    assert cfg.dispatch.workers == 9
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
    assert len(cfg.backends) == 2
    for backend in cfg.backends:
        assert backend.command == ECHO_COMMAND
        assert config_mod.parse_host_port(backend.address)[1] == 0  # spawned on a free port
    assert cfg.dispatch == RouterConfig().dispatch


def test_flags_apply_on_top_of_the_embedded_default() -> None:
    cfg = build("--workers", "2", "--queue-size", "10", "--shutdown-grace", "1.5")
    assert (cfg.dispatch.workers, cfg.dispatch.queue_size) == (2, 10)
    assert cfg.drain.shutdown_grace_s == 1.5
    assert len(cfg.backends) == 2
    assert "dispatch" not in config_mod.EMBEDDED_DEFAULT  # the default itself is untouched


def test_bad_flag_value_is_a_config_error_naming_the_command_line() -> None:
    with pytest.raises(ConfigError) as info:
        build("--backend", "h:1", "--workers", "0")
    assert info.value.problems[0].startswith("<command line>: dispatch.workers: ")


def test_bad_flag_over_a_file_reports_the_key_path(tmp_path: Path) -> None:
    path = write(tmp_path, GOOD_TOML)
    with pytest.raises(ConfigError) as info:
        build("--config", str(path), "--listen", "nowhere")
    [problem] = info.value.problems
    assert ": listener.listen: " in problem
