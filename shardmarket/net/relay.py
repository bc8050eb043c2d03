"""Relays: a public node that opts in gives a node behind NAT a public TCP port and forwards its connections.

The node keeps one outgoing WebSocket to the relay; every client connection to the relayed port becomes a
stream multiplexed over it as binary frames `kind (1 byte) | stream id (4 bytes) | payload`. The relay moves
opaque bytes (the node protocol is end-to-end encrypted above it) and caps each node's bandwidth.

The other way round, a relay may forward clients (ForwardProxy): a client that must not be located by the nodes
reaches each of them through it (HTTP CONNECT for sessions, absolute-form GET for /info, /health and /probe), so a
node sees the relay's address; the sessions stay encrypted to each node, so the relay sees only ciphertext.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import logging
import secrets
import socket
import struct
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import aiohttp
from aiohttp import web

log = logging.getLogger(__name__)

FRAME = struct.Struct("!BI")
OPEN, DATA, CLOSE = 1, 2, 3
CHUNK = 64 * 1024
MAX_RECONNECT_WAIT_S = 4.0  # a restarted relay is found again within this
MAX_UNREAD = 4 * 2**20  # bytes a relayed client may leave unread before the relay drops its stream


class RelayError(Exception):
    """The relay refused or dropped the node, or cannot verify; the message says why."""


class TokenBucket:
    """Bytes per second with a burst of one second: `take` waits until the bytes may pass."""

    def __init__(self, rate: float) -> None:
        self.rate, self.level, self.stamp = rate, rate, time.monotonic()

    async def take(self, n: int) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        self.level = min(self.rate, self.level + (now - self.stamp) * self.rate) - n
        self.stamp = now
        if self.level < 0:
            await asyncio.sleep(-self.level / self.rate)


class Tunnel:
    """One node's WebSocket on either side: sends frames under a lock, keeps a writer per open stream."""

    def __init__(self, ws: web.WebSocketResponse | aiohttp.ClientWebSocketResponse, bucket: TokenBucket) -> None:
        self.ws, self.bucket = ws, bucket
        self.lock = asyncio.Lock()
        self.streams: dict[int, asyncio.StreamWriter] = {}
        self.pending: dict[int, asyncio.Queue[bytes | None]] = {}

    async def send(self, kind: int, stream: int, payload: bytes = b"") -> None:
        if kind == DATA:
            await self.bucket.take(len(payload))
        async with self.lock:
            await self.ws.send_bytes(FRAME.pack(kind, stream) + payload)

    async def pump(self, stream: int, reader: asyncio.StreamReader) -> None:
        """Copy a TCP stream into DATA frames, then CLOSE."""
        try:
            while chunk := await reader.read(CHUNK):
                await self.send(DATA, stream, chunk)
        except (ConnectionError, OSError):
            pass
        finally:
            if not self.ws.closed:
                with contextlib.suppress(ConnectionError, RuntimeError):
                    await self.send(CLOSE, stream)

    async def deliver(self, stream: int, payload: bytes) -> None:
        """Write a DATA frame's payload to its TCP stream (bandwidth counted both ways) without waiting for the
        reader: a client that lets more than MAX_UNREAD bytes pile up is cut off, so it cannot stall the others."""
        writer = self.streams.get(stream)
        if writer is None:
            return
        await self.bucket.take(len(payload))
        writer.write(payload)
        if writer.transport.get_write_buffer_size() > MAX_UNREAD:
            log.warning("stream %d reads too slowly (over %d bytes unread); closing it", stream, MAX_UNREAD)
            self.close_stream(stream)
            with contextlib.suppress(ConnectionError, RuntimeError):
                await self.send(CLOSE, stream)

    def close_stream(self, stream: int) -> None:
        writer = self.streams.pop(stream, None)
        if writer is not None:
            writer.close()

    def close_all(self) -> None:
        for stream in list(self.streams):
            self.close_stream(stream)


@dataclass
class _Slot:
    token: str
    server: asyncio.Server = field(init=False)  # made after the slot: its connection callback needs the slot
    port: int = field(init=False)
    tunnel: Tunnel | None = None
    next_stream: int = 1
    tasks: set = field(default_factory=set)


