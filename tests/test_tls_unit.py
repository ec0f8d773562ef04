"""TLS and admin-credential parts without a network: the allow-list and peer identities, the
TLS config sections and their rules, loading and reloading certificates (errors name the key),
``check-config`` reading the files, and the Docker image's default command."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from router import cli
from router.core.config import RouterConfig, from_mapping, is_loopback
from router.core.errors import ConfigError
from router.tls.context import BackendTls, ServerTls, check_files
from router.tls.identity import AllowList, PeerIdentity
from tests.support import REPO_ROOT, child_env
from tests.tls_support import Pki


@pytest.fixture
def pki(tmp_path: Path) -> Pki:
    return Pki(tmp_path / "pki")


def problems_of(data: dict[str, Any]) -> list[str]:
    with pytest.raises(ConfigError) as info:
        from_mapping(data, "cfg.toml")
    return info.value.problems


# -- identities and the allow-list -------------------------------------------------------------

# What ssl's getpeercert() returns for a verified certificate.
PEERCERT = {
    "subject": ((("organizationName", "acme"),), (("commonName", "batch-worker"),)),
    "subjectAltName": (("DNS", "worker.example.org"), ("URI", "spiffe://example.org/sa/w"),
                       ("IP Address", "10.0.0.1")),
}


def test_an_identity_is_read_from_getpeercert_and_grpcs_auth_context() -> None:
    expected = PeerIdentity(("batch-worker",), ("worker.example.org",),
                            ("spiffe://example.org/sa/w",))
    assert PeerIdentity.from_peercert(PEERCERT) == expected
    assert PeerIdentity.from_peercert(None) is None  # no certificate
    assert PeerIdentity.from_peercert({}) is None  # presented but not verified
    auth = {"x509_pem_cert": [b"PEM"], "x509_common_name": [b"batch-worker"],
            "peer_dns": [b"worker.example.org"], "peer_uri": [b"spiffe://example.org/sa/w"]}
    assert PeerIdentity.from_auth_context(auth) == expected
    assert PeerIdentity.from_auth_context({"transport_security_type": [b"ssl"]}) is None


@pytest.mark.parametrize(("allow", "refused"), [
    (AllowList(), False),  # no list: every verified client
    (AllowList(common_names=frozenset({"batch-worker"})), False),
    (AllowList(dns_names=frozenset({"worker.example.org"})), False),
    (AllowList(uris=frozenset({"spiffe://example.org/sa/w"})), False),
    (AllowList(common_names=frozenset({"worker.example.org"})), True),  # a DNS name is no CN
    (AllowList(uris=frozenset({"spiffe://example.org/sa"})), True),  # exact, not a prefix
    (AllowList(dns_names=frozenset({"10.0.0.1"})), True),  # an IP SAN is not a DNS name
])
def test_the_allow_list_matches_cn_dns_and_uri_exactly(allow: AllowList, refused: bool) -> None:
    identity = PeerIdentity.from_peercert(PEERCERT)
    reason = allow.refusal(identity)
    assert (reason is not None) == refused
    if refused:
        assert "batch-worker" in str(reason) and "allow-list" in str(reason)


def test_a_client_without_a_certificate_is_refused_by_an_active_list_only() -> None:
    assert AllowList().refusal(None) is None
    assert AllowList(common_names=frozenset({"x"})).refusal(None) == (
        "no client certificate was presented")


# -- the config sections -----------------------------------------------------------------------


@pytest.mark.parametrize(("data", "expected"), [
    ({"listener": {"tls": {"cert_file": "c.pem", "allowed_client_cns": ["w"]}}},
     "cfg.toml: listener.tls: allowed_client_* lists need client_ca_file (mutual TLS)"),
    ({"grpc": {"tls": {"cert_file": "c.pem", "client_ca_file": "ca.pem",
                       "require_client_cert": False}}},
     "cfg.toml: grpc: tls.require_client_cert = false: gRPC asks for a client certificate "
     "only when it requires one"),
    ({"admin": {"listen": "0.0.0.0:7072"}},
     "cfg.toml: admin: listen '0.0.0.0:7072' is reachable from other machines: set "
     "token_file or tls.client_ca_file, or listen on a loopback address"),
    ({"backend_tls": {"key_file": "k.pem"}}, "cfg.toml: backend_tls: key_file needs cert_file"),
    ({"listener": {"tls": {"key_file": "k.pem"}}},
     "cfg.toml: listener.tls.cert_file: Field required"),
    ({"listener": {"tls": {"cert_file": ""}}},
     "cfg.toml: listener.tls.cert_file: Value error, expected a file path, got ''"),
    ({"admin": {"tls": {"cert_file": "c.pem", "min_version": "1.1"}}},
     "cfg.toml: admin.tls.min_version: Input should be '1.2' or '1.3'"),
    ({"listener": {"tls": {"cert_file": "c.pem", "ciphers": "ALL"}}},
     "cfg.toml: listener.tls.ciphers: unknown key"),
])
def test_tls_sections_are_validated_with_key_paths(data: dict[str, Any], expected: str) -> None:
    assert problems_of(data) == [expected]


@pytest.mark.parametrize("admin", [
    {"listen": "0.0.0.0:7072", "token_file": "t"},
    {"listen": "[::]:7072", "tls": {"cert_file": "c.pem", "client_ca_file": "ca.pem"}},
    {"listen": "127.0.0.2:7072"}, {"listen": "[::1]:7072"}, {"listen": "localhost:7072"},
])
def test_admin_off_loopback_is_fine_with_credentials_and_loopback_without(
    admin: dict[str, Any],
) -> None:
    from_mapping({"admin": admin})


def test_loopback_is_127_slash_8_ipv6_loopback_and_localhost_only() -> None:
    assert [is_loopback(h) for h in ("127.0.0.1", "127.9.9.9", "::1", "LOCALHOST")] == [True] * 4
    assert [is_loopback(h) for h in ("0.0.0.0", "::", "10.0.0.1", "router.internal")] == (
        [False] * 4)


def test_a_backend_uses_its_own_tls_table_or_the_default_section() -> None:
    cfg = from_mapping({
        "backend_tls": {"enabled": True, "ca_file": "fleet-ca.pem"},
        "backends": [{"address": "h:1"}, {"address": "h:2", "tls": {"ca_file": "own.pem"}},
                     {"address": "h:3", "tls": {"enabled": False}}],
    })
    tls = [cfg.tls_of(b) for b in cfg.backends]
    assert [t.ca_file if t is not None else None for t in tls] == ["fleet-ca.pem", "own.pem",
                                                                   None]
    plain = from_mapping({"backends": [{"address": "h:1"}]})
    assert plain.tls_of(plain.backends[0]) is None  # [backend_tls] is off unless enabled


# -- loading and reloading ---------------------------------------------------------------------


def test_files_that_cannot_be_used_are_config_errors_naming_the_key(
    pki: Pki, tmp_path: Path
) -> None:
    missing = str(tmp_path / "missing.pem")
    cfg = from_mapping({
        "listener": {"tls": {"cert_file": missing}},
        "grpc": {"tls": {"cert_file": str(pki.server.cert), "key_file": str(pki.intruder.key)}},
        "admin": {"tls": {**pki.server_only(), "client_ca_file": str(pki.server.key)}},
        "backends": [{"address": "127.0.0.1:1", "tls": {"ca_file": missing}}],
    })
    problems = check_files(cfg)
    assert [p.split(":", 1)[0] for p in problems] == [
        "listener.tls.cert_file", "grpc.tls.cert_file", "admin.tls.client_ca_file",
        "backends[0].tls.ca_file"]
    assert "No such file or directory" in problems[0]
    assert "KEY_VALUES_MISMATCH" in problems[1] or "key values mismatch" in problems[1]


def test_a_reload_swaps_in_new_files_and_a_failed_one_keeps_the_running_context(
    pki: Pki, tmp_path: Path
) -> None:
    cert, key = tmp_path / "live.pem", tmp_path / "live.key"
    shutil.copy(pki.server.cert, cert)
    shutil.copy(pki.server.key, key)
    cfg = from_mapping({"listener": {"tls": {"cert_file": str(cert), "key_file": str(key)}}})
    assert cfg.listener.tls is not None
    tls = ServerTls(cfg.listener.tls, "listener.tls")
    context, material = tls.context, tls.material
    shutil.copy(pki.allowed_cn.cert, cert)
    shutil.copy(pki.allowed_cn.key, key)
    tls.reload()
    assert tls.context is context  # the one the transports hold stays; handshakes switch
    assert tls.material.cert_chain == pki.allowed_cn.cert.read_bytes() != material.cert_chain
    assert (tls.generation, tls.reloads) == (1, 1)
    key.write_text("garbage")
    with pytest.raises(ConfigError):
        tls.reload()
    assert tls.material.cert_chain == pki.allowed_cn.cert.read_bytes()
    assert (tls.generation, tls.reload_failures) == (1, 1)


def test_a_backend_is_verified_for_its_host_unless_server_name_says_otherwise(pki: Pki) -> None:
    cfg = from_mapping({"backend_tls": {"enabled": True, "ca_file": str(pki.ca_file)}})
    assert BackendTls(cfg.backend_tls, "backend_tls", "10.1.2.3").server_name == "10.1.2.3"
    named = cfg.backend_tls.model_copy(update={"server_name": "echo.test"})
    assert BackendTls(named, "backend_tls", "10.1.2.3").server_name == "echo.test"


# -- the command line and the image -----------------------------------------------------------


def test_check_config_reads_the_certificate_files(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], pki: Pki
) -> None:
    path = tmp_path / "router.toml"
    path.write_text(f'[listener.tls]\ncert_file = "{tmp_path / "nope.pem"}"\n'
                    f'[admin]\ntoken_file = "{tmp_path / "no.token"}"\n')
    with pytest.raises(SystemExit) as info:
        cli.main(["check-config", str(path)])
    assert info.value.code == 2
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(":", 1)[0] for line in lines] == ["listener.tls.cert_file",
                                                         "admin.token_file"]
    path.write_text(f'[listener.tls]\ncert_file = "{pki.server.cert}"\n'
                    f'key_file = "{pki.server.key}"\n')
    cli.main(["check-config", str(path)])
    assert capsys.readouterr().out == f"{path}: ok\n"


def test_serve_with_an_unusable_certificate_says_so_in_one_line_and_exits_2(
    tmp_path: Path
) -> None:
    path = tmp_path / "router.toml"
    path.write_text(f'[listener]\nlisten = "127.0.0.1:0"\n[admin]\nlisten = "127.0.0.1:0"\n'
                    f'[listener.tls]\ncert_file = "{tmp_path / "nope.pem"}"\n'
                    '[[backends]]\naddress = "127.0.0.1:1"\n')
    done = subprocess.run([sys.executable, "-m", "router", "serve", "--config", str(path)],
                          capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
                          env=child_env())
    assert done.returncode == 2, done.stderr
    assert done.stderr.strip().splitlines()[-1].startswith("listener.tls.cert_file: cannot read")
    assert "Traceback" not in done.stderr


def _dockerfile_command() -> list[str]:
    lines = (REPO_ROOT / "Dockerfile").read_text().replace("\\\n", " ").splitlines()
    [cmd] = [line for line in lines if line.startswith("CMD ")]
    command: list[str] = json.loads(cmd.removeprefix("CMD "))
    return command


def test_the_images_default_command_keeps_the_admin_api_on_loopback() -> None:
    cfg: RouterConfig = cli.build_config(cli._parser().parse_args(["serve",
                                                                   *_dockerfile_command()]))
    assert cfg.listener.listen == "0.0.0.0:7070"
    assert is_loopback(cfg.admin.listen.rpartition(":")[0])
    with pytest.raises(ConfigError):  # and it could not be published without credentials
        cli.build_config(cli._parser().parse_args(["serve", "--admin", "0.0.0.0:7072"]))
