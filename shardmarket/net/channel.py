"""Encrypted message channels over a raw TCP stream (TCP_NODELAY) or a WebSocket, and the client's connect."""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from typing import Protocol

import aiohttp
from aiohttp import web

from shardmarket.net import wire
from shardmarket.net.crypto import ClientHandshake, DecryptError, SessionCipher
from shardmarket.net.wire import Limits, Message, StreamDesync, WireError

HANDSHAKE_CONFIRM = b"shardmarket-ready"
SESSION_PATH = "/v1/session"
SAME_PORT = "same-port"  # /info's raw TCP transport: served on the port /info was fetched from (net.listener)


class ChannelClosed(ConnectionError):
    """The other side closed the connection or it broke."""


class KeyMismatch(ConnectionError):
    """The node could not prove it holds the pinned X25519 key."""


class Transport(Protocol):
    async def send(self, data: bytes) -> None: ...
    async def recv(self, limits: Limits) -> bytes:
        """The next frame; one over `limits.max_frame_bytes` raises StreamDesync (the connection must close)."""
        ...

    def hung_up(self) -> bool:
        """Whether the other side closed the connection (as far as this side has seen, without a round trip)."""
        ...

    async def close(self) -> None: ...


class StreamTransport:
    """Length-prefixed frames on an asyncio byte stream."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        sock = writer.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    async def send(self, data: bytes) -> None:
        if self.writer.is_closing():
            raise ChannelClosed("connection is closed")
        self.writer.write(wire.stream_frame(data))
        try:
            await self.writer.drain()
        except (ConnectionError, OSError) as exc:
            raise ChannelClosed(f"connection broke while sending: {exc}") from None

    async def recv(self, limits: Limits) -> bytes:
        try:
            return await wire.read_stream_frame(self.reader, limits)
        except asyncio.IncompleteReadError:
            raise ChannelClosed("connection closed by the other side") from None
        except (ConnectionError, OSError) as exc:
            raise ChannelClosed(f"connection broke: {exc}") from None

    def hung_up(self) -> bool:
        return self.reader.at_eof() or self.writer.is_closing()

    async def close(self) -> None:
        self.writer.close()
        with contextlib.suppress(ConnectionError, OSError):
            await self.writer.wait_closed()


class WebSocketTransport:
    """One frame per binary WebSocket message (client or server side)."""

    def __init__(
        self, ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse, session: aiohttp.ClientSession | None = None
    ) -> None:
        self.ws, self._session = ws, session

    async def send(self, data: bytes) -> None:
        if self.ws.closed:
            raise ChannelClosed("WebSocket is closed")
        try:
            await self.ws.send_bytes(data)
        except (ConnectionError, OSError) as exc:
            raise ChannelClosed(f"WebSocket broke while sending: {exc}") from None

    async def recv(self, limits: Limits) -> bytes:
        msg = await self.ws.receive()
        if msg.type == aiohttp.WSMsgType.BINARY:
            if len(msg.data) > limits.max_frame_bytes:
                raise StreamDesync(
                    f"frame of {len(msg.data)} bytes exceeds the limit of {limits.max_frame_bytes}; closing", "too_large"
                )
            return msg.data
        if msg.type == aiohttp.WSMsgType.TEXT:
            raise WireError("frames are binary WebSocket messages, got a text message")
        if msg.type == aiohttp.WSMsgType.ERROR and isinstance(msg.data, aiohttp.WebSocketError) and msg.data.code == 1009:
            raise ChannelClosed("WebSocket message exceeds the frame size limit")
        raise ChannelClosed(f"WebSocket closed ({msg.type.name})")

    def hung_up(self) -> bool:
        return self.ws.closed

    async def close(self) -> None:
        await self.ws.close()
        if self._session is not None:
            await self._session.close()


class SecureChannel:
    """Sends and receives wire messages sealed with the session cipher."""

    def __init__(self, transport: Transport, cipher: SessionCipher, limits: Limits = wire.DEFAULT_LIMITS) -> None:
        self.transport, self.cipher, self.limits = transport, cipher, limits

    async def send(self, message: Message) -> int:
        """Seal and send `message`; returns the bytes put on the wire."""
        sealed = self.cipher.seal(wire.encode(message))
        await self.transport.send(sealed)
        return len(sealed)

    async def recv(self) -> Message:
        """The next message; raises DecryptError, WireError or ChannelClosed."""
        return wire.decode(self.cipher.open(await self.transport.recv(self.limits)), self.limits)

    def hung_up(self) -> bool:
        return self.transport.hung_up()

    async def close(self) -> None:
        await self.transport.close()


async def open_transport(
    base_url: str, kind: str, tcp_port: int | None, limits: Limits, timeout: float, relay: str | None = None
) -> Transport:
    """Connect to a node's session endpoint over `kind` ("tcp" or "ws"), through `relay` (host:port of a forwarding
    relay, net.relay.ForwardProxy) when given: the node then sees the relay's address, and the relay only ciphertext."""
    url = aiohttp.client.URL(base_url)
    if kind == "tcp":
        if not tcp_port:
            raise ConnectionError(f"node {base_url} offers no raw TCP port; use the ws transport")
        if relay:
            reader, writer = await asyncio.wait_for(connect_through(relay, str(url.host), tcp_port), timeout)
        else:
            reader, writer = await asyncio.wait_for(asyncio.open_connection(url.host, tcp_port, limit=2**20), timeout)
        return StreamTransport(reader, writer)
    if kind == "ws":
        session = aiohttp.ClientSession()
        try:
            ws = await session.ws_connect(
                url.with_path(SESSION_PATH),
                max_msg_size=limits.max_frame_bytes,
                timeout=aiohttp.ClientWSTimeout(ws_close=timeout),
                proxy=f"http://{relay}" if relay else None,
            )
        except BaseException:
            await session.close()
            raise
        return WebSocketTransport(ws, session)
    raise ValueError(f"unknown transport {kind!r}; use tcp or ws")