class RelayServer:
    """The relay side: `app()` serves GET /relay (the node's WebSocket), POST /verify and GET /health."""

    def __init__(
        self,
        public_host: str,
        bind_host: str = "0.0.0.0",
        rate_bytes_per_s: float = 10e6,
        max_nodes: int = 64,
        max_streams: int = 256,
    ) -> None:
        self.public_host, self.bind_host = public_host, bind_host
        self.rate, self.max_nodes, self.max_streams = rate_bytes_per_s, max_nodes, max_streams
        self.slots: dict[str, _Slot] = {}

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/relay", self.handle_node)
        app.router.add_post("/verify", self.handle_verify)
        app.router.add_get("/health", self.handle_health)
        app.on_shutdown.append(self._shutdown)
        return app

    async def handle_health(self, request: web.Request) -> web.Response:
        return web.json_response({"relay": True, "nodes": len(self.slots)})

    async def _shutdown(self, app: web.Application) -> None:
        """Close every relayed port and node WebSocket, so shutting down does not wait on them."""
        for slot in self.slots.values():
            slot.server.close()
            if slot.tunnel is not None:
                await slot.tunnel.ws.close(code=aiohttp.WSCloseCode.GOING_AWAY, message=b"relay shutting down")

    async def _slot(self, node: str, token: str) -> _Slot:
        slot = self.slots.get(node)
        if slot is not None:
            if not secrets.compare_digest(slot.token, token):
                raise web.HTTPForbidden(text=f"node id {node} is held by another token: pick another id")
            return slot
        if len(self.slots) >= self.max_nodes:
            raise web.HTTPServiceUnavailable(text=f"this relay serves its maximum of {self.max_nodes} nodes")
        slot = _Slot(token)
        slot.server = await asyncio.start_server(lambda r, w: self._client(slot, r, w), self.bind_host, 0)
        slot.port = slot.server.sockets[0].getsockname()[1]
        self.slots[node] = slot
        return slot

    async def handle_node(self, request: web.Request) -> web.WebSocketResponse:
        node, token = request.query.get("node", ""), request.query.get("token", "")
        if not (0 < len(node) <= 128 and 16 <= len(token) <= 128):
            raise web.HTTPBadRequest(text="give ?node=<id up to 128 chars>&token=<16-128 chars secret>")
        slot = await self._slot(node, token)
        ws = web.WebSocketResponse(heartbeat=15, max_msg_size=2 * CHUNK)
        await ws.prepare(request)
        if slot.tunnel is not None:  # a reconnect replaces the old tunnel
            await slot.tunnel.ws.close()
        tunnel = slot.tunnel = Tunnel(ws, TokenBucket(self.rate))
        await ws.send_str(json.dumps({"endpoint": f"http://{self.public_host}:{slot.port}"}))
        log.info("node %s relayed on port %d", node, slot.port)
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.BINARY or len(msg.data) < FRAME.size:
                continue
            kind, stream = FRAME.unpack_from(msg.data)
            if kind == DATA:
                await tunnel.deliver(stream, msg.data[FRAME.size :])
            elif kind == CLOSE:
                tunnel.close_stream(stream)
        tunnel.close_all()
        if slot.tunnel is tunnel:
            slot.tunnel = None
        return ws

    async def _client(self, slot: _Slot, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tunnel = slot.tunnel
        if tunnel is None or tunnel.ws.closed or len(tunnel.streams) >= self.max_streams:
            writer.close()
            return
        stream, slot.next_stream = slot.next_stream, slot.next_stream + 1
        tunnel.streams[stream] = writer
        try:
            await tunnel.send(OPEN, stream)
            await tunnel.pump(stream, reader)
        except (ConnectionError, RuntimeError):
            tunnel.close_stream(stream)

    async def handle_verify(self, request: web.Request) -> web.Response:
        """Connect back to a node's endpoint and return what its /health answered to the caller's challenge (only the
        caller's own address or this relay's ports, so the relay cannot be used to probe third parties)."""
        try:
            asked = await request.json()
            endpoint, challenge = str(asked["endpoint"]), str(asked["challenge"])
            url = urlsplit(endpoint)
            host, port = url.hostname or "", url.port or 80
            ipaddress.ip_address(host)
            if not 0 < len(challenge) <= 128:
                raise ValueError(challenge)
        except (ValueError, KeyError, TypeError):
            usage = 'send JSON {"endpoint": "http://<ip>:<port>", "challenge": "<up to 128 chars>"}'
            raise web.HTTPBadRequest(text=usage) from None
        if host not in (request.remote, self.public_host):
            raise web.HTTPForbidden(text=f"{host} is neither your address ({request.remote}) nor this relay's")
        try:
            timeout = aiohttp.ClientTimeout(total=3)
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(f"http://{host}:{port}/health", params={"challenge": challenge}) as resp,
            ):
                body = await resp.text()
                return web.json_response({"reachable": True, "status": resp.status, "body": body[:4096]})
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            return web.json_response({"reachable": False, "error": str(exc) or type(exc).__name__})


