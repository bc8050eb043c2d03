"""Fetch a DAG from several trustless gateways in parallel, verifying every block before it is stored.

A file is split into byte ranges, each asked for as a CAR (`dag-scope=entity&entity-bytes=a:b`) from
whichever gateway is free; every block must hash to its CID and be linked from a block already
verified. A failed range goes back to the queue for another gateway; verified blocks stay in the
blockstore, so a new run resumes where the last one stopped. Each gateway gets worker threads with
their own HTTP/1.1 connection (http.client): a block is read from the socket straight into its own
bytes and hashed there, while the gateway keeps sending.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import logging
import socket
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urljoin, urlsplit

from tqdm import tqdm

from shardmarket.ipfs import pb
from shardmarket.ipfs.blockstore import Blockstore, BlockstoreError, MemoryBlockstore
from shardmarket.ipfs.car import MAX_SECTION, CarError, CarReader
from shardmarket.ipfs.cids import DAG_PB, split, to_str, verify
from shardmarket.ipfs.gateway import CAR_TYPE, RAW_TYPE

log = logging.getLogger(__name__)

RANGE_BYTES = 16 * 1024 * 1024
WORKERS_PER_GATEWAY = 2
MAX_FAILURES = 3
MAX_REDIRECTS = 5
NETWORK_ERRORS = (OSError, http.client.HTTPException)  # socket errors and timeouts, broken HTTP


class FetchError(RuntimeError):
    """The DAG could not be fetched completely; what was verified is kept for the next attempt."""


@dataclass(frozen=True)
class Unit:
    """One request: a whole sub-DAG, or a byte range [start, stop) of the file at `cid`."""

    cid: bytes
    size: int  # bytes it brings, for progress
    start: int | None = None
    stop: int | None = None

    def path(self) -> str:
        base = f"/ipfs/{to_str(self.cid)}?format=car"
        if self.start is None or self.stop is None:
            return base + "&dag-scope=all"
        return base + f"&dag-scope=entity&entity-bytes={self.start}:{self.stop - 1}"


class Gateway:
    """One HTTP/1.1 keep-alive connection to a gateway, used by one worker at a time from a thread.

    Blocking reads from the socket straight into each block's bytes cost a fraction of an event loop's copies."""

    def __init__(self, url: str, timeout_s: float) -> None:
        self.url = url
        self.timeout_s = timeout_s
        self.conn = self._connect(url)

    def _connect(self, url: str) -> http.client.HTTPConnection:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise FetchError(f"gateway {url!r} is not an http(s):// URL")
        conn_type = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
        return conn_type(parts.hostname, parts.port, timeout=self.timeout_s)

    def get(self, path_qs: str, accept: str) -> http.client.HTTPResponse:
        """GET a path under the gateway's URL, following redirects; a final status other than 200 is a FetchError."""
        url, conn, headers = self.url.rstrip("/") + path_qs, self.conn, {"Accept": accept}
        for _ in range(MAX_REDIRECTS + 1):
            parts = urlsplit(url)
            try:
                conn.request("GET", f"{parts.path}?{parts.query}" if parts.query else parts.path, headers=headers)
                resp = conn.getresponse()
            except NETWORK_ERRORS:
                conn.close()
                raise
            if resp.status == 200:
                return resp
            text = resp.read(200).decode(errors="replace").strip()
            conn.close()  # unread rest of the body: the connection cannot carry another request
            location = resp.getheader("Location")
            if resp.status not in (301, 302, 303, 307, 308) or not location:
                raise FetchError(f"HTTP {resp.status}: {text}")
            url = urljoin(url, location)
            conn = self._connect(url)  # for this request only: other CIDs still go to the gateway's own URL
            headers = {"Accept": accept, "Connection": "close"}  # so the response owns and closes its socket
        raise FetchError(f"more than {MAX_REDIRECTS} redirects")

    def close(self) -> None:
        self.conn.close()

    def abort(self) -> None:
        """Wake a thread blocked reading this connection (from another thread); its read fails at once."""
        with contextlib.suppress(OSError, AttributeError):
            self.conn.sock.shutdown(socket.SHUT_RDWR)


