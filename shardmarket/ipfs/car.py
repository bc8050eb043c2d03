"""CAR v1 archives: a dag-cbor header {roots, version: 1}, then varint-framed (CID, block) sections."""

from __future__ import annotations

import functools
from collections.abc import Iterable, Iterator
from typing import BinaryIO

import dag_cbor
from multiformats import CID

from shardmarket.ipfs.cids import to_str, verify
from shardmarket.ipfs.pb import varint

MAX_SECTION = 4 * 1024 * 1024  # no IPFS block is this large; a bigger length means a broken or hostile CAR
MAX_HEADER = 64 * 1024


class CarError(ValueError):
    """A CAR that is malformed, truncated, or holds a block that does not match its CID."""


def header(roots: Iterable[bytes]) -> bytes:
    """The framed CAR v1 header for these root CIDs."""
    return _header(tuple(bytes(r) for r in roots))


@functools.lru_cache(maxsize=1024)
def _header(roots: tuple[bytes, ...]) -> bytes:
    """Cached: a gateway answers many range requests of one file with the same header."""
    body = dag_cbor.encode({"roots": [CID.decode(r) for r in roots], "version": 1})
    return varint(len(body)) + body


def section(cid: bytes, data: bytes | memoryview) -> tuple[bytes, bytes | memoryview]:
    """The framing and bytes of one block section (CIDv0 written as its bare multihash, as go-car does)."""
    return varint(len(cid) + len(data)) + bytes(cid), data


class CarReader:
    """Reads a CAR v1 from a binary stream (a file, an HTTP response) and yields verified (cid, block) pairs.

    Each block is one `stream.read(n)`: a buffered reader fills a new bytes object straight from the file or
    socket, so the block is copied once and never joined or sliced afterwards.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self.stream = stream
        length = self._varint(bytearray())
        if length is None:
            raise CarError("CAR ended before its header: empty or truncated")
        if length > MAX_HEADER:
            raise CarError(f"CAR header claims {length} bytes; not a CAR v1")
        self.roots = _roots(self._exact(length))

    def __iter__(self) -> Iterator[tuple[bytes, bytes]]:
        while (length := self._varint(bytearray())) is not None:
            if not 0 < length <= MAX_SECTION:
                raise CarError(f"CAR section of {length} bytes is out of bounds")
            cid = self._cid(length)
            block = self._exact(length - len(cid))
            if not verify(cid, block):
                raise CarError(f"block {to_str(cid)} in the CAR does not match its CID")
            yield cid, block

    def _cid(self, limit: int) -> bytes:
        """The binary CID opening a section of `limit` bytes: a bare sha2-256 multihash (CIDv0) or a CIDv1."""
        raw = bytearray()
        first = self._cid_varint(raw)
        if first == 1:
            self._cid_varint(raw)  # codec
            self._cid_varint(raw)  # multihash code
        elif first != 0x12:
            raise CarError(f"CAR section starts with a CID of unknown version {first}")
        size = self._cid_varint(raw)
        if len(raw) + size >= limit:
            raise CarError("CAR section is shorter than its CID")
        return bytes(raw) + self._exact(size)

    def _cid_varint(self, raw: bytearray) -> int:
        value = self._varint(raw)
        if value is None:
            raise CarError("CAR is truncated inside a section's CID")
        return value

    def _varint(self, raw: bytearray) -> int | None:
        """The next unsigned varint (its bytes appended to `raw`), or None where the stream ends before it."""
        value = 0
        for i in range(10):
            byte = self.stream.read(1)
            if not byte:
                if i == 0:
                    return None
                raise CarError("CAR is truncated inside a varint")
            raw += byte
            value |= (byte[0] & 0x7F) << (7 * i)
            if byte[0] < 0x80:
                return value
        raise CarError("CAR holds a varint longer than 10 bytes; not a CAR v1")

    def _exact(self, n: int) -> bytes:
        data = self.stream.read(n)
        if len(data) < n:  # a raw stream may return short reads: finish with one join (a buffered one never does)
            parts, got = [data], len(data)
            while got < n and (more := self.stream.read(n - got)):
                parts.append(more)
                got += len(more)
            if got < n:
                raise CarError(f"CAR is truncated: {got} of a {n}-byte item arrived before the end")
            data = b"".join(parts)
        return data


def _roots(body: bytes) -> list[bytes]:
    """Root CIDs of a CAR v1 header body."""
    try:
        value = dag_cbor.decode(body)
    except Exception as exc:
        raise CarError(f"CAR header is not dag-cbor: {exc}") from None
    if not isinstance(value, dict) or value.get("version") != 1:
        raise CarError("only CAR version 1 is supported (the header says otherwise)")
    roots = value.get("roots")
    cids = [r for r in roots if isinstance(r, CID)] if isinstance(roots, list) else []
    if not isinstance(roots, list) or len(cids) != len(roots):
        raise CarError("CAR header has no list of root CIDs")
    return [bytes(c) for c in cids]


def read_car(stream: BinaryIO) -> tuple[list[bytes], Iterator[tuple[bytes, bytes]]]:
    """Roots and a generator of verified blocks of a CAR file; errors surface as CarError."""
    reader = CarReader(stream)
    return reader.roots, iter(reader)
