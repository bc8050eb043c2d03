"""One listening port for both session transports: a connection whose first byte is a letter speaks HTTP (the API,
/health, WebSocket sessions), any other is the raw TCP transport (its first frame's u32 length starts with a zero
byte). A node behind NAT then needs one mapping or one relayed port for everything it offers."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

StreamHandler = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


def speaks_http(first: int) -> bool:
    """An HTTP request starts with its method (GET, POST, ...); a raw TCP frame with a length below 2**24."""
    return ord("A") <= first <= ord("Z")


class Forwarding(asyncio.Protocol):
    """A protocol in front of another (`inner`, once there is one): the end of the stream and flow control pass
    through to it."""

    inner: asyncio.Protocol | None = None

    def eof_received(self) -> bool | None:
        return None if self.inner is None else self.inner.eof_received()

    def pause_writing(self) -> None:
        if self.inner is not None:
            self.inner.pause_writing()

    def resume_writing(self) -> None:
        if self.inner is not None:
            self.inner.resume_writing()


class _FirstByte(Forwarding):
    """Waits for a connection's first byte, then passes the connection and all it receives to the protocol that byte
    names. It forwards rather than handing the transport over (set_protocol), so a protocol wrapping this one (the
    doorman's) stays the transport's protocol and keeps seeing every byte."""

    def __init__(self, http: Callable[[], asyncio.Protocol], streams: StreamHandler, limit: int) -> None:
        self.http, self.streams, self.limit = http, streams, limit
        self.transport: asyncio.Transport | None = None
        self.inner: asyncio.Protocol | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a server's connections are stream transports

    def data_received(self, data: bytes) -> None:
        if self.inner is None:
            if speaks_http(data[0]):
                self.inner = self.http()
            else:
                self.inner = asyncio.StreamReaderProtocol(asyncio.StreamReader(limit=self.limit), self.streams)
            self.inner.connection_made(self.transport)  # type: ignore[arg-type]  # set by connection_made
        self.inner.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        if self.inner is not None:
            self.inner.connection_lost(exc)


def first_byte_protocol(
    http: Callable[[], asyncio.Protocol], streams: StreamHandler, limit: int = 2**20
) -> Callable[[], asyncio.Protocol]:
    """The protocol factory of a port serving both: `http` makes the protocol of an HTTP connection (aiohttp's
    `runner.server`), `streams` handles a raw TCP connection as asyncio.start_server would, reading up to `limit`
    bytes ahead."""
    return lambda: _FirstByte(http, streams, limit)
