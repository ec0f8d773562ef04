"""Fuzz target: the keyed-frame codec (router/protocol/keyed.py) on arbitrary payloads.

Held to a reference written here from the encoding's definition (docs/protocol.md, Keyed
frames): byte 0 is the key length N, the next N bytes the key, a model key of printable ASCII
without spaces with at most one colon between a non-empty name and a non-empty version. Every
payload is either read (and then ``split`` gives back the key and exactly the bytes after it)
or refused with ``BadRoutingKey``, never anything else; and every key ``encode_keyed``
accepts comes back from ``read_key`` unchanged, with the body intact.
"""

from __future__ import annotations

from hypothesis import example, given
from hypothesis import strategies as st

from router.core.errors import BadRoutingKey
from router.protocol.keyed import MAX_KEY_BYTES, encode_keyed, read_key, split
from tests.fuzz.budget import fuzz_target

PRINTABLE = "".join(chr(c) for c in range(0x21, 0x7F))


def reference(payload: bytes) -> tuple[str | None, bytes] | None:
    """(key, body), or None where the payload must be refused."""
    if not payload or payload[0] == 0:
        return None, payload[1:]
    size = payload[0]
    if len(payload) < 1 + size:
        return None
    key = payload[1:1 + size]
    if not all(0x21 <= b <= 0x7E for b in key):
        return None
    parts = key.split(b":")
    if not parts[0] or len(parts) > 2 or (len(parts) == 2 and not parts[1]):
        return None
    return key.decode("ascii"), payload[1 + size:]


def _refused(payload: bytes) -> bool:
    size = payload[0] if payload else 0
    return size > 0 and reference(payload) is None


# Payloads whose first byte is often a plausible length, with keys near the rules' edges.
keys = st.text(alphabet=PRINTABLE + " \x00\xe9", max_size=12)
payloads = st.one_of(
    st.binary(max_size=64),
    st.builds(lambda k, body, cut: (bytes((len(k.encode()) % 256,)) + k.encode() + body)[:cut],
              keys, st.binary(max_size=16), st.integers(0, 40)),
)


@fuzz_target(smoke_examples=150)
@given(payload=payloads)
@example(payload=b"\x01:")  # a colon with no name
@example(payload=b"\x03a:b")  # name:version
@example(payload=b"\x04a:b:")  # a second colon
@example(payload=b"\x05short")  # cut off at the key's end exactly: an empty body
@example(payload=b"\x06short")  # one byte short
def test_read_key_agrees_with_the_reference_on_any_payload(payload: bytes) -> None:
    if _refused(payload):
        try:
            read_key(payload)
        except BadRoutingKey:
            return
        raise AssertionError(f"accepted {payload!r}")
    expected = reference(payload)
    assert expected is not None
    # The reference takes a payload exactly as long as its key (no body); read_key needs the
    # key whole, so both agree there too.
    assert split(payload) == expected
    assert read_key(payload) == expected[0]


@fuzz_target(smoke_examples=100)
@given(
    name=st.text(alphabet=PRINTABLE.replace(":", ""), min_size=1, max_size=20),
    version=st.none() | st.text(alphabet=PRINTABLE.replace(":", ""), min_size=1, max_size=8),
    body=st.binary(max_size=64),
)
def test_every_encodable_key_reads_back_with_its_body(
    name: str, version: str | None, body: bytes
) -> None:
    key = name if version is None else f"{name}:{version}"
    payload = encode_keyed(key, body)
    assert payload[0] == len(key) <= MAX_KEY_BYTES
    assert split(payload) == (key, body)


@fuzz_target(smoke_examples=60)
@given(key=st.text(max_size=300), body=st.binary(max_size=8))
def test_encode_refuses_exactly_what_read_refuses(key: str, body: bytes) -> None:
    try:
        payload = encode_keyed(key, body)
    except ValueError:
        raw = key.encode("utf-8", "surrogatepass")
        if len(raw) > MAX_KEY_BYTES:
            return
        assert _refused(bytes((len(raw),)) + raw + body) or not key.isascii()
        return
    assert split(payload) == ((key or None), body)
