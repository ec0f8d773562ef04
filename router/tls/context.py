"""TLS contexts built from the config, and their reload without dropping a connection.

Server side (``ServerTls``, one per listener): TLS 1.2 or later (``min_version``), ECDHE key
exchange with AES-GCM or ChaCha20-Poly1305 for TLS 1.2 (TLS 1.3's suites are all of that
kind), no compression, no renegotiation. With ``client_ca_file``, client certificates are
verified against it (required, or optional on the admin API), and ``AllowList`` decides which
verified identities are let in.

Reload: the context handed to the transport (uvloop, aiohttp) is fixed when the listener
starts, so ``ServerTls.context`` stays the same object for the listener's life and its
``sni_callback``, which OpenSSL runs on every ClientHello (with or without SNI), switches each
new handshake to the newest loaded context: its certificate, key and client CA. A connection
already up keeps the context it was made with. A reload that fails (unreadable file, a key
that does not match the certificate) raises and leaves the running context in place.

The same files are also read as bytes (``TlsMaterial``) for gRPC, whose credentials take PEM
bytes rather than an ``ssl.SSLContext``; loading both from the files at once means a file gRPC
would choke on is refused here first, with the key that names it.

Client side (``BackendTls``, one per backend reached over TLS): the backend's certificate
verified against ``ca_file`` (or the system store) for ``server_name``, and the router's own
client certificate if configured. Dials after a reload use the new context.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from router.core.config import BackendTlsConfig, RouterConfig, ServerTlsConfig, parse_host_port
from router.core.errors import ClientNotAllowed, ConfigError, quoted
from router.tls.identity import AllowList, PeerIdentity

log = logging.getLogger(__name__)

# TLS 1.2 suites (OpenSSL names): forward secrecy and AEAD only. TLS 1.3 suites are OpenSSL's
# defaults (AES-GCM, ChaCha20-Poly1305), all of that kind already.
TLS12_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
MIN_VERSIONS = {"1.2": ssl.TLSVersion.TLSv1_2, "1.3": ssl.TLSVersion.TLSv1_3}


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    """PEM bytes as read from the files: what gRPC's credentials take."""

    cert_chain: bytes | None = None
    key: bytes | None = None
    ca: bytes | None = None


def _read(key: str, path: str | None) -> bytes | None:
    if path is None:
        return None
    try:
        return Path(path).read_bytes()
    except OSError as exc:
        raise ConfigError([f"{key}: cannot read {quoted(path)}: {exc.strerror}"]) from None


def _harden(ctx: ssl.SSLContext, min_version: str = "1.2") -> None:
    ctx.minimum_version = MIN_VERSIONS[min_version]
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION


def _load_chain(ctx: ssl.SSLContext, key: str, cert_file: str, key_file: str | None) -> None:
    try:
        ctx.load_cert_chain(cert_file, key_file)
    except ssl.SSLError as exc:
        files = quoted(cert_file) + (f" / {quoted(key_file)}" if key_file else "")
        raise ConfigError([f"{key}.cert_file: cannot load the certificate and key {files}: "
                           f"{exc.reason or exc}"]) from None


def _load_ca(ctx: ssl.SSLContext, key: str, ca: bytes) -> None:
    try:
        ctx.load_verify_locations(cadata=ca.decode("ascii", errors="replace"))
    except ssl.SSLError as exc:
        raise ConfigError([f"{key}: not a PEM CA certificate: {exc.reason or exc}"]) from None


def server_context(config: ServerTlsConfig, key: str, alpn: tuple[str, ...] = ()
                   ) -> tuple[ssl.SSLContext, TlsMaterial]:
    """The context of a listener, and the PEM bytes it was built from; ``ConfigError`` (with
    ``key``, the config path of the TLS table) for a file that cannot be used."""
    material = TlsMaterial(
        _read(f"{key}.cert_file", config.cert_file),
        _read(f"{key}.key_file", config.key_file),
        _read(f"{key}.client_ca_file", config.client_ca_file),
    )
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    _harden(ctx, config.min_version)
    _load_chain(ctx, key, config.cert_file, config.key_file)
    if material.ca is not None:
        _load_ca(ctx, f"{key}.client_ca_file", material.ca)
        ctx.verify_mode = ssl.CERT_REQUIRED if config.require_client_cert else ssl.CERT_OPTIONAL
    if alpn:
        ctx.set_alpn_protocols(list(alpn))
    return ctx, material


