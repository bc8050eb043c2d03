"""UnixFS importer and exporter producing exactly the DAGs and CIDs of Kubo's `ipfs add`.

Files: fixed-size chunker, balanced layout (174 links per node), dag-pb leaves for CIDv0 and raw
leaves for CIDv1 (or with `raw_leaves`). Directories: dag-pb nodes with links sorted by name.
Streaming: at most one chunk and 174 links per tree level are held in memory.
"""

from __future__ import annotations

import hashlib
import os
import stat
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from shardmarket.ipfs import pb
from shardmarket.ipfs.cids import DAG_PB, RAW, sha256_cid, split, to_str

DEFAULT_CHUNK_SIZE = 262144
MAX_CHUNK_SIZE = 1048576  # Kubo refuses larger chunks: blocks over 1 MiB do not travel over bitswap
MAX_LINKS = 174
HAMT_THRESHOLD = 262144  # Kubo shards a directory whose links (name + CID bytes) exceed this


class AddError(ValueError):
    """Input that cannot be imported as Kubo would (bad option, unsupported entry); nothing is added."""


class ExportError(ValueError):
    """A DAG that cannot be turned back into files (not UnixFS, inconsistent sizes, unsafe names)."""


class BlockSink(Protocol):
    def put(self, cid: bytes, parts: Sequence[bytes | memoryview]) -> None: ...


class ReadableInto(Protocol):
    """A binary stream that fills a caller's buffer: an open file, io.BytesIO."""

    def readinto(self, buffer: memoryview, /) -> int | None: ...


# called with the bytes just read; what it returns is ignored (tqdm's update returns a flag)
Progress = Callable[[int], object]


class BlockSource(Protocol):
    def get(self, cid: bytes) -> bytes: ...


@dataclass(frozen=True)
class ImportOptions:
    """Kubo's `ipfs add` options: `--cid-version`, `--raw-leaves`, `--chunker size-N`."""

    cid_version: int = 0
    raw_leaves: bool | None = None  # None: Kubo's default, on exactly when cid_version is 1
    chunk_size: int = DEFAULT_CHUNK_SIZE
    max_links: int = MAX_LINKS

    def __post_init__(self) -> None:
        if self.cid_version not in (0, 1):
            raise AddError(f"cid version {self.cid_version} does not exist; use 0 or 1")
        if not 1 <= self.chunk_size <= MAX_CHUNK_SIZE:
            raise AddError(f"chunk size {self.chunk_size} is outside 1..{MAX_CHUNK_SIZE} bytes")
        if self.max_links < 2:
            raise AddError("a balanced layout needs at least 2 links per node")

    @property
    def leaves_are_raw(self) -> bool:
        return self.cid_version == 1 if self.raw_leaves is None else self.raw_leaves

    @classmethod
    def from_chunker(cls, chunker: str, **kwargs) -> ImportOptions:
        """Options from a Kubo chunker string; only `size-N` (fixed size) is supported."""
        if not chunker.startswith("size-") or not chunker[5:].isdigit():
            raise AddError(f"chunker {chunker!r} is not supported; use size-N, e.g. size-262144")
        return cls(chunk_size=int(chunker[5:]), **kwargs)


@dataclass(frozen=True)
class Entry:
    """One imported file or directory: its binary CID, content bytes and cumulative DAG size (Tsize)."""

    cid: bytes
    size: int
    tsize: int

    @property
    def cid_str(self) -> str:
        return to_str(self.cid)


class _Discard:
    def put(self, cid: bytes, parts: Sequence[bytes | memoryview]) -> None:
        pass


def _dag_pb_block(options: ImportOptions, links: list[pb.Link], data: bytes, sink: BlockSink) -> tuple[bytes, int]:
    block = pb.encode_node(links, data)
    cid = sha256_cid(options.cid_version, DAG_PB, hashlib.sha256(block).digest())
    sink.put(cid, (block,))
    return cid, len(block) + sum(link.tsize for link in links)


