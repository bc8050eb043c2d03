"""Node-to-node push: a node sends its step's output straight to the next node of the client's route.

The client names the next node by its X25519 key only; this node connects solely to an endpoint that the directory
lists for that key (the NodeRegistry on chain, or the free peers of its config, whose keys their /info announces) and
the handshake proves the other side holds the key. So a client can make a node connect to registered nodes, never to
an address of its choosing. The connection passes the next node's doorman like any client's, is shared by every
session pushing there, and is kept while it works; outbound connections are capped.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from typing import Any

import aiohttp
from yarl import URL

from shardmarket.net import wire
from shardmarket.net.channel import SAME_PORT, ChannelClosed, SecureChannel, client_handshake, close_quietly, open_transport
from shardmarket.net.crypto import DecryptError
from shardmarket.net.ratelog import RateLimitedLog
from shardmarket.net.wire import WireError

log = logging.getLogger("shardmarket.node")
MAX_PUSH_CONNECTIONS = 32  # outbound connections to next nodes, in total
CONNECT_TIMEOUT_S = 10.0
REFRESH_S = 30.0  # a key the directory does not know makes it read its source again, at most this often

# () -> {X25519 public key: the node's base URL}, read from the chain's registry or from the configured peers
DirectorySource = Callable[[], Awaitable[dict[bytes, str]]]


@dataclass(frozen=True)
class Successor:
    """Where a session's output goes: the next node's key and the token that node expects with pushed steps."""

    key: bytes
    token: bytes


class PeerDirectory:
    """The endpoints this node may push to, by X25519 key; read again from its source when asked for an unknown key."""

    def __init__(self, source: DirectorySource, refresh_s: float = REFRESH_S) -> None:
        self.source, self.refresh_s = source, refresh_s
        self._known: dict[bytes, str] = {}
        self._read_at = -float("inf")
        self._lock = asyncio.Lock()

    async def endpoint(self, key: bytes) -> str | None:
        """The base URL registered for `key`, or None when no registered node holds it."""
        if key not in self._known and time.monotonic() - self._read_at >= self.refresh_s:
            async with self._lock:
                if key not in self._known and time.monotonic() - self._read_at >= self.refresh_s:
                    self._read_at = time.monotonic()
                    try:
                        self._known = await self.source()
                    except (OSError, ValueError, aiohttp.ClientError, TimeoutError) as exc:
                        log.warning("cannot read the directory of next nodes: %s", exc)
        return self._known.get(key)


def peers_source(urls: list[str]) -> DirectorySource:
    """A directory source reading the /info of each configured peer: the key it announces, at the URL it answers on."""

    async def read() -> dict[bytes, str]:
        known: dict[bytes, str] = {}
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as http:
            for url in urls:
                try:
                    async with http.get(f"{url.rstrip('/')}/info") as response:
                        info = await response.json()
                    if info.get("transports", {}).get("tcp") == SAME_PORT:
                        known[bytes.fromhex(info["x25519_public_key"])] = url.rstrip("/")
                except (OSError, ValueError, KeyError, aiohttp.ClientError, TimeoutError) as exc:
                    log.info("peer %s did not answer /info: %s", url, exc)
        return known

    return read


class Successors:
    """Outbound channels to next nodes, one per key, opened on first use (or when a session names its next node, so
    the connection is warm by the first step) and kept while they work."""

    def __init__(self, directory: PeerDirectory, max_connections: int = MAX_PUSH_CONNECTIONS) -> None:
        self.directory, self.max_connections = directory, max_connections
        self._channels: dict[bytes, asyncio.Task[SecureChannel | None]] = {}
        self._tasks: set[asyncio.Task] = set()  # readers of open channels and closes under way
        self._warn = RateLimitedLog(log).warning

    def warm(self, key: bytes) -> None:
        """Start connecting to `key`'s node now, if no channel to it is open or opening."""
        task = self._channels.get(key)
        if task is None or (task.done() and (task.cancelled() or task.exception() is not None or task.result() is None)):
            if len(self._channels) >= self.max_connections and key not in self._channels:
                self._warn("push_connections", "not pushing to a new node: %d outbound connections open", self.max_connections)
                return
            self._channels[key] = asyncio.ensure_future(self._connect(key))

    async def channel(self, key: bytes) -> SecureChannel | None:
        """The open channel to `key`'s node (waiting for its connect), or None when it cannot be reached."""
        self.warm(key)
        task = self._channels.get(key)
        if task is None:
            return None
        try:
            return await asyncio.shield(task)
        except Exception:
            return None

    async def _connect(self, key: bytes) -> SecureChannel | None:
        url = await self.directory.endpoint(key)
        if url is None:
            self._warn("push_unknown", "a client named a next node whose key no registered node holds; relaying instead")
            return None
        try:
            port = URL(url).port
            transport = await open_transport(url, "tcp", port, wire.DEFAULT_LIMITS, CONNECT_TIMEOUT_S)
            try:
                channel = await asyncio.wait_for(client_handshake(transport, key), CONNECT_TIMEOUT_S)
            except BaseException:
                await transport.close()
                raise
        except (ConnectionError, OSError, TimeoutError, WireError, DecryptError) as exc:
            self._warn("push_connect", "cannot connect to next node %s (%s); relaying instead", url, exc)
            return None
        self._background(self._drain(key, channel))
        return channel

    async def _drain(self, key: bytes, channel: SecureChannel) -> None:
        """Read what the next node sends back on a push connection (errors about frames it could not read), until it
        closes; then forget the channel, so the next push connects again."""
        with contextlib.suppress(ChannelClosed, WireError, DecryptError, OSError):
            while True:
                frame = await channel.recv()
                if frame.type == wire.ERROR:
                    self._warn("push_error", "next node refused a pushed frame: %s", frame.fields.get("message"))
        self.forget(key, channel)

    def forget(self, key: bytes, channel: SecureChannel) -> None:
        """Drop a broken channel to `key`'s node."""
        task = self._channels.get(key)
        if task is not None and task.done() and not task.cancelled() and task.exception() is None and task.result() is channel:
            del self._channels[key]
        self._background(close_quietly(channel))

    def _background(self, work: Coroutine[Any, Any, None]) -> None:
        task = asyncio.ensure_future(work)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        """Close every outbound channel."""
        tasks, self._channels = list(self._channels.values()), {}
        for task in [*tasks, *self._tasks]:
            task.cancel()
        for result in await asyncio.gather(*tasks, return_exceptions=True):
            if isinstance(result, SecureChannel):
                await close_quietly(result)
