"""Certificates for the TLS tests, made with trustme: CAs, the router's and a backend's server
certificates, and clients allowed and not (by CN, DNS SAN, URI SAN), expired and untrusted.

trustme names leaves by DNS name, IP address or e-mail only; ``issue_uri_cert`` signs a
certificate with a URI SAN (a SPIFFE ID) with the trustme CA's key through ``cryptography``,
which trustme itself is built on.
"""

from __future__ import annotations

import datetime
import ssl
from dataclasses import dataclass
from pathlib import Path

import trustme
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

SPIFFE_ID = "spiffe://example.org/ns/prod/sa/worker"


@dataclass(frozen=True)
class Identity:
    """A certificate on disk: ``cert`` holds the chain, ``key`` the private key."""

    cert: Path
    key: Path


def write_leaf(leaf: trustme.LeafCert, directory: Path, name: str) -> Identity:
    cert, key = directory / f"{name}.pem", directory / f"{name}.key"
    leaf.cert_chain_pems[0].write_to_path(str(cert))
    for extra in leaf.cert_chain_pems[1:]:
        extra.write_to_path(str(cert), append=True)
    leaf.private_key_pem.write_to_path(str(key))
    return Identity(cert, key)


def issue_uri_cert(ca: trustme.CA, uri: str, directory: Path, name: str) -> Identity:
    """A client certificate whose only name is the URI SAN ``uri``."""
    ca_key = serialization.load_pem_private_key(ca.private_key_pem.bytes(), password=None)
    ca_cert = x509.load_pem_x509_certificate(ca.cert_pem.bytes())
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.ORGANIZATION_NAME, "uri only")]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(hours=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.UniformResourceIdentifier(uri)]),
                       critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.CLIENT_AUTH]), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())  # type: ignore[arg-type]  # an EC key: signs
    )
    paths = Identity(directory / f"{name}.pem", directory / f"{name}.key")
    paths.cert.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    paths.key.write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    ))
    return paths


class Pki:
    """Everything a TLS test needs, written under ``directory``.

    - ``ca``: signs the router's and backends' server certificates and the clients';
    - ``server``: the router's certificate (localhost, 127.0.0.1; CN router-1);
    - ``backend``: a backend's certificate for the name ``echo.test`` only;
    - ``allowed_cn`` (CN batch-worker), ``allowed_dns`` (DNS worker.example.org), ``allowed_uri``
      (the SPIFFE ID ``SPIFFE_ID``), ``intruder`` (CN intruder), ``expired`` (CN batch-worker,
      expired yesterday), ``untrusted`` (CN batch-worker, from another CA), ``router_client``
      (what the router presents to a backend that asks).
    """

    def __init__(self, directory: Path) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        self.directory = directory
        self.ca = trustme.CA()
        self.ca_file = directory / "ca.pem"
        self.ca.cert_pem.write_to_path(str(self.ca_file))
        self.other_ca = trustme.CA()
        self.other_ca_file = directory / "other-ca.pem"
        self.other_ca.cert_pem.write_to_path(str(self.other_ca_file))
        self.server = self.issue("server", "localhost", "127.0.0.1", common_name="router-1")
        self.backend = self.issue("backend", "echo.test", common_name="echo")
        self.allowed_cn = self.issue("allowed-cn", "client.invalid", common_name="batch-worker")
        self.allowed_dns = self.issue("allowed-dns", "worker.example.org", common_name="w-2")
        self.allowed_uri = issue_uri_cert(self.ca, SPIFFE_ID, directory, "allowed-uri")
        self.intruder = self.issue("intruder", "intruder.example.org", common_name="intruder")
        yesterday = datetime.datetime.now(datetime.UTC) - datetime.timedelta(days=1)
        self.expired = self.issue(
            "expired", "client.invalid", common_name="batch-worker",
            not_before=yesterday - datetime.timedelta(days=30), not_after=yesterday,
        )
        self.untrusted = write_leaf(
            self.other_ca.issue_cert("client.invalid", common_name="batch-worker"),
            directory, "untrusted",
        )
        self.router_client = self.issue("router-client", "router.invalid", common_name="router")

    def issue(self, name: str, *identities: str, ca: trustme.CA | None = None,
              **kwargs: object) -> Identity:
        leaf = (ca or self.ca).issue_cert(*identities, **kwargs)  # type: ignore[arg-type]
        return write_leaf(leaf, self.directory, name)

    def mutual(self, **extra: object) -> dict[str, object]:
        """A listener's ``tls`` table: the server certificate, clients signed by ``ca``."""
        return {"cert_file": str(self.server.cert), "key_file": str(self.server.key),
                "client_ca_file": str(self.ca_file), **extra}

    def server_only(self) -> dict[str, object]:
        return {"cert_file": str(self.server.cert), "key_file": str(self.server.key)}

    def client_context(self, identity: Identity | None = None, *,
                       trust: Path | None = None) -> ssl.SSLContext:
        """What a client uses: trusts ``trust`` (default ``ca``), presents ``identity``."""
        ctx = ssl.create_default_context(cafile=str(trust or self.ca_file))
        if identity is not None:
            ctx.load_cert_chain(str(identity.cert), str(identity.key))
        return ctx