class FileBuilder:
    """Builds the balanced DAG of one file from chunks fed in order; `finish` returns the root."""

    def __init__(self, options: ImportOptions, sink: BlockSink | None = None) -> None:
        self.options = options
        self.sink = _Discard() if sink is None else sink
        self.levels: list[list[Entry]] = [[]]
        self.size = 0

    def add_chunk(self, chunk: bytes | memoryview) -> None:
        """Hash (and store) one leaf; `chunk` may be reused by the caller afterwards."""
        n = len(chunk)
        if self.options.leaves_are_raw:
            cid = sha256_cid(1, RAW, hashlib.sha256(chunk).digest())
            self.sink.put(cid, (chunk,))
            leaf = Entry(cid, n, n)
        else:
            head, tail = pb.leaf_parts(n)
            h = hashlib.sha256(head)
            h.update(chunk)
            h.update(tail)
            cid = sha256_cid(self.options.cid_version, DAG_PB, h.digest())
            self.sink.put(cid, (head, chunk, tail))
            leaf = Entry(cid, n, len(head) + n + len(tail))
        self.size += n
        self._push(0, leaf)

    def _push(self, level: int, entry: Entry) -> None:
        if level == len(self.levels):
            self.levels.append([])
        self.levels[level].append(entry)
        if len(self.levels[level]) == self.options.max_links:
            self._push(level + 1, self._node(self.levels[level]))
            self.levels[level] = []

    def _node(self, children: list[Entry]) -> Entry:
        links = [pb.Link(c.cid, "", c.tsize) for c in children]
        filesize = sum(c.size for c in children)
        data = pb.encode_unixfs(pb.FILE, None, filesize, [c.size for c in children])
        cid, tsize = _dag_pb_block(self.options, links, data, self.sink)
        return Entry(cid, filesize, tsize)

    def finish(self) -> Entry:
        """Close every partial level from the bottom up; a lone entry at the top is the root."""
        if self.size == 0 and not any(self.levels):
            return self._empty()
        level = 0
        while True:
            pending = self.levels[level]
            if len(pending) == 1 and not any(self.levels[level + 1 :]):
                return pending[0]
            if pending:
                self.levels[level] = []
                self._push(level + 1, self._node(pending))
            level += 1

    def _empty(self) -> Entry:
        if self.options.leaves_are_raw:
            cid = sha256_cid(1, RAW, hashlib.sha256(b"").digest())
            self.sink.put(cid, (b"",))
            return Entry(cid, 0, 0)
        cid, tsize = _dag_pb_block(self.options, [], pb.encode_unixfs(pb.FILE, None, 0), self.sink)
        return Entry(cid, 0, tsize)


def import_stream(
    stream: ReadableInto,
    options: ImportOptions = ImportOptions(),
    sink: BlockSink | None = None,
    progress: Progress | None = None,
) -> Entry:
    """Import one file from a binary stream, reading one chunk at a time into a reused buffer."""
    builder = FileBuilder(options, sink)
    buf = bytearray(options.chunk_size)
    view = memoryview(buf)
    while True:
        filled = 0
        while filled < len(buf):
            got = stream.readinto(view[filled:])
            if not got:
                break
            filled += got
        if filled:
            builder.add_chunk(view[:filled])
            if progress:
                progress(filled)
        if filled < len(buf):
            return builder.finish()


def import_bytes(data: bytes, options: ImportOptions = ImportOptions(), sink: BlockSink | None = None) -> Entry:
    """Import an in-memory file (small data, tests)."""
    builder = FileBuilder(options, sink)
    view = memoryview(data)
    for start in range(0, len(data), options.chunk_size):
        builder.add_chunk(view[start : start + options.chunk_size])
    return builder.finish()


def directory_node(options: ImportOptions, children: dict[str, Entry], sink: BlockSink | None = None) -> Entry:
    """A basic UnixFS directory: links sorted by name bytes, Data = {Type: Directory}."""
    names = sorted(children, key=lambda name: name.encode())
    estimate = sum(len(name.encode()) + len(children[name].cid) for name in names)
    if estimate > HAMT_THRESHOLD:
        raise AddError(
            f"a directory with {len(names)} entries would be HAMT-sharded by Kubo, which is not "
            "supported; split it into smaller directories"
        )
    links = [pb.Link(children[name].cid, name, children[name].tsize) for name in names]
    cid, tsize = _dag_pb_block(options, links, pb.encode_unixfs(pb.DIRECTORY), _Discard() if sink is None else sink)
    return Entry(cid, sum(children[name].size for name in names), tsize)


def walk_tree(path: Path, *, recursive: bool = False, hidden: bool = False) -> Iterator[tuple[str, Path, bool]]:
    """(name, path, is_directory) of every entry `ipfs add` takes from `path`, each directory before its entries, these
    sorted by name. What no backend adds is an AddError: a symbolic link (never followed, so nothing outside `path`
    is added), a special file, a directory without `recursive`."""
    stack = [(path.name or str(path), path)]
    while stack:
        name, entry = stack.pop()
        mode = os.lstat(entry).st_mode
        if stat.S_ISLNK(mode):
            raise AddError(f"{entry} is a symbolic link; symlinks are not added, add its target instead")
        if stat.S_ISDIR(mode):
            if not recursive:
                raise AddError(f"{entry} is a directory; use -r to add it recursively")
            yield name, entry, True
            children = [c for c in sorted(os.listdir(entry)) if hidden or not c.startswith(".")]
            stack.extend((f"{name}/{c}", entry / c) for c in reversed(children))
        elif stat.S_ISREG(mode):
            yield name, entry, False
        else:
            raise AddError(f"{entry} is neither a regular file nor a directory")


