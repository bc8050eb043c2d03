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


class _FirstByte(asyncio.Protocol):
    """Waits for a connection's first byte, then hands the connection (and that byte) to the protocol it names."""

    def __init__(self, http: Callable[[], asyncio.Protocol], streams: StreamHandler, limit: int) -> None:
        self.http, self.streams, self.limit = http, streams, limit
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]  # a server's connections are stream transports

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        protocol: asyncio.Protocol
        if speaks_http(data[0]):
            protocol = self.http()
        else:
            reader = asyncio.StreamReader(limit=self.limit)
            protocol = asyncio.StreamReaderProtocol(reader, self.streams)
        self.transport.set_protocol(protocol)
        protocol.connection_made(self.transport)
        protocol.data_received(data)


async def serve_both(
    http: Callable[[], asyncio.Protocol], streams: StreamHandler, host: str, port: int, limit: int = 2**20
) -> asyncio.Server:
    """Listen on host:port; `http` makes the protocol of an HTTP connection (aiohttp's `runner.server`), `streams`
    handles a raw TCP connection as asyncio.start_server would."""
    loop = asyncio.get_running_loop()
    return await loop.create_server(lambda: _FirstByte(http, streams, limit), host, port, reuse_address=True)
