"""gRPC server credentials from a ``ServerTls``: one definition for every grpc.aio listener
(the gRPC front door, the admin gRPC listener)."""

from __future__ import annotations

import grpc

from router.tls.context import ServerTls


def server_credentials(tls: ServerTls) -> grpc.ServerCredentials:
    """Credentials whose certificate, key and client CA follow ``tls``'s reloads: gRPC calls
    the fetcher (from its own threads, with the GIL) at each new handshake, and it returns a
    new configuration only once per reload.

    gRPC cannot ask for an optional client certificate: with ``require_client_cert = false``
    (allowed on the admin listener only) it asks for none, and callers present the token."""
    served = tls.generation

    def configuration() -> grpc.ServerCertificateConfiguration:
        material = tls.material
        chain = material.cert_chain or b""
        return grpc.ssl_server_certificate_configuration(
            [(material.key or chain, chain)], root_certificates=material.ca
        )

    def fetch() -> grpc.ServerCertificateConfiguration | None:
        nonlocal served
        if tls.generation == served:
            return None  # unchanged: gRPC keeps the configuration it has
        served = tls.generation
        return configuration()

    return grpc.dynamic_ssl_server_credentials(
        configuration(), fetch,
        require_client_authentication=tls.mutual and tls.config.require_client_cert,
    )
