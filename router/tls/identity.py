"""Who a client is, read from its verified certificate, and the allow-list that decides.

Pure: a peer's identity comes from what the TLS layer reports (``SSLObject.getpeercert()`` on
the TCP and admin listeners, the auth context on gRPC), and ``AllowList.refusal`` decides on
exact matches. A client is let in when its certificate's subject common name, one of its DNS
subject alternative names or one of its URI SANs (SPIFFE IDs) is listed; a client without a
certificate matches nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from router.core.config import ServerTlsConfig
from router.core.errors import quoted


@dataclass(frozen=True, slots=True)
class PeerIdentity:
    common_names: tuple[str, ...] = ()
    dns_names: tuple[str, ...] = ()
    uris: tuple[str, ...] = ()

    @classmethod
    def from_peercert(cls, cert: Mapping[str, Any] | None) -> PeerIdentity | None:
        """From ``getpeercert()``: None (no certificate) or {} (not verified) gives None."""
        if not cert:
            return None
        common_names = tuple(
            value for rdn in cert.get("subject", ()) for key, value in rdn if key == "commonName"
        )
        sans: Sequence[tuple[str, str]] = cert.get("subjectAltName", ())
        return cls(
            common_names,
            tuple(value for kind, value in sans if kind == "DNS"),
            tuple(value for kind, value in sans if kind == "URI"),
        )

    @classmethod
    def from_auth_context(cls, auth: Mapping[str, Sequence[bytes]]) -> PeerIdentity | None:
        """From gRPC's ``ServicerContext.auth_context()``; None without a client certificate."""
        if not auth.get("x509_pem_cert"):
            return None

        def texts(key: str) -> tuple[str, ...]:
            return tuple(v.decode(errors="replace") for v in auth.get(key, ()))

        return cls(texts("x509_common_name"), texts("peer_dns"), texts("peer_uri"))

    def describe(self) -> str:
        parts = [f"CN={quoted(cn)}" for cn in self.common_names[:1]]
        parts += [f"DNS:{quoted(n)}" for n in self.dns_names[:2]]
        parts += [f"URI:{quoted(u)}" for u in self.uris[:2]]
        return ", ".join(parts) or "no names"


@dataclass(frozen=True, slots=True)
class AllowList:
    common_names: frozenset[str] = frozenset()
    dns_names: frozenset[str] = frozenset()
    uris: frozenset[str] = frozenset()

    @classmethod
    def from_config(cls, config: ServerTlsConfig) -> AllowList:
        return cls(frozenset(config.allowed_client_cns), frozenset(config.allowed_client_dns),
                   frozenset(config.allowed_client_uris))

    @property
    def active(self) -> bool:
        """Whether the list restricts anyone (empty: every verified client is let in)."""
        return bool(self.common_names or self.dns_names or self.uris)

    def refusal(self, identity: PeerIdentity | None) -> str | None:
        """Why ``identity`` is refused, or None when it is let in."""
        if not self.active:
            return None
        if identity is None:
            return "no client certificate was presented"
        if (_any_in(identity.common_names, self.common_names)
                or _any_in(identity.dns_names, self.dns_names)
                or _any_in(identity.uris, self.uris)):
            return None
        return f"client certificate ({identity.describe()}) is not on the allow-list"


def _any_in(names: Iterable[str], allowed: frozenset[str]) -> bool:
    return any(name in allowed for name in names)
