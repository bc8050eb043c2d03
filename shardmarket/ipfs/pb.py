"""The small protobufs of IPFS: dag-pb nodes (PBNode/PBLink) and UnixFS `Data`, encoded as Kubo does."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

# UnixFS Data.DataType
RAW, DIRECTORY, FILE, METADATA, SYMLINK, HAMT_SHARD = range(6)


class DecodeError(ValueError):
    """Bytes that are not a well-formed dag-pb node or UnixFS Data message."""


def varint(n: int) -> bytes:
    """Unsigned LEB128, as protobuf, multiformats and CAR use it."""
    out = bytearray()
    while n >= 0x80:
        out.append((n & 0x7F) | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def read_varint(buf: bytes | memoryview, pos: int) -> tuple[int, int]:
    """Decode one varint at `pos`; return (value, position after it)."""
    value = shift = 0
    while True:
        if pos >= len(buf):
            raise DecodeError("truncated varint")
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise DecodeError("varint longer than 64 bits")


def _bytes_field(tag: int, data: bytes) -> bytes:
    return bytes((tag,)) + varint(len(data)) + data


@dataclass(frozen=True)
class Link:
    """A PBLink: the child's binary CID, its name and its cumulative size (Tsize)."""

    cid: bytes
    name: str
    tsize: int


@dataclass
class UnixFSData:
    """The UnixFS `Data` message carried in a dag-pb node's Data field."""

    type: int
    data: bytes | None = None
    filesize: int | None = None
    blocksizes: list[int] = field(default_factory=list)


def encode_unixfs(type_: int, data: bytes | None = None, filesize: int | None = None, blocksizes: Sequence[int] = ()) -> bytes:
    """Encode UnixFS Data with fields in number order, optional ones only when set (Kubo's output)."""
    out = bytearray(b"\x08" + varint(type_))
    if data is not None:
        out += _bytes_field(0x12, data)
    if filesize is not None:
        out += b"\x18" + varint(filesize)
    for size in blocksizes:
        out += b"\x20" + varint(size)
    return bytes(out)


def encode_link(link: Link) -> bytes:
    """Encode one PBLink (Hash, Name always present, Tsize), wrapped as PBNode field 2."""
    name = link.name.encode()
    body = _bytes_field(0x0A, link.cid) + _bytes_field(0x12, name) + b"\x18" + varint(link.tsize)
    return _bytes_field(0x12, body)


def encode_node(links: list[Link], data: bytes | None) -> bytes:
    """Encode a PBNode in canonical order: Links first, then Data."""
    return b"".join(encode_link(link) for link in links) + (b"" if data is None else _bytes_field(0x0A, data))


def leaf_parts(chunk_len: int) -> tuple[bytes, bytes]:
    """Bytes before and after a chunk in a dag-pb UnixFS file leaf, so the chunk is never copied to hash it."""
    inner_head = b"\x08\x02\x12" + varint(chunk_len)
    inner_tail = b"\x18" + varint(chunk_len)
    inner_len = len(inner_head) + chunk_len + len(inner_tail)
    return b"\x0a" + varint(inner_len) + inner_head, inner_tail


def _fields(buf: bytes | memoryview):
    """Yield (field number, wire type, value) for a protobuf message; value is int or a memoryview."""
    view = memoryview(buf)
    pos = 0
    while pos < len(view):
        key, pos = read_varint(view, pos)
        number, wire = key >> 3, key & 7
        value: int | memoryview
        if wire == 0:
            value, pos = read_varint(view, pos)
        elif wire == 2:
            length, pos = read_varint(view, pos)
            if pos + length > len(view):
                raise DecodeError(f"field {number} runs past the end of the message")
            value, pos = view[pos : pos + length], pos + length
        else:
            raise DecodeError(f"unsupported protobuf wire type {wire} in field {number}")
        yield number, wire, value


def decode_node(block: bytes | memoryview) -> tuple[list[Link], memoryview | None]:
    """Decode a dag-pb block into its links and Data bytes (links must come first, as the spec requires)."""
    links: list[Link] = []
    data = None
    for number, wire, value in _fields(block):
        if number == 2 and wire == 2:
            if data is not None:
                raise DecodeError("dag-pb links after the Data field: not a valid dag-pb block")
            cid, name, tsize = None, "", 0
            for n, w, v in _fields(value):
                if n == 1 and w == 2:
                    cid = bytes(v)
                elif n == 2 and w == 2:
                    name = bytes(v).decode("utf-8", errors="strict")
                elif n == 3 and w == 0:
                    tsize = v
                else:
                    raise DecodeError(f"unknown PBLink field {n}")
            if cid is None:
                raise DecodeError("PBLink without a Hash")
            links.append(Link(cid, name, tsize))
        elif number == 1 and wire == 2:
            data = value
        else:
            raise DecodeError(f"unknown PBNode field {number}")
    return links, data


def decode_unixfs(data: bytes | memoryview) -> UnixFSData:
    """Decode a UnixFS Data message (unknown optional fields such as mode/mtime are skipped)."""
    result = UnixFSData(type=-1)
    for number, wire, value in _fields(data):
        if number == 1 and wire == 0:
            result.type = value
        elif number == 2 and wire == 2:
            result.data = bytes(value)
        elif number == 3 and wire == 0:
            result.filesize = value
        elif number == 4 and wire == 0:
            result.blocksizes.append(value)
    if result.type not in (RAW, DIRECTORY, FILE, METADATA, SYMLINK, HAMT_SHARD):
        raise DecodeError("UnixFS Data without a valid Type")
    return result
