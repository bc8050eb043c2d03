"""On-disk blockstore: one file per block in sharded folders, atomic writes, verified reads, pins and gc."""

from __future__ import annotations

import base64
import errno
import functools
import io
import json
import os
import time
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path

from shardmarket.ipfs import pb
from shardmarket.ipfs.cids import DAG_PB, parse, split, to_str, verify
from shardmarket.ipfs.unixfs import BlockSource


class BlockstoreError(RuntimeError):
    """A blockstore operation that failed; nothing half-written is left behind."""


class BlockNotFound(BlockstoreError, KeyError):
    """The block is not in this store."""

    def __init__(self, cid: bytes, where: str = "in the local store") -> None:
        super().__init__(f"block {to_str(cid)} is not {where}")
        self.cid = cid

    def __str__(self) -> str:
        return str(self.args[0])


class CorruptBlock(BlockstoreError):
    """Bytes that do not hash to their CID (on disk or offered by a peer)."""


class StoreFull(BlockstoreError):
    """The disk is full; the block was not written."""


@functools.lru_cache(maxsize=1 << 16)
def _key(multihash: bytes) -> str:
    """The file name of a block (base32 is pure Python here, and a gateway looks each block up twice)."""
    return base64.b32encode(multihash).decode().rstrip("=").lower()


def links_of(cid: bytes, block: bytes) -> list[bytes]:
    """Child CIDs of a block (dag-pb links; raw blocks have none)."""
    if split(cid)[0] != DAG_PB:
        return []
    return [link.cid for link in pb.decode_node(block)[0]]


def walk(source: BlockSource, root: bytes) -> Iterator[tuple[bytes, bytes]]:
    """(CID, block) of the DAG under `root` in depth-first order, each once, read (and verified) from `source`."""
    seen: set[bytes] = set()
    stack = [bytes(root)]
    while stack:
        cid = stack.pop()
        mh = split(cid)[1]
        if mh in seen:
            continue
        seen.add(mh)
        block = source.get(cid)
        yield cid, block
        stack.extend(reversed(links_of(cid, block)))


