"""HPACK for the relay: decode with the ``hpack`` library only where needed, encode from a cache.

Decoding. The relay advertises SETTINGS_HEADER_TABLE_SIZE = 0. Until the peer acknowledges
that, it may still use a dynamic table of up to 4,096 bytes (RFC 7541's default), and its
first header block after the acknowledgement must shrink the table to 0 (section 4.2; the
library refuses a block that does not). From then on a block can only reference the static
table, so its decoding depends on its bytes alone: ``HeaderDecoder`` keeps decoded blocks in a
bounded cache keyed by their bytes, taken only when the table was empty at size 0 before the
block and still is after it. A unary call's response headers and trailers repeat byte for
byte, so most blocks cost one dict lookup.

Limits: a block longer than ``max_header_list_size`` is refused before it is decoded, and the
library bounds the decoded list by the same number; both are COMPRESSION_ERROR or
ENHANCE_YOUR_CALM connection errors (``H2Error``), since after a half-decoded block the
peer's table and ours may differ.

Encoding. ``encode_block`` never uses the dynamic table (literal without indexing, the name
from the static table where it is there; indexed where the whole field is), so it needs no
state per connection and no table size update, whatever size the peer allows. Encoded fields
are cached by (name, value) in one bounded dict: ``content-type: application/grpc`` or
``grpc-status: 0`` is encoded once per process.
"""

from __future__ import annotations

from collections.abc import Iterable

from hpack import Decoder, HPACKDecodingError
from hpack.table import HeaderTable

from router.protocol.h2frames import COMPRESSION_ERROR, ENHANCE_YOUR_CALM, H2Error

Headers = list[tuple[str, str]]

# Distinct blocks kept per connection: a relayed service sends a handful (request headers per
# method, response headers, a few trailer variants); a varying field (grpc-timeout, a request
# id) makes each block new, which the bound keeps from growing the cache.
_BLOCK_CACHE_SIZE = 64
_FIELD_CACHE_SIZE = 4096

_STATIC_FIELD: dict[tuple[str, str], int] = {}
_STATIC_NAME: dict[str, int] = {}
for _index, (_name, _value) in enumerate(HeaderTable.STATIC_TABLE, start=1):
    _STATIC_FIELD.setdefault((_name.decode(), _value.decode()), _index)
    _STATIC_NAME.setdefault(_name.decode(), _index)


class HeaderDecoder:
    """One connection's HPACK decoding context (the peer's encoder's mirror)."""

    __slots__ = ("_cache", "_decoder", "decoded", "hits", "max_header_list_size")

    def __init__(self, max_header_list_size: int) -> None:
        self._decoder = Decoder(max_header_list_size=max_header_list_size)
        self.max_header_list_size = max_header_list_size
        self._cache: dict[bytes, Headers] = {}
        self.hits = 0
        self.decoded = 0

    def table_size_acknowledged(self, size: int) -> None:
        """The peer acknowledged our SETTINGS_HEADER_TABLE_SIZE of ``size``: from its next
        block on, a larger table is a COMPRESSION_ERROR."""
        self._decoder.max_allowed_table_size = size

    def _stateless(self) -> bool:
        table = self._decoder.header_table
        return table.maxsize == 0 and not table.dynamic_entries

    def decode(self, block: bytes) -> Headers:
        headers = self._cache.get(block)
        if headers is not None and self._stateless():
            self.hits += 1
            return headers
        if len(block) > self.max_header_list_size:
            raise H2Error(ENHANCE_YOUR_CALM, f"header block of {len(block)} bytes over "
                          f"the limit of {self.max_header_list_size}")
        cacheable = self._stateless()
        try:
            # raw=False: names and values as str (the library's annotation says bytes).
            headers = [(str(name), str(value)) for name, value in self._decoder.decode(block)]
        except HPACKDecodingError as error:
            raise H2Error(COMPRESSION_ERROR, f"bad header block: {error}") from None
        self.decoded += 1
        if cacheable and self._stateless():
            if len(self._cache) >= _BLOCK_CACHE_SIZE:
                self._cache.clear()
            self._cache[block] = headers
        return headers


def _integer(value: int, prefix_bits: int, first: int) -> bytes:
    """HPACK's prefixed integer (RFC 7541 section 5.1), ``first`` holding the high bits."""
    limit = (1 << prefix_bits) - 1
    if value < limit:
        return bytes((first | value,))
    out = bytearray((first | limit,))
    value -= limit
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _string(text: str) -> bytes:
    raw = text.encode()
    return _integer(len(raw), 7, 0) + raw  # no Huffman: cheaper to make, and always allowed


def encode_field(name: str, value: str) -> bytes:
    index = _STATIC_FIELD.get((name, value))
    if index is not None:
        return _integer(index, 7, 0x80)
    name_index = _STATIC_NAME.get(name)
    if name_index is not None:
        return _integer(name_index, 4, 0) + _string(value)
    return b"\x00" + _string(name) + _string(value)


_fields: dict[tuple[str, str], bytes] = {}


def encode_block(headers: Iterable[tuple[str, str]]) -> bytes:
    """A header block that uses no dynamic table: valid on any connection, in any state."""
    fields = _fields
    parts = []
    for field in headers:
        encoded = fields.get(field)
        if encoded is None:
            encoded = encode_field(*field)
            if len(fields) >= _FIELD_CACHE_SIZE:
                fields.clear()
            fields[field] = encoded
        parts.append(encoded)
    return b"".join(parts)
