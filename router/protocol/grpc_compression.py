"""The start of a compressed gRPC message, decompressed within a bound, for the KServe field
reader. Sans-IO: bytes in, bytes out.

A call routed by ``model_name`` needs the model fields of its first message; when the client
compressed it (the message's flag byte is 1, ``grpc-encoding`` names the algorithm), only its
start is decompressed: at most ``PREFIX_BYTES`` of output, so a message that inflates to
gigabytes costs the router 64 KiB. The message goes to the backend as it came, compressed.
The model fields lead the message (field numbers 1 and 2, and protobuf writers emit fields in
field-number order), so the reader is given the whole top-level fields of that start.

gRPC's encodings: ``gzip`` (RFC 1952) and ``deflate`` (zlib format, RFC 1950), both read with
``zlib``; ``identity`` with the flag set, or any other name, is not readable:
``UnsupportedEncoding`` (UNIMPLEMENTED, as gRPC prescribes). Data that does not decompress is
``BadCompressedMessage`` (INVALID_ARGUMENT). No other exception escapes (a hypothesis test
holds it to that).
"""

from __future__ import annotations

import zlib

from router.core.errors import BadCompressedMessage, UnsupportedEncoding, quoted

PREFIX_BYTES = 64 * 1024
_WBITS = {"gzip": 16 + zlib.MAX_WBITS, "deflate": zlib.MAX_WBITS}


def decompressed_start(encoding: str | None, data: bytes, limit: int = PREFIX_BYTES
                       ) -> tuple[bytes, bool]:
    """The first ``limit`` bytes (at most) of ``data`` decompressed, and whether that is the
    whole message. Raises ``UnsupportedEncoding`` or ``BadCompressedMessage``."""
    wbits = _WBITS.get(encoding or "")
    if wbits is None:
        raise UnsupportedEncoding(
            f"a compressed message in grpc-encoding {quoted(encoding or '')}: the router reads "
            f"{' and '.join(sorted(_WBITS))}")
    inflater = zlib.decompressobj(wbits)
    try:
        out = inflater.decompress(data, limit)
    except zlib.error as exc:
        raise BadCompressedMessage(f"the message does not decompress ({encoding}): {exc}"
                                   ) from None
    if len(out) >= limit and (inflater.unconsumed_tail or not inflater.eof):
        return out, False
    if not inflater.eof:
        raise BadCompressedMessage(f"the message ends inside its {encoding} stream")
    return out, True