class ForwardProxy:
    """Forwards clients' TCP connections to nodes: `CONNECT host:port` (then raw bytes both ways) or a plain HTTP request
    in absolute form (`GET http://host:port/path`, passed on as it is). It refuses link-local, multicast and unspecified
    destinations, loopback and private ones (the relay's own services and LAN) unless `allow_local`, caps the streams
    per client address and in total, and the bytes per second of each stream."""

    def __init__(
        self, allow_local: bool = False, rate_bytes_per_s: float = 10e6, max_streams: int = 1024, per_address: int = 64
    ) -> None:
        self.allow_local, self.rate = allow_local, rate_bytes_per_s
        self.max_streams, self.per_address = max_streams, per_address
        self.streams: dict[str, int] = {}  # client address -> open streams
        self.server: asyncio.Server | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0: any free port); returns the port."""
        self.server = await asyncio.start_server(self._client, host, port, limit=2**16)
        return self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _destination(self, host: str, port: int) -> str:
        """The address to connect to for host:port; raises ValueError when this relay does not forward there."""
        if not 0 < port < 65536:
            raise ValueError(f"no such port {port}")
        infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
        address = ipaddress.ip_address(infos[0][4][0])
        if address.is_link_local or address.is_multicast or address.is_unspecified:
            raise ValueError(f"{address} is not forwarded to")
        if (address.is_loopback or address.is_private) and not self.allow_local:
            raise ValueError(f"{address} is a local address; this relay forwards to public ones only")
        return str(address)

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername") or ("?", 0)
        address = str(peer[0])
        if self.streams.get(address, 0) >= self.per_address or sum(self.streams.values()) >= self.max_streams:
            writer.close()
            return
        self.streams[address] = self.streams.get(address, 0) + 1
        try:
            await self._forward(reader, writer)
        except (ConnectionError, OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError):
            pass
        finally:
            self.streams[address] -= 1
            if not self.streams[address]:
                del self.streams[address]
            writer.close()

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
        method, target, *_ = [*head.split(b"\r\n", 1)[0].decode("latin-1").split(" "), "", ""]
        try:
            if method == "CONNECT":
                host, _, port = target.rpartition(":")
            else:
                url = urlsplit(target)
                if url.scheme != "http":
                    raise ValueError("send CONNECT host:port or an absolute http:// request")
                host, port = url.hostname or "", str(url.port or 80)
            address = await self._destination(host.strip("[]"), int(port))
            upstream_reader, upstream_writer = await asyncio.wait_for(asyncio.open_connection(address, int(port)), 10.0)
        except (ValueError, OSError, TimeoutError) as exc:
            writer.write(f"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nX-Reason: {exc}\r\n\r\n".encode())
            await writer.drain()
            return
        for stream in (writer, upstream_writer):  # frames pass one by one: no waiting to fill a segment (Nagle)
            sock = stream.get_extra_info("socket")
            if sock is not None:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            if method == "CONNECT":
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                upstream_writer.write(head)
            await asyncio.gather(self.copy(reader, upstream_writer), self.copy(upstream_reader, writer))
        finally:
            upstream_writer.close()

    async def copy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """Copy one direction until it ends, then end the other side's writing."""
        bucket = TokenBucket(self.rate)
        try:
            while chunk := await reader.read(CHUNK):
                await bucket.take(len(chunk))
                writer.write(chunk)
                await writer.drain()
        finally:
            if writer.can_write_eof() and not writer.is_closing():
                with contextlib.suppress(OSError):
                    writer.write_eof()