async def connect_through(relay: str, host: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A TCP stream to host:port tunnelled through the relay at `relay` (host:port) with HTTP CONNECT."""
    relay_host, _, relay_port = relay.rpartition(":")
    if not relay_host or not relay_port.isdigit():
        raise ValueError(f"a relay is given as HOST:PORT, got {relay!r}")
    reader, writer = await asyncio.open_connection(relay_host.strip("[]"), int(relay_port), limit=2**20)
    try:
        target = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        writer.write(f"CONNECT {target} HTTP/1.1\r\nHost: {target}\r\n\r\n".encode())
        head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError) as exc:
        writer.close()
        raise ConnectionError(f"relay {relay} closed the connection instead of answering CONNECT: {exc}") from None
    except BaseException:
        writer.close()
        raise
    status = head.split(b"\r\n", 1)[0].decode("latin-1")
    if status.split(" ")[1:2] != ["200"]:
        writer.close()
        raise ConnectionError(f"relay {relay} would not connect to {host}:{port}: {status}")
    return reader, writer


async def client_handshake(transport: Transport, node_public_key: bytes, limits: Limits = wire.DEFAULT_LIMITS) -> SecureChannel:
    """Run the handshake to the pinned key; raises KeyMismatch if the node cannot prove it holds it."""
    handshake = ClientHandshake(node_public_key)
    await transport.send(wire.encode(Message(wire.HELLO, fields={"key": handshake.hello_key})))
    reply = wire.decode(await transport.recv(limits), limits)
    if reply.type == wire.ERROR:
        raise ConnectionError(f"node refused the handshake: {reply.fields.get('message')}")
    if reply.type != wire.WELCOME or not isinstance(reply.fields.get("key"), bytes):
        raise WireError(f"expected a welcome frame, got {reply.type!r}")
    cipher = handshake.finish(reply.fields["key"])
    try:
        confirmed = cipher.open(reply.fields.get("confirm", b""))
    except (DecryptError, TypeError):
        confirmed = b""
    if confirmed != HANDSHAKE_CONFIRM:
        raise KeyMismatch("the node does not hold the pinned X25519 key: refusing to talk to it (wrong node or key)")
    return SecureChannel(transport, cipher, limits)


class ChannelPool:
    """Secure channels kept open between requests, per node (URL, transport, port and pinned key): a new request
    opens its session on a kept channel with one OPEN round trip, instead of a connect and a handshake. A channel is
    kept only once its session closed cleanly; one idle for longer than `idle_s` is closed."""

    def __init__(self, idle_s: float = 30.0, per_node: int = 8) -> None:
        self.idle_s, self.per_node = idle_s, per_node
        self._idle: dict[tuple, list[tuple[float, SecureChannel]]] = {}
        self._loop: asyncio.AbstractEventLoop | None = None  # the event loop the kept channels belong to

    def _bind(self) -> None:
        loop = asyncio.get_running_loop()
        if self._loop is not loop:  # used from another event loop now (a new asyncio.run): the channels kept on the
            self._idle, self._loop = {}, loop  # old one can neither be used nor closed from this one

    async def take(self, key: tuple) -> SecureChannel | None:
        """The most recently kept channel for `key` that has not been idle too long nor been hung up on, or None (a
        request may send its OPEN and first step on it at once, so a channel known dead must not be handed out)."""
        self._bind()
        idle, now = self._idle.get(key, []), time.monotonic()
        while idle:
            since, channel = idle.pop()
            if now - since <= self.idle_s and not channel.hung_up():
                return channel
            await close_quietly(channel)
        return None

    async def keep(self, key: tuple, channel: SecureChannel) -> None:
        """Keep `channel` for `key` (closed instead if `per_node` are kept already); channels idle for too long,
        whatever their node, are closed meanwhile."""
        self._bind()
        now, stale = time.monotonic(), []
        for idle in self._idle.values():
            stale += [kept for since, kept in idle if now - since > self.idle_s]
            idle[:] = [(since, kept) for since, kept in idle if now - since <= self.idle_s]
        idle = self._idle.setdefault(key, [])
        if len(idle) >= self.per_node:
            stale.append(channel)
        else:
            idle.append((now, channel))
        await asyncio.gather(*(close_quietly(old) for old in stale))

    def __len__(self) -> int:
        return sum(len(idle) for idle in self._idle.values())

    async def close(self) -> None:
        """Close every kept channel."""
        self._bind()
        idle, self._idle = self._idle, {}
        await asyncio.gather(*(close_quietly(channel) for channels in idle.values() for _, channel in channels))


async def close_quietly(channel: SecureChannel) -> None:
    """Close `channel`, ignoring a connection that is broken already."""
    with contextlib.suppress(ConnectionError, OSError):
        await channel.close()