def import_path(
    path: Path,
    options: ImportOptions = ImportOptions(),
    sink: BlockSink | None = None,
    *,
    recursive: bool = False,
    hidden: bool = False,
    on_added: Callable[[str, Entry], None] | None = None,
    progress: Progress | None = None,
) -> Entry:
    """Import a file or (with `recursive`) a directory tree; every entry is checked before a block is written.

    `on_added(name, entry)` reports in Kubo's order: each file as it is added, then every directory post-order.
    """
    tree = list(walk_tree(Path(path), recursive=recursive, hidden=hidden))
    open_dirs: list[tuple[str, dict[str, Entry]]] = []  # the directories around the current entry, outermost first
    directories: list[tuple[str, Entry]] = []  # in the order they are finished: post-order
    added: list[Entry] = []

    def attach(name: str, entry: Entry) -> None:
        if open_dirs:
            open_dirs[-1][1][name.rsplit("/", 1)[1]] = entry
        else:
            added.append(entry)

    def close_dir() -> None:
        name, children = open_dirs.pop()
        entry = directory_node(options, children, sink)
        directories.append((name, entry))
        attach(name, entry)

    for name, entry_path, is_dir in tree:
        while open_dirs and not name.startswith(open_dirs[-1][0] + "/"):
            close_dir()
        if is_dir:
            open_dirs.append((name, {}))
            continue
        with open(entry_path, "rb") as f:
            entry = import_stream(f, options, sink, progress)
        if on_added:
            on_added(name, entry)
        attach(name, entry)
    while open_dirs:
        close_dir()
    for name, directory in directories:
        if on_added:
            on_added(name, directory)
    return added[0]


def _unixfs_node(source: BlockSource, cid: bytes) -> tuple[list[pb.Link], pb.UnixFSData | None, bytes]:
    block = source.get(cid)
    codec, _ = split(cid)
    if codec == RAW:
        return [], None, block
    if codec != DAG_PB:
        raise ExportError(f"block {to_str(cid)} is neither dag-pb nor raw")
    links, data = pb.decode_node(block)
    if data is None:
        raise ExportError(f"dag-pb node {to_str(cid)} carries no UnixFS data")
    return links, pb.decode_unixfs(data), block


def iter_file(source: BlockSource, cid: bytes) -> Iterator[bytes]:
    """Yield a UnixFS file's bytes in order, checking each node's sizes against its children."""
    links, fs, block = _unixfs_node(source, cid)
    if fs is None:
        yield block
        return
    if fs.type == pb.DIRECTORY:
        raise ExportError(f"{to_str(cid)} is a directory, not a file")
    if fs.type not in (pb.FILE, pb.RAW):
        raise ExportError(f"{to_str(cid)} is a UnixFS node of type {fs.type}, not a file")
    if fs.data:
        yield fs.data
    if len(fs.blocksizes) != len(links):
        raise ExportError(f"file node {to_str(cid)} has {len(links)} links but {len(fs.blocksizes)} block sizes")
    for link, expected in zip(links, fs.blocksizes, strict=True):
        got = 0
        for piece in iter_file(source, link.cid):
            got += len(piece)
            yield piece
        if got != expected:
            raise ExportError(f"child {to_str(link.cid)} of {to_str(cid)} holds {got} bytes, its parent says {expected}")


def safe_name(name: str) -> str:
    """A directory entry name that cannot escape its folder, else ExportError."""
    if not name or name in (".", "..") or "/" in name or "\\" in name or "\0" in name:
        raise ExportError(f"directory entry name {name!r} is unsafe (path escape); refusing to write it")
    return name


def list_directory(source: BlockSource, cid: bytes) -> list[pb.Link] | None:
    """The links of a UnixFS directory, or None when `cid` is a file."""
    links, fs, _ = _unixfs_node(source, cid)
    if fs is None or fs.type in (pb.FILE, pb.RAW):
        return None
    if fs.type != pb.DIRECTORY:
        raise ExportError(f"{to_str(cid)} is a UnixFS node of type {fs.type}, which is not supported")
    return links


def export(source: BlockSource, cid: bytes, dest: Path) -> None:
    """Write a file or directory tree to `dest` (a new path); files land via a temporary name."""
    dest = Path(dest)
    links = list_directory(source, cid)
    if links is None:
        tmp = dest.with_name(dest.name + ".part")
        try:
            with open(tmp, "wb") as out:
                for piece in iter_file(source, cid):
                    out.write(piece)
            os.replace(tmp, dest)
        finally:
            tmp.unlink(missing_ok=True)
        return
    names = [safe_name(link.name) for link in links]  # check every name before writing anything
    dest.mkdir(parents=True, exist_ok=True)
    for link, name in zip(links, names, strict=True):
        export(source, link.cid, dest / name)
