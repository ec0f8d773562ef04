"""Keyed frames: a routing key ahead of the payload, sans-IO.

On a listener in keyed mode (``listener.keyed = true``) the payload of every request frame
starts with its routing key::

    +-----------+------------------+---------------------------+
    | N: 1 byte | key: N bytes     | body: the rest            |
    +-----------+------------------+---------------------------+

``N`` is 0..255. ``N = 0`` is a request without a key (any backend may take it, as on a
plain listener). A key is a model key, ``"name"`` or ``"name:version"``: printable ASCII
without spaces (0x21..0x7E), a non-empty name, and after a colon a non-empty version with no
second colon. The router reads the key, routes on it, and forwards the frame unchanged, key
included: a keyed backend reads the key itself (``split``). Answers carry no key.

A payload shorter than ``1 + N`` bytes, or a key that is not a model key, is
``BadRoutingKey``: that request is answered with the error and the connection goes on, since
the frame itself was whole. The zero-length frame (a health probe) is a request without a key.

One byte of length keeps the cost to one index and one slice per request; 255 bytes are far
beyond any model name in use (KServe and Triton names are directory names).
"""

from __future__ import annotations

from router.core.errors import BadRoutingKey, quoted

MAX_KEY_BYTES = 255
_FIRST, _LAST = 0x21, 0x7E  # printable ASCII, space excluded


def encode_keyed(key: str | None, body: bytes) -> bytes:
    """The payload of a keyed frame (``encode_frame`` makes the frame of it). ``None`` or
    ``""``: no key. ``ValueError`` for a key that ``read_key`` would refuse."""
    if not key:
        return b"\x00" + body
    raw = key.encode("ascii", "strict") if key.isascii() else b""
    problem = _problem(raw) if raw else "not ASCII"
    if problem is not None:
        raise ValueError(f"routing key {quoted(key)}: {problem}")
    return bytes((len(raw),)) + raw + body


def read_key(payload: bytes) -> str | None:
    """The routing key of a keyed frame's payload (None: no key); ``BadRoutingKey`` when it
    is cut off or not a model key."""
    if not payload:
        return None
    size = payload[0]
    if not size:
        return None
    if len(payload) <= size:
        raise BadRoutingKey(
            f"a keyed frame of {len(payload)} bytes is too short for its {size}-byte key"
        )
    raw = payload[1:size + 1]
    problem = _problem(raw)
    if problem is not None:
        raise BadRoutingKey(f"routing key {quoted(raw)}: {problem}")
    return raw.decode("ascii")


def split(payload: bytes) -> tuple[str | None, bytes]:
    """(key, body) of a keyed frame's payload: what a keyed backend reads."""
    key = read_key(payload)
    return key, payload[1 + len(key):] if key else payload[1:]


def _problem(raw: bytes) -> str | None:
    """Why ``raw`` is not a model key, or None."""
    if len(raw) > MAX_KEY_BYTES:
        return f"longer than {MAX_KEY_BYTES} bytes"
    if min(raw) < _FIRST or max(raw) > _LAST:
        return "not printable ASCII without spaces"
    name, colon, version = raw.partition(b":")
    if not name:
        return "no model name before the colon"
    if colon and (not version or b":" in version):
        return 'expected "name" or "name:version"'
    return None