class DagFetcher:
    """Fetches the DAG under one root into a blockstore."""

    def __init__(
        self,
        store: Blockstore | MemoryBlockstore,
        gateways: list[str],
        *,
        range_bytes: int = RANGE_BYTES,
        progress: bool = True,
        timeout_s: float = 60,
    ) -> None:
        if not gateways:
            raise FetchError("no gateway to fetch from: pass --gateway URL or set SHARDMARKET_IPFS_GATEWAYS")
        self.store = store
        self.gateways = gateways
        self.range_bytes = range_bytes
        for url in gateways:
            Gateway(url, timeout_s).close()  # a malformed URL is refused before anything is fetched
        self.timeout_s = timeout_s
        self.expected: set[bytes] = set()  # multihashes linked from verified blocks (or the root)
        self.nodes: dict[bytes, tuple[list[bytes], list[int]]] = {}  # dag-pb file/dir nodes: links, sizes
        self.present: set[bytes] = set()  # multihashes verified and stored during this run
        self.bar = tqdm(total=0, unit="B", unit_scale=True, desc="fetch", disable=not progress)
        self.changed = threading.Condition()  # guards pending, failed, alive and in_flight for the worker threads

    async def fetch(self, root: bytes) -> None:
        """Fetch every block under `root` (already present blocks are not fetched again)."""
        root = bytes(root)
        self.expected.add(split(root)[1])
        block = await self._root_block(root)
        links, _, _ = self._learn(root, block)
        self.bar.total = len(block) + sum(link.tsize for link in links)
        self.bar.update(len(block))
        self.pending: list[Unit] = []
        for unit in await self._plan(root, block):
            if self._missing(unit):
                self.pending.append(unit)
            else:
                self.bar.update(unit.size)
        self.failed: dict[Unit, set[str]] = {}
        self.alive, self.in_flight = set(self.gateways), 0
        self.stopping = False
        self.connections: list[Gateway] = []
        workers = [gw for gw in self.gateways for _ in range(WORKERS_PER_GATEWAY)]
        loop = asyncio.get_running_loop()
        with ThreadPoolExecutor(len(workers), thread_name_prefix="fetch") as threads:
            try:
                await asyncio.gather(*(loop.run_in_executor(threads, self._worker, gw) for gw in workers))
            finally:  # after an error or a cancel (Ctrl-C), the other threads stop now rather than at a timeout
                with self.changed:
                    self.stopping = True
                    self.changed.notify_all()
                for gateway in self.connections:
                    gateway.abort()
        self.bar.close()
        if self.pending:
            raise FetchError(
                f"{len(self.pending)} part(s) of {to_str(root)} could not be fetched from any gateway; "
                "verified blocks are kept, run the same command again to resume"
            )

    async def _plan(self, cid: bytes, block: bytes) -> list[Unit]:
        """Units for the DAG under a verified block: byte ranges of a file; the entries of a directory,
        where an entry bigger than a range is itself split into ranges."""
        links, _, filesize = self._learn(cid, block)
        if filesize is not None and links:
            n = self.range_bytes
            return [Unit(cid, min(a + n, filesize) - a, a, min(a + n, filesize)) for a in range(0, filesize, n)]
        units = []
        for link in links:
            if link.tsize > self.range_bytes:
                units += await self._plan(link.cid, await self._root_block(link.cid))
            else:
                units.append(Unit(link.cid, link.tsize))
        return units

    async def _root_block(self, root: bytes) -> bytes:
        if self.store.has(root):
            try:
                return self.store.get(root)
            except BlockstoreError:
                pass
        errors = []
        for url in self.gateways:
            gateway = Gateway(url, self.timeout_s)
            try:
                block = await asyncio.to_thread(self._get_block, gateway, root)
            except (FetchError, *NETWORK_ERRORS) as exc:
                errors.append(f"{url}: {exc or type(exc).__name__}")
                continue
            finally:
                gateway.abort()  # on a cancel (Ctrl-C) the thread's read fails now rather than at the timeout
                gateway.close()
            if verify(root, block):
                self.store.add_block(root, block)
                return block
            errors.append(f"{url}: sent bytes that do not match {to_str(root)}")
        raise FetchError(f"no gateway had {to_str(root)} ({'; '.join(errors)})")

    @staticmethod
    def _get_block(gateway: Gateway, cid: bytes) -> bytes:
        """One raw block from one gateway (unverified), read in a worker thread."""
        block = gateway.get(f"/ipfs/{to_str(cid)}?format=raw", RAW_TYPE).read(MAX_SECTION + 1)
        if len(block) > MAX_SECTION:
            raise FetchError(f"sent more than {MAX_SECTION} bytes for one block")
        return block

    def _learn(self, cid: bytes, block: bytes) -> tuple[list[pb.Link], list[int], int | None]:
        """Record a verified block's links as expected; return links, block sizes and file size."""
        self.present.add(split(cid)[1])
        if split(cid)[0] != DAG_PB or block[:1] != b"\x12":
            return [], [], None  # raw, or dag-pb without links (they come first in a dag-pb block)
        links, data = pb.decode_node(block)
        for link in links:
            self.expected.add(split(link.cid)[1])
        fs = pb.decode_unixfs(data) if data is not None else None
        file = fs if fs is not None and fs.type in (pb.FILE, pb.RAW) else None
        blocksizes = file.blocksizes if file is not None else []
        if links:
            self.nodes[split(cid)[1]] = ([link.cid for link in links], blocksizes)
        return links, blocksizes, file.filesize if file is not None else None

    def _missing(self, unit: Unit) -> bool:
        """Whether any block the unit covers is absent locally (walks verified nodes only)."""

        def walk(cid: bytes, start: int | None, stop: int | None) -> bool:
            mh = split(cid)[1]
            if mh not in self.nodes:
                if mh in self.present:
                    return False  # a leaf verified in this run
                if not self.store.has(cid):
                    return True
                if split(cid)[0] == DAG_PB:
                    try:
                        self._learn(cid, self.store.get(cid))
                    except BlockstoreError:
                        return True
                if mh not in self.nodes:
                    return False  # a leaf, present
            children, sizes = self.nodes[mh]
            if start is None or stop is None or len(sizes) != len(children):
                return any(walk(c, None, None) for c in children)
            offset = 0
            for child, size in zip(children, sizes, strict=True):
                if offset < stop and offset + size > start and walk(child, max(start - offset, 0), min(stop - offset, size)):
                    return True
                offset += size
            return False

        return walk(unit.cid, unit.start, unit.stop)

    def _take(self, gateway: str) -> Unit | None:
        """The next unit for `gateway`: one it has not failed on, unless every live gateway has. Waits while
        units it cannot take are pending or in flight (they may come back); None when nothing is left for it."""
        with self.changed:
            while not self.stopping and gateway in self.alive:
                for i, unit in enumerate(self.pending):
                    tried = self.failed.get(unit, set())
                    if gateway not in tried or self.alive <= tried:
                        self.in_flight += 1
                        return self.pending.pop(i)
                if not self.pending and not self.in_flight:
                    return None
                self.changed.wait()
            return None

    def _settle(self, unit: Unit, failed_on: str | None = None) -> None:
        """A unit is done, or failed on a gateway and goes back to the queue; wake the waiting workers."""
        with self.changed:
            self.in_flight -= 1
            if failed_on is not None:
                self.failed.setdefault(unit, set()).add(failed_on)
                self.pending.append(unit)
            self.changed.notify_all()

    def _worker(self, url: str) -> None:
        """One worker thread: fetch units from one gateway until none is left or it failed MAX_FAILURES in a row.

        It takes its next unit itself, so no unit waits for the event loop between two requests."""
        failures = 0
        gateway = Gateway(url, self.timeout_s)
        self.connections.append(gateway)
        try:
            while failures < MAX_FAILURES and (unit := self._take(url)) is not None:
                try:
                    self._fetch_unit(gateway, unit)
                    if self._missing(unit):
                        raise FetchError("the CAR ended without every block of the range")
                    failures = 0
                    self._settle(unit)
                except (CarError, FetchError, pb.DecodeError, *NETWORK_ERRORS) as exc:
                    failures += 1
                    if not self.stopping:
                        log.warning(
                            "gateway %s failed on %s (%s); another gateway will retry it",
                            url,
                            to_str(unit.cid),
                            exc or type(exc).__name__,
                        )
                    self._settle(unit, failed_on=url)
                except BaseException:
                    self._settle(unit, failed_on=url)
                    raise
        finally:
            gateway.close()
        if failures >= MAX_FAILURES:
            log.warning("gateway %s dropped after %d failures in a row", url, failures)
            with self.changed:
                self.alive.discard(url)
                self.changed.notify_all()

    def _fetch_unit(self, gateway: Gateway, unit: Unit) -> None:
        """Stream one unit's CAR in a worker thread: each block is read from the socket into its own bytes, hashed
        and stored."""
        resp = gateway.get(unit.path(), CAR_TYPE)
        try:
            for cid, block in CarReader(resp):  # hashes are checked by the reader
                self._accept(cid, block)
        except BaseException:
            gateway.close()  # the rest of the body is unread: this connection cannot carry another request
            raise

    def _accept(self, cid: bytes, block: bytes) -> None:
        if self.stopping:
            raise FetchError("the fetch was stopped")
        mh = split(cid)[1]
        if mh not in self.expected:
            raise FetchError(f"gateway sent block {to_str(cid)}, which no verified block links to")
        if not self.store.has(cid):
            self.store.put(cid, (block,))
            self.bar.update(len(block))
        self._learn(cid, block)


def fetch_dag(root: bytes, store: Blockstore, gateways: list[str], **kwargs) -> None:
    """Synchronous wrapper: fetch the DAG under `root` into `store` from `gateways`."""
    asyncio.run(DagFetcher(store, gateways, **kwargs).fetch(root))
