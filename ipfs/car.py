"""CAR v1 archives: a dag-cbor header {roots, version: 1}, then varint-framed (CID, block) sections."""

from __future__ import annotations

from typing import BinaryIO, Iterable, Iterator

import dag_cbor
from multiformats import CID

from ipfs.cids import to_str, verify
from ipfs.pb import DecodeError, read_varint, varint

MAX_SECTION = 4 * 1024 * 1024  # no IPFS block is this large; a bigger length means a broken or hostile CAR
MAX_HEADER = 64 * 1024


class CarError(ValueError):
    """A CAR that is malformed, truncated, or holds a block that does not match its CID."""


def header(roots: Iterable[bytes]) -> bytes:
    """The framed CAR v1 header for these root CIDs."""
    body = dag_cbor.encode({"roots": [CID.decode(bytes(r)) for r in roots], "version": 1})
    return varint(len(body)) + body


def section(cid: bytes, data: bytes | memoryview) -> tuple[bytes, bytes | memoryview]:
    """The framing and bytes of one block section (CIDv0 written as its bare multihash, as go-car does)."""
    return varint(len(cid) + len(data)) + bytes(cid), data


def cid_length(buf: bytes | memoryview, pos: int) -> int:
    """Length of the binary CID starting at `pos`."""
    if buf[pos] == 0x12 and pos + 1 < len(buf) and buf[pos + 1] == 0x20:
        return 34
    version, p = read_varint(buf, pos)
    if version != 1:
        raise CarError(f"section CID has unknown version {version}")
    _, p = read_varint(buf, p)  # codec
    _, p = read_varint(buf, p)  # multihash code
    size, p = read_varint(buf, p)
    return p + size - pos


class CarParser:
    """Incremental CAR v1 reader: `feed` bytes as they arrive, get verified (cid, block) pairs back.

    Blocks inside one fed chunk come back as memoryviews of it (no copy); an item cut by the end of a chunk
    is kept as views of the chunks it spans and joined once, when its last byte arrives.
    """

    def __init__(self) -> None:
        self.parts: list[memoryview] = []  # the start of an item that the last chunk cut
        self.size = 0  # bytes in `parts`
        self.total: int | None = None  # that item's full length, once its length varint is whole
        self.roots: list[bytes] | None = None

    def feed(self, chunk: bytes) -> list[tuple[bytes, bytes | memoryview]]:
        out: list[tuple[bytes, bytes | memoryview]] = []
        view = memoryview(chunk)
        if self.parts:
            if self.total is None:  # the length varint itself was cut; it is at most 10 bytes
                self.total = self._item_length(b"".join(self.parts) + bytes(view[:10]))
            if self.total is None or self.size + len(view) < self.total:
                self._keep(view)
                return out
            take = self.total - self.size
            parts = [*self.parts, view[:take]]
            self.parts, self.size, self.total = [], 0, None
            self._parse_parts(parts, out)
            view = view[take:]
        used = self._parse(view, out)
        if used < len(view):
            self._keep(view[used:])
            self.total = self._item_length(view[used:])
        return out

    def _keep(self, view: memoryview) -> None:
        if view:
            self.parts.append(view)
            self.size += len(view)

    def _item_length(self, buf: bytes | memoryview) -> int | None:
        """Total bytes (varint + body) of the first item in `buf`, or None while its varint is incomplete."""
        try:
            length, start = read_varint(buf, 0)
        except DecodeError:
            if len(buf) >= 10:
                raise CarError("CAR section length is not a valid varint") from None
            return None
        self._check(length)
        return start + length

    def _check(self, length: int) -> None:
        """Refuse a header or section length no honest CAR has (before buffering that many bytes)."""
        if self.roots is None:
            if length > MAX_HEADER:
                raise CarError(f"CAR header claims {length} bytes; not a CAR v1")
        elif not 0 < length <= MAX_SECTION:
            raise CarError(f"CAR section of {length} bytes is out of bounds")

    def _parse(self, view: memoryview, out: list) -> int:
        """Parse every complete item of `view`; return how many bytes were used."""
        pos = 0
        while pos < len(view):
            try:
                length, start = read_varint(view, pos)
            except DecodeError:
                if len(view) - pos >= 10:
                    raise CarError("CAR section length is not a valid varint") from None
                break  # the length itself is still incomplete
            self._check(length)
            if start + length > len(view):
                break
            if self.roots is None:
                self._header(bytes(view[start : start + length]))
            else:
                out.append(self._section(view[start : start + length]))
            pos = start + length
        return pos

    def _parse_parts(self, parts: list[memoryview], out: list) -> None:
        """Parse one item from the views it spans. When a section's CID lies in the first view, its block is
        joined straight into the bytes it is returned (and stored) as; otherwise the whole item is joined."""
        first = parts[0]
        if self.roots is not None and len(first) >= 128:
            try:
                _, start = read_varint(first, 0)
                end = start + cid_length(first, start)
            except (DecodeError, IndexError):
                end = None  # malformed: parsing the whole item below says how
            if end is not None and end <= len(first):
                out.append(self._verified(bytes(first[start:end]), b"".join([first[end:], *parts[1:]])))
                return
        self._parse(memoryview(b"".join(parts)), out)

    def _header(self, body: bytes) -> None:
        try:
            value = dag_cbor.decode(body)
        except Exception as exc:
            raise CarError(f"CAR header is not dag-cbor: {exc}") from None
        if not isinstance(value, dict) or value.get("version") != 1:
            raise CarError("only CAR version 1 is supported (the header says otherwise)")
        roots = value.get("roots")
        if not isinstance(roots, list) or not all(isinstance(r, CID) for r in roots):
            raise CarError("CAR header has no list of root CIDs")
        self.roots = [bytes(r) for r in roots]

    def _section(self, sec: memoryview) -> tuple[bytes, bytes | memoryview]:
        try:
            n = cid_length(sec, 0)
        except (DecodeError, IndexError):
            raise CarError("CAR section starts with a malformed CID") from None
        if n > len(sec):
            raise CarError("CAR section is shorter than its CID")
        return self._verified(bytes(sec[:n]), sec[n:])

    @staticmethod
    def _verified(cid: bytes, data: bytes | memoryview) -> tuple[bytes, bytes | memoryview]:
        if not verify(cid, data):
            raise CarError(f"block {to_str(cid)} in the CAR does not match its CID")
        return cid, data

    def close(self) -> None:
        """Call at end of input: leftover bytes or a missing header mean the CAR was truncated."""
        if self.roots is None:
            raise CarError("CAR ended before its header: empty or truncated")
        if self.parts:
            raise CarError(f"CAR is truncated: {self.size} bytes of an incomplete section at the end")


def read_car(stream: BinaryIO, chunk_size: int = 1 << 20) -> tuple[list[bytes], Iterator[tuple[bytes, memoryview]]]:
    """Roots and a generator of verified blocks of a CAR file; errors surface as CarError."""
    parser = CarParser()
    pending: list[tuple[bytes, memoryview]] = []
    while parser.roots is None:
        chunk = stream.read(chunk_size)
        if not chunk:
            parser.close()
        pending += parser.feed(chunk)

    def blocks() -> Iterator[tuple[bytes, memoryview]]:
        yield from pending
        while chunk := stream.read(chunk_size):
            yield from parser.feed(chunk)
        parser.close()

    return parser.roots, blocks()
