"""The node's doorman: every connection to its listening socket (raw TCP, and HTTP with its WebSocket sessions)
passes it, before its first byte says which it speaks. It caps connections in total and per address, and until a
connection completes the session handshake it must do so within a deadline and send no more than a few KiB, so a
stranger who never finishes a handshake, or dribbles one byte at a time, holds a few KiB for a few seconds. An HTTP
connection that never becomes a session gets the same deadline: its requests (/info, /health, /probe) take
milliseconds.

When every connection slot is taken, a newcomer takes the slot of the oldest connection still before its handshake,
from the address holding the most such connections: a flood of half-open connections from many addresses then
only churns among itself, and cannot keep a real client from reaching the handshake."""

from __future__ import annotations

import asyncio
import enum
import ipaddress
import logging
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

from shardmarket.net.listener import Forwarding
from shardmarket.net.ratelog import RateLimitedLog

log = logging.getLogger("shardmarket.node")


@dataclass(frozen=True)
class ConnectionLimits:
    """What the doorman admits; every field is a [node] setting of the same name."""

    max_connections: int = 256
    max_connections_per_address: int = 64
    max_handshakes_per_address: int = 32  # connections of one address still before their handshake
    handshake_timeout_s: float = 5.0  # from connect to a completed handshake (an HTTP upgrade included)
    handshake_bytes: int = 16 * 2**10  # bytes a connection may send before its handshake completes


def address_key(peername: object) -> str:
    """The address a peer's limits count under: its IPv4 address, or the /64 network of an IPv6 one (one host
    commonly holds a whole /64, so counting single IPv6 addresses would bound nothing)."""
    if not isinstance(peername, tuple) or not peername:
        return "unknown"
    try:
        ip = ipaddress.ip_address(peername[0])
    except ValueError:
        return str(peername[0])
    if isinstance(ip, ipaddress.IPv6Address):
        if ip.ipv4_mapped is not None:
            return str(ip.ipv4_mapped)
        return str(ipaddress.IPv6Network((ip.packed, 64), strict=False))
    return str(ip)


class Phase(enum.Enum):
    REFUSED = "refused"  # never admitted: the served protocol never sees it
    HANDSHAKING = "handshaking"  # admitted; the deadline and the byte budget run
    OPEN = "open"  # the handshake completed: the session service's limits apply


class Peer:
    """What the session service knows of a connection's peer: its address and a way to say the handshake completed.
    This base is a peer no doorman guards (a service driven directly)."""

    address = "unknown"

    def handshaken(self) -> None:
        """The connection completed the session handshake."""