class Blockstore:
    """Blocks under `path/blocks/<2 chars>/<base32 multihash>`, keyed by multihash as Kubo's flatfs does."""

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)
        self.blocks = self.path / "blocks"
        self.tmp = self.path / "tmp"
        self.pins_file = self.path / "pins.json"
        self.blocks.mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        self._shards: set[str] = set()  # shard folders known to exist
        self._blocks_dir = str(self.blocks)

    def block_path(self, cid: bytes) -> Path:
        return Path(self._file(cid))

    def _file(self, cid: bytes) -> str:
        """The block's path as a string: the serving and fetching paths build no Path objects."""
        key = _key(split(cid)[1])
        return f"{self._blocks_dir}/{key[-3:-1]}/{key}"

    def has(self, cid: bytes) -> bool:
        return os.path.exists(self._file(cid))

    def put(self, cid: bytes, parts: Sequence[bytes | memoryview]) -> None:
        """Store a block the caller has hashed itself (the importer); a block already present is kept."""
        target = self.block_path(cid)
        if target.exists():
            return
        self._write_atomic(target, parts)

    def add_block(self, cid: bytes, data: bytes | memoryview) -> None:
        """Store a block from elsewhere after checking that it hashes to `cid`."""
        if not verify(cid, data):
            raise CorruptBlock(f"block offered as {to_str(cid)} does not hash to that CID; it was not stored")
        self.put(cid, (data,))

    def _open(self, cid: bytes) -> int:
        """A file descriptor of the block's file; BlockNotFound when it is not here."""
        try:
            return os.open(self._file(cid), os.O_RDONLY)
        except OSError as exc:
            # a multihash too long for a file name (a stranger's CID) is a block this store cannot hold
            if exc.errno in (errno.ENOENT, errno.ENAMETOOLONG):
                raise BlockNotFound(cid) from None
            raise BlockstoreError(f"cannot read block {to_str(cid)}: {exc.strerror}") from None

    def get_unchecked(self, cid: bytes) -> bytes:
        """Read a block without hashing it: for serving to trustless clients, which verify it themselves."""
        with open(self._open(cid), "rb") as f:
            return f.read()

    def open_block(self, cid: bytes) -> io.BufferedReader:
        """The block's file opened for reading, unchecked (for serving to trustless clients)."""
        return open(self._open(cid), "rb")

    def head(self, cid: bytes, n: int) -> tuple[int, bytes]:
        """A block's size and first `n` bytes, unchecked (to plan a traversal without reading leaves)."""
        fd = self._open(cid)
        try:
            return os.fstat(fd).st_size, os.read(fd, n)
        finally:
            os.close(fd)

    def get(self, cid: bytes) -> bytes:
        """Read a block and check its hash; a corrupt file is removed and reported."""
        data = self.get_unchecked(cid)
        if not verify(cid, data):
            self.delete(cid)
            raise CorruptBlock(f"block {to_str(cid)} on disk was corrupt and has been removed; fetch it again")
        return data

    def delete(self, cid: bytes) -> None:
        self.block_path(cid).unlink(missing_ok=True)

    def keys(self) -> Iterator[Path]:
        """Every block file."""
        for shard in self.blocks.iterdir():
            yield from shard.iterdir()

    def _write_atomic(self, target: Path, parts: Sequence[bytes | memoryview]) -> None:
        tmp = self.tmp / f"{target.name}.{uuid.uuid4().hex}"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            try:
                for part in parts:
                    view = memoryview(part)
                    while view:
                        view = view[os.write(fd, view) :]
            finally:
                os.close(fd)
            if target.parent.name not in self._shards:
                target.parent.mkdir(exist_ok=True)
                self._shards.add(target.parent.name)
            os.replace(tmp, target)
        except OSError as exc:
            tmp.unlink(missing_ok=True)
            if exc.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFull(
                    f"the disk holding {self.path} is full; the block was not written. "
                    "Free space (e.g. `shardmarket ipfs gc`) and retry"
                ) from None
            raise BlockstoreError(f"could not write a block under {self.path}: {exc.strerror}") from None

    # pins

    def pins(self) -> set[str]:
        """CIDs pinned recursively (text form)."""
        try:
            return set(json.loads(self.pins_file.read_text()))
        except FileNotFoundError:
            return set()

    def _save_pins(self, pins: set[str]) -> None:
        self._write_atomic(self.pins_file, (json.dumps(sorted(pins), indent=0).encode(),))

    def pin(self, cid: bytes) -> None:
        """Pin a DAG recursively; every block must be present (BlockNotFound names the first missing)."""
        for _ in walk(self, cid):
            pass
        self._save_pins(self.pins() | {to_str(cid)})

    def unpin(self, cid: bytes) -> None:
        pins = self.pins()
        if to_str(cid) not in pins:
            raise BlockstoreError(f"{to_str(cid)} is not pinned")
        self._save_pins(pins - {to_str(cid)})

    def gc(self) -> tuple[int, int]:
        """Delete every block not reachable from a pin and temporary files older than an hour; return (blocks, bytes)."""
        keep = {_key(split(c)[1]) for pin in self.pins() for c, _ in walk(self, bytes(parse(pin)))}
        removed = freed = 0
        for path in list(self.keys()):
            if path.name not in keep:
                freed += path.stat().st_size
                path.unlink()
                removed += 1
        for path in self.tmp.iterdir():
            if time.time() - path.stat().st_mtime > 3600:
                path.unlink(missing_ok=True)
        return removed, freed


class MemoryBlockstore:
    """Blocks held in memory with the Blockstore interface the fetcher and exporter use (tests, benchmarks,
    loading weights straight into RAM)."""

    def __init__(self) -> None:
        self.blocks: dict[bytes, bytes] = {}

    def has(self, cid: bytes) -> bool:
        return split(cid)[1] in self.blocks

    def put(self, cid: bytes, parts: Sequence[bytes | memoryview]) -> None:
        self.blocks.setdefault(split(cid)[1], b"".join(parts) if len(parts) > 1 else bytes(parts[0]))

    def add_block(self, cid: bytes, data: bytes | memoryview) -> None:
        if not verify(cid, data):
            raise CorruptBlock(f"block offered as {to_str(cid)} does not hash to that CID; it was not stored")
        self.put(cid, (data,))

    def get(self, cid: bytes) -> bytes:
        try:
            return self.blocks[split(cid)[1]]
        except KeyError:
            raise BlockNotFound(cid, "in memory") from None
