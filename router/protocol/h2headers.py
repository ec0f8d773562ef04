"""HPACK for the relay: decode with the ``hpack`` library only where needed, encode from a cache.

Decoding. The relay advertises SETTINGS_HEADER_TABLE_SIZE = 0, and a peer's encoder shrinks
its dynamic table to 0 with a size update at the start of a block (RFC 7541 section 4.2).
Until it does, blocks are decoded with a table of up to 4,096 bytes (the default), and that
stays the bound afterwards: RFC 7541 wants the update in the first block after the SETTINGS
acknowledgement, but gRPC's C core can send a block encoded before it (as Kestrel and akka
found with browsers), and a relay that refused it would drop every call on the connection.
Once the table is at 0 and empty, a block can only reference the static table, so its decoding
depends on its bytes alone: ``HeaderDecoder`` keeps decoded blocks in a bounded cache keyed by
their bytes, taken only when the table was empty at size 0 before the block and still is
after it. A unary call's response headers and trailers repeat byte for byte, so most blocks
cost one dict lookup.

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
from hpack.huffman_table import decode_huffman
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

    def _stateless(self) -> bool:
        table = self._decoder.header_table
        return table.maxsize == 0 and not table.dynamic_entries

    def portable(self, block: bytes) -> bool:
        """``block``, just decoded, means the same to any HPACK decoder: it may be relayed as
        it is. True when the table is at size 0 and empty after it and the block does not
        start with a table size update: then the table was at size 0 before it too (only an
        update changes the size), so no field referenced a dynamic entry. A literal with
        indexing in it adds nothing that a stateless encoder (ours) would ever reference."""
        return (not block or block[0] & 0xE0 != 0x20) and self._stateless()

    def decode_portable(self, block: bytes) -> tuple[Headers, bool]:
        """``decode(block)`` and ``portable(block)`` in one: a repeated block costs one
        lookup."""
        if self._stateless():
            headers = self._cache.get(block)
            if headers is not None:
                self.hits += 1
                return headers, not block or block[0] & 0xE0 != 0x20
        headers = self.decode(block)
        return headers, self.portable(block)

    def decode(self, block: bytes) -> Headers:
        stateless = self._stateless()
        if stateless:
            headers = self._cache.get(block)
            if headers is not None:
                self.hits += 1
                return headers
        if len(block) > self.max_header_list_size:
            raise H2Error(ENHANCE_YOUR_CALM, f"header block of {len(block)} bytes over "
                          f"the limit of {self.max_header_list_size}")
        if stateless and (not block or block[0] & 0xE0 != 0x20):
            # A block that differs in one field (grpc-timeout, a request id): decoded field by
            # field, each field's bytes looked up in the cache of fields. One that starts with
            # a size update (the table may grow again) goes to the library.
            headers = decode_static(block, self.max_header_list_size)
            self.decoded += 1
            if len(self._cache) >= _BLOCK_CACHE_SIZE:
                self._cache.clear()
            self._cache[block] = headers
            return headers
        cacheable = stateless
        try:
            # raw=False: names and values as str (the library's annotation says bytes; as
            # objects, so compiled code does not check them for bytes).
            decoded: list[tuple[object, object]] = self._decoder.decode(block)  # type: ignore[assignment]
            headers = [(str(name), str(value)) for name, value in decoded]
        except HPACKDecodingError as error:
            raise H2Error(COMPRESSION_ERROR, f"bad header block: {error}") from None
        self.decoded += 1
        if cacheable and self._stateless():
            if len(self._cache) >= _BLOCK_CACHE_SIZE:
                self._cache.clear()
            self._cache[block] = headers
        return headers


_STATIC_ENTRIES = [(n.decode(), v.decode()) for n, v in HeaderTable.STATIC_TABLE]
_decoded_fields: dict[bytes, tuple[str, str]] = {}


def _read_integer(block: bytes, pos: int, prefix_bits: int) -> tuple[int, int]:
    """RFC 7541 section 5.1 at ``pos``: (value, position after it)."""
    limit = (1 << prefix_bits) - 1
    value = block[pos] & limit
    pos += 1
    if value < limit:
        return value, pos
    shift = 0
    while True:
        if pos >= len(block) or shift > 28:
            raise H2Error(COMPRESSION_ERROR, "bad integer in a header block")
        byte = block[pos]
        pos += 1
        value += (byte & 0x7F) << shift
        shift += 7
        if byte < 0x80:
            return value, pos


def _read_string(block: bytes, pos: int) -> tuple[str, int]:
    if pos >= len(block):
        raise H2Error(COMPRESSION_ERROR, "truncated header block")
    huffman = block[pos] & 0x80
    length, pos = _read_integer(block, pos, 7)
    end = pos + length
    if end > len(block):
        raise H2Error(COMPRESSION_ERROR, "truncated header block")
    raw = block[pos:end]
    try:
        text = (decode_huffman(raw) if huffman else raw).decode()
    except (HPACKDecodingError, UnicodeDecodeError):
        raise H2Error(COMPRESSION_ERROR, "bad string in a header block") from None
    return text, end


def _static_entry(index: int) -> tuple[str, str]:
    if not 0 < index <= len(_STATIC_ENTRIES):
        raise H2Error(COMPRESSION_ERROR, f"header index {index} outside the static table")
    return _STATIC_ENTRIES[index - 1]


def _field(block: bytes, pos: int) -> tuple[tuple[str, str] | None, int]:
    """The field at ``pos`` of a block decoded with a dynamic table of size 0: indexed
    (static only), or a literal, whose insertion (0x40) evicts at once; None for a table size
    update, which may only shrink the table to 0."""
    first = block[pos]
    if first & 0x80:
        index, pos = _read_integer(block, pos, 7)
        return _static_entry(index), pos
    if first & 0x40:
        prefix = 6
    elif first & 0x20:
        size, pos = _read_integer(block, pos, 5)
        if size:
            raise H2Error(COMPRESSION_ERROR, "a header table over the size we allow (0)")
        return None, pos
    else:
        prefix = 4
    index, pos = _read_integer(block, pos, prefix)
    if index:
        name = _static_entry(index)[0]
    else:
        name, pos = _read_string(block, pos)
    value, pos = _read_string(block, pos)
    return (name, value), pos


def _skip_string(block: bytes, pos: int) -> int:
    if pos >= len(block):
        raise H2Error(COMPRESSION_ERROR, "truncated header block")
    length, pos = _read_integer(block, pos, 7)
    return pos + length


def _field_end(block: bytes, pos: int) -> int:
    """Where the field at ``pos`` ends, found from its lengths alone (nothing decoded)."""
    first = block[pos]
    if first & 0x80:
        return _read_integer(block, pos, 7)[1]
    if first & 0x40:
        index, pos = _read_integer(block, pos, 6)
    elif first & 0x20:
        return _read_integer(block, pos, 5)[1]
    else:
        index, pos = _read_integer(block, pos, 4)
    if not index:
        pos = _skip_string(block, pos)
    return _skip_string(block, pos)


def decode_static(block: bytes, max_header_list_size: int) -> Headers:
    """A header block for a dynamic table of size 0, whose decoding depends on its bytes
    alone. Each field's bytes are looked up first in one cache for the process, so a block
    that differs from the last in one field decodes (Huffman included) only that field."""
    headers: Headers = []
    cache = _decoded_fields
    pos, end, size = 0, len(block), 0
    while pos < end:
        start = pos
        pos = _field_end(block, pos)
        if pos > end:
            raise H2Error(COMPRESSION_ERROR, "truncated header block")
        raw = block[start:pos]
        cached = cache.get(raw)
        if cached is None:
            field, _ = _field(raw, 0)
            if field is None:
                if headers:
                    raise H2Error(COMPRESSION_ERROR, "table size update after a field")
                continue
            if len(cache) >= _FIELD_CACHE_SIZE:
                cache.clear()
            cache[raw] = cached = field
        headers.append(cached)
        size += len(cached[0]) + len(cached[1]) + 32
        if size > max_header_list_size:
            raise H2Error(COMPRESSION_ERROR, "a header list over the limit")
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


# Whole blocks by their fields: a client's request fields repeat call after call (the
# varying grpc-timeout is not among them: the relay encodes it on its own).
_BLOCK_BY_FIELDS_SIZE = 256
_blocks: dict[tuple[tuple[str, str], ...], bytes] = {}


def encode_cached(headers: Headers) -> bytes:
    """``encode_block(headers)``, from a bounded cache of whole blocks."""
    key = tuple(headers)
    block = _blocks.get(key)
    if block is None:
        block = encode_block(headers)
        if len(_blocks) >= _BLOCK_BY_FIELDS_SIZE:
            _blocks.clear()
        _blocks[key] = block
    return block