class GuardedConnection(Forwarding, Peer):
    """One connection, in front of the protocol that serves it (built only once the doorman admits the connection)."""

    def __init__(self, doorman: Doorman, serve: Callable[[], asyncio.BaseProtocol]) -> None:
        self.doorman, self._serve = doorman, serve
        self.inner: asyncio.Protocol | None = None
        self.phase = Phase.REFUSED
        self.received = 0
        self.counted = False  # whether the doorman counts it among its connections
        self.transport: asyncio.Transport | None = None
        self._deadline: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.address = address_key(transport.get_extra_info("peername"))
        if not self.doorman._admit(self):
            transport.abort()
            return
        self.phase = Phase.HANDSHAKING
        limits = self.doorman.limits
        self._deadline = asyncio.get_running_loop().call_later(
            limits.handshake_timeout_s,
            self._drop,
            "handshake_timeout_s",
            f"no handshake within {limits.handshake_timeout_s:g} s (handshake_timeout_s)",
        )
        inner = self._serve()
        assert isinstance(inner, asyncio.Protocol)
        self.inner = inner
        inner.connection_made(transport)

    def handshaken(self) -> None:
        if self.phase is Phase.HANDSHAKING:
            self.phase = Phase.OPEN
            self._stop_deadline()
            self.doorman._handshake_done(self)

    def data_received(self, data: bytes) -> None:
        if self.inner is None or self.transport is None or self.transport.is_closing():
            return
        if self.phase is Phase.HANDSHAKING:
            self.received += len(data)
            if self.received > self.doorman.limits.handshake_bytes:
                limit = self.doorman.limits.handshake_bytes
                self._drop("handshake_bytes", f"more than {limit} bytes before its handshake (handshake_bytes)")
                return
        self.inner.data_received(data)

    def connection_lost(self, exc: Exception | None) -> None:
        self._stop_deadline()
        if self.inner is not None:
            self.doorman._release(self)
            self.inner.connection_lost(exc)

    def _drop(self, kind: str, why: str) -> None:
        self._deadline = None
        self.doorman.warn(kind, "closed a connection from %s: %s", self.address, why)
        if self.transport is not None:
            self.transport.abort()

    def _stop_deadline(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None


class Doorman:
    """Admits connections under `limits`, and counts them; `protocol(serve)` wraps a listening socket's protocol
    factory (asyncio's `create_server` takes the result)."""

    def __init__(self, limits: ConnectionLimits) -> None:
        self.limits = limits
        self.warn = RateLimitedLog(log).warning
        self.connections = 0
        self._per_address: Counter[str] = Counter()
        self._handshaking: dict[str, dict[GuardedConnection, None]] = {}  # per address, oldest first

    def protocol(self, serve: Callable[[], asyncio.BaseProtocol]) -> Callable[[], GuardedConnection]:
        """A protocol factory that admits each connection before `serve` builds the protocol serving it."""
        return lambda: GuardedConnection(self, serve)

    def _admit(self, connection: GuardedConnection) -> bool:
        limits, address = self.limits, connection.address
        waiting = self._handshaking.get(address, {})
        if self._per_address[address] >= limits.max_connections_per_address:
            why = f"it holds {limits.max_connections_per_address} connections already (max_connections_per_address)"
        elif len(waiting) >= limits.max_handshakes_per_address:
            why = f"it has {limits.max_handshakes_per_address} connections before their handshake (max_handshakes_per_address)"
        elif self.connections >= limits.max_connections and not self._evict_one():
            why = f"this node holds its maximum of {limits.max_connections} connections (max_connections)"
        else:
            self.connections += 1
            connection.counted = True
            self._per_address[address] += 1
            self._handshaking.setdefault(address, {})[connection] = None
            return True
        self.warn("refused_connection", "refused a connection from %s: %s", address, why)
        return False

    def _evict_one(self) -> bool:
        """Close the oldest connection still before its handshake of the address holding the most of them."""
        if not self._handshaking:
            return False
        address = max(self._handshaking, key=lambda a: len(self._handshaking[a]))
        oldest = next(iter(self._handshaking[address]))
        why = f"all {self.limits.max_connections} connection slots were taken and a newcomer needed one (max_connections)"
        self._release(oldest)  # now, so the newcomer's slot is free before the evicted one's connection_lost
        oldest._drop("max_connections", f"its handshake was the oldest pending: {why}")
        return True

    def _handshake_done(self, connection: GuardedConnection) -> None:
        self._forget_waiting(connection)

    def _release(self, connection: GuardedConnection) -> None:
        if not connection.counted:
            return
        connection.counted = False
        self.connections -= 1
        _decrement(self._per_address, connection.address)
        self._forget_waiting(connection)

    def _forget_waiting(self, connection: GuardedConnection) -> None:
        waiting = self._handshaking.get(connection.address)
        if waiting is not None and connection in waiting:
            del waiting[connection]
            if not waiting:
                del self._handshaking[connection.address]


def _decrement(counter: Counter[str], key: str) -> None:
    """Count one down, forgetting the key at zero (so addresses that left take no memory)."""
    counter[key] -= 1
    if counter[key] <= 0:
        del counter[key]


def peer_of(transport: asyncio.BaseTransport | None) -> Peer:
    """The doorman's record of the connection `transport` belongs to, or an unguarded peer."""
    protocol = transport.get_protocol() if transport is not None else None
    return protocol if isinstance(protocol, GuardedConnection) else Peer()