class ServerTls:
    """The TLS of one listener: the context its transports use, the allow-list, counters."""

    def __init__(self, config: ServerTlsConfig, key: str, *, alpn: tuple[str, ...] = ()) -> None:
        self.config = config
        self.key = key  # the config path of the table, "listener.tls": names it in errors
        self._alpn = alpn
        self.allow_list = AllowList.from_config(config)
        self.context, self.material = server_context(config, key, alpn)
        self._current = self.context
        self.context.sni_callback = self._select
        self.generation = 0  # bumped by every successful reload
        self.handshake_failures = 0
        self.refused = 0
        self.reloads = 0
        self.reload_failures = 0

    def _select(self, ssl_object: Any, server_name: str | None, context: ssl.SSLContext) -> None:
        current = self._current
        if current is not context:
            ssl_object.context = current  # the newest certificate, key and client CA

    def reload(self) -> None:
        """Re-read the files; new handshakes use them. Raises ``ConfigError`` and keeps the
        running context if they cannot be used."""
        try:
            ctx, material = server_context(self.config, self.key, self._alpn)
        except ConfigError:
            self.reload_failures += 1
            raise
        self._current, self.material = ctx, material
        self.generation += 1
        self.reloads += 1

    @property
    def mutual(self) -> bool:
        return self.config.client_ca_file is not None

    def refusal(self, identity: PeerIdentity | None) -> ClientNotAllowed | None:
        """The error to refuse ``identity`` with (counted), or None when it is let in."""
        reason = self.allow_list.refusal(identity)
        if reason is None:
            return None
        self.refused += 1
        return ClientNotAllowed(reason)

    def statistics(self) -> dict[str, Any]:
        return {
            "mutual": self.mutual,
            "allow_list": self.allow_list.active,
            "generation": self.generation,
            "handshake_failures": self.handshake_failures,
            "clients_refused": self.refused,
            "reloads": self.reloads,
            "reload_failures": self.reload_failures,
        }

    def __repr__(self) -> str:
        return f"ServerTls({self.key}, mutual={self.mutual}, generation={self.generation})"


class BackendTls:
    """TLS towards one backend: the context a dial uses, and the PEM bytes for gRPC."""

    def __init__(self, config: BackendTlsConfig, key: str, host: str) -> None:
        self.config = config
        self.key = key  # "backends[2].tls" or "backend_tls"
        self.server_name = config.server_name or host
        self.context, self.material = self._load()
        self.generation = 0
        self.reloads = 0
        self.reload_failures = 0

    def _load(self) -> tuple[ssl.SSLContext, TlsMaterial]:
        config, key = self.config, self.key
        material = TlsMaterial(
            _read(f"{key}.cert_file", config.cert_file),
            _read(f"{key}.key_file", config.key_file),
            _read(f"{key}.ca_file", config.ca_file),
        )
        ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)  # verifies the chain and the name
        _harden(ctx)
        if material.ca is not None:
            _load_ca(ctx, f"{key}.ca_file", material.ca)
        else:
            ctx.load_default_certs(ssl.Purpose.SERVER_AUTH)
        if config.cert_file is not None:
            _load_chain(ctx, key, config.cert_file, config.key_file)
        return ctx, material

    def reload(self) -> None:
        """Re-read the files; dials (and gRPC channels) opened from now on use them."""
        try:
            self.context, self.material = self._load()
        except ConfigError:
            self.reload_failures += 1
            raise
        self.generation += 1
        self.reloads += 1

    def statistics(self) -> dict[str, Any]:
        return {"server_name": self.server_name, "generation": self.generation,
                "reloads": self.reloads, "reload_failures": self.reload_failures}

    def __repr__(self) -> str:
        return f"BackendTls({self.key}, server_name={self.server_name!r})"


def check_files(config: RouterConfig) -> list[str]:
    """Every problem loading the TLS files ``config`` names (``check-config``), each with its
    key path; what starting the router would refuse."""
    problems: list[str] = []
    listeners = (("listener.tls", config.listener.tls), ("grpc.tls", config.grpc.tls),
                 ("admin.tls", config.admin.tls))
    for key, server in listeners:
        if server is not None:
            try:
                server_context(server, key)
            except ConfigError as exc:
                problems += exc.problems
    for i, backend in enumerate(config.backends):
        client = config.tls_of(backend)
        if client is not None:
            key = f"backends[{i}].tls" if backend.tls is not None else "backend_tls"
            try:
                BackendTls(client, key, parse_host_port(backend.address)[0])
            except ConfigError as exc:
                problems += [p for p in exc.problems if p not in problems]
    return problems


class Reloadable(Protocol):
    """Something that re-reads its files: a listener's or backend's TLS, the admin token."""

    def reload(self) -> None:
        """Re-read; ``ConfigError`` (the running files kept) when they cannot be loaded."""
        ...


def reload_each(parts: Iterable[Reloadable]) -> list[str]:
    """Reload every part; the problems of those that failed (each keeps what it had), logged."""
    problems: list[str] = []
    for part in parts:
        try:
            part.reload()
        except ConfigError as exc:
            problems += exc.problems
    for problem in problems:
        log.error("certificate reload: %s (the running one stays)", problem)
    return problems