class RelayClient:
    """The node side: holds the WebSocket to a relay, opens a local TCP connection per relayed stream,
    reconnects (keeping its public port) when the relay drops it. `on_change` hears None when the connection to the
    relay breaks and the public endpoint each time it is back (a new port when the relay restarted)."""

    def __init__(
        self,
        relay_url: str,
        local_port: int,
        node_id: str,
        local_host: str = "127.0.0.1",
        on_change: Callable[[str | None], None] | None = None,
    ) -> None:
        self.relay_url, self.local = relay_url.rstrip("/"), (local_host, local_port)
        self.on_change = on_change
        self.node_id, self.token = node_id, secrets.token_hex(16)
        self.endpoint = ""  # the public endpoint, once connected
        self.connected = False
        self.session: aiohttp.ClientSession | None = None
        self.task: asyncio.Task | None = None

    async def start(self, timeout: float = 5.0) -> str:
        """Connect, and return the public endpoint the relay gives this node."""
        self.session = aiohttp.ClientSession()
        ws = await self._connect(self.session, timeout)
        self.task = asyncio.create_task(self._serve_forever(self.session, ws))
        return self.endpoint

    async def _connect(self, session: aiohttp.ClientSession, timeout: float) -> aiohttp.ClientWebSocketResponse:
        url = f"{self.relay_url}/relay?node={self.node_id}&token={self.token}"
        try:
            ws = await asyncio.wait_for(session.ws_connect(url, heartbeat=15, max_msg_size=2 * CHUNK), timeout)
            hello = await ws.receive(timeout)
        except (aiohttp.ClientError, TimeoutError, OSError) as exc:
            raise RelayError(f"cannot reach relay {self.relay_url}: {exc or type(exc).__name__}") from None
        if hello.type != aiohttp.WSMsgType.TEXT:
            raise RelayError(f"relay {self.relay_url} did not send an endpoint")
        self.endpoint = json.loads(hello.data)["endpoint"]
        self.connected = True
        return ws

    async def _serve_forever(self, session: aiohttp.ClientSession, ws: aiohttp.ClientWebSocketResponse) -> None:
        while True:
            try:
                await self._serve(ws)
            except (aiohttp.ClientError, TimeoutError, OSError) as exc:
                log.warning("the relay connection broke (%s); reconnecting", exc or type(exc).__name__)
            self.connected = False
            if self.on_change:
                self.on_change(None)
            delay = 0.25
            while True:
                await asyncio.sleep(delay)
                try:
                    ws = await self._connect(session, 5.0)
                    break
                except RelayError as exc:
                    delay = min(MAX_RECONNECT_WAIT_S, delay * 2)
                    log.warning("%s; retrying in %.1f s", exc, delay)
            if self.on_change:  # the same endpoint, or a new port when the relay restarted
                self.on_change(self.endpoint)

    async def _serve(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        tunnel = Tunnel(ws, TokenBucket(0))
        tasks: set[asyncio.Task] = set()
        async for msg in ws:
            if msg.type != aiohttp.WSMsgType.BINARY or len(msg.data) < FRAME.size:
                continue
            kind, stream = FRAME.unpack_from(msg.data)
            if kind == OPEN and stream not in tunnel.pending:
                tunnel.pending[stream] = asyncio.Queue()
                task = asyncio.create_task(self._open(tunnel, stream))
                tasks.add(task)
                task.add_done_callback(tasks.discard)
            elif kind in (DATA, CLOSE) and stream in tunnel.pending:
                tunnel.pending[stream].put_nowait(msg.data[FRAME.size :] if kind == DATA else None)
        for task in tasks:
            task.cancel()
        tunnel.close_all()

    async def _open(self, tunnel: Tunnel, stream: int) -> None:
        """Connect the stream to the local service, then copy both ways until the client or the service closes."""
        queue = tunnel.pending[stream]
        try:
            reader, writer = await asyncio.open_connection(*self.local)
        except OSError:
            tunnel.pending.pop(stream, None)
            await tunnel.send(CLOSE, stream)
            return
        tunnel.streams[stream] = writer
        pump = asyncio.create_task(tunnel.pump(stream, reader))
        try:
            while (payload := await queue.get()) is not None:  # None: the client is gone, stop sending
                writer.write(payload)
                await writer.drain()
        except (ConnectionError, OSError):
            pass
        finally:
            pump.cancel()
            tunnel.pending.pop(stream, None)
            tunnel.close_stream(stream)

    async def close(self) -> None:
        if self.task:
            self.task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self.task
        if self.session:
            await self.session.close()


async def verify(verifier_url: str, endpoint: str, proves: Callable[[str, dict], bool], timeout: float = 5.0) -> tuple[bool, str]:
    """Ask a relay to connect back to `endpoint` with a fresh challenge: (True, "") when its /health answer `proves`
    (challenge, answer) that it is this node, else (False, why). Raises RelayError when the relay itself cannot be
    asked (down, overloaded), which says nothing about the endpoint."""
    challenge = secrets.token_hex(16)
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.post(f"{verifier_url.rstrip('/')}/verify", json={"endpoint": endpoint, "challenge": challenge}) as resp,
        ):
            if resp.status >= 500:
                raise RelayError(f"verifier {verifier_url} answered HTTP {resp.status}")
            if resp.status != 200:
                return False, f"verifier refused: HTTP {resp.status} {(await resp.text())[:200]}"
            answer = await resp.json()
    except (aiohttp.ClientError, TimeoutError, OSError, ValueError) as exc:
        raise RelayError(f"verifier {verifier_url} failed: {exc or type(exc).__name__}") from None
    if not answer.get("reachable"):
        return False, f"{endpoint} did not answer from outside: {answer.get('error', '')}"
    if answer.get("status") != 200:
        return False, f"{endpoint}/health answered HTTP {answer.get('status')} from outside"
    try:
        health = json.loads(answer.get("body", ""))
    except ValueError:
        health = None
    if not isinstance(health, dict) or not proves(challenge, health):
        return False, f"{endpoint} is answered by another host, not this node (no signature by its key)"
    return True, ""
