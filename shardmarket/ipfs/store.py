"""Where a node's blocks live: one interface over the local blockstore (what it lacks fetched from trustless
gateways) and a Kubo daemon's RPC API. `node run`, `model pack|fetch|publish` and `ipfs ...` read and
write through it; `open_store` is the one place that picks the backend."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

from shardmarket.ipfs.blockstore import Blockstore, BlockstoreError, walk
from shardmarket.ipfs.cids import to_str
from shardmarket.ipfs.fetch import FetchError, fetch_dag
from shardmarket.ipfs.kubo import KuboError, KuboStore

STORE_ERRORS = (BlockstoreError, FetchError, KuboError)  # a block that cannot be had, stored or kept


class ContentStore(Protocol):
    """Blocks by CID. Every block read is checked against its CID, whoever stored it."""

    def get(self, cid: bytes) -> bytes:
        """A block, verified; one of STORE_ERRORS when it cannot be had."""
        ...

    def put(self, cid: bytes, parts: Sequence[bytes | memoryview]) -> None:
        """Store a block whose CID the caller computed (the importer)."""
        ...

    def fetch(self, root: bytes) -> None:
        """Make every block under `root` readable here, fetching what is missing."""
        ...

    def pin(self, cid: bytes) -> None:
        """Keep the DAG under `cid` through gc, fetching what is missing first."""
        ...

    def unpin(self, cid: bytes) -> None: ...

    def pins(self) -> list[str]:
        """Recursively pinned CIDs, as text."""
        ...

    def gc(self) -> int:
        """Delete the blocks no pin reaches; how many went."""
        ...


class LocalStore:
    """The blockstore on this machine; what it lacks comes from `gateways`, every block verified."""

    def __init__(self, blocks: Blockstore, gateways: Sequence[str] = (), *, progress: bool = False) -> None:
        self.blocks = blocks
        self.gateways = list(gateways)
        self.progress = progress

    def get(self, cid: bytes) -> bytes:
        return self.blocks.get(cid)

    def put(self, cid: bytes, parts: Sequence[bytes | memoryview]) -> None:
        self.blocks.put(cid, parts)

    def fetch(self, root: bytes) -> None:
        try:
            for _ in walk(self.blocks, root):
                pass
            return
        except BlockstoreError:
            if not self.gateways:
                raise FetchError(
                    f"{to_str(root)} is not in the local store and no gateway is configured: pass --gateway URL or set "
                    "SHARDMARKET_IPFS_GATEWAYS (or SHARDMARKET_IPFS_API for a Kubo daemon)"
                ) from None
        fetch_dag(root, self.blocks, self.gateways, progress=self.progress)

    def pin(self, cid: bytes) -> None:
        try:
            self.blocks.pin(cid)
        except BlockstoreError:  # missing, or corrupt and removed: fetch, then pin
            self.fetch(cid)
            self.blocks.pin(cid)

    def unpin(self, cid: bytes) -> None:
        self.blocks.unpin(cid)

    def pins(self) -> list[str]:
        return sorted(self.blocks.pins())

    def gc(self) -> int:
        return self.blocks.gc()[0]


def open_store(path: Path, api: str = "", gateways: Sequence[str] = (), *, progress: bool | None = None) -> ContentStore:
    """The store a command uses: the Kubo daemon at `api` when one is given, else the local blockstore at `path`
    with `gateways` for what it lacks. `progress`: show fetch progress (default: when stderr is a terminal)."""
    if api:
        return KuboStore(api)
    return LocalStore(Blockstore(path), gateways, progress=sys.stderr.isatty() if progress is None else progress)
