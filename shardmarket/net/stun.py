"""STUN (RFC 8489/5389) binding requests: the public address, and the NAT's mapping and filtering (RFC 4787/5780)."""

from __future__ import annotations

import asyncio
import ipaddress
import os
import struct
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import cast

from shardmarket.net.udp import local_address_towards

MAGIC_COOKIE = 0x2112A442
BINDING_REQUEST = 0x0001
BINDING_SUCCESS = 0x0101
MAPPED_ADDRESS = 0x0001
CHANGE_REQUEST = 0x0003
XOR_MAPPED_ADDRESS = 0x0020
OTHER_ADDRESS = 0x802C


class StunError(Exception):
    """A STUN server did not answer, or answered something unusable."""


@dataclass(frozen=True)
class Binding:
    """What one binding request saw: our address as the server sees it, and the local socket we sent from."""

    mapped: tuple[str, int]
    local: tuple[str, int]
    server: tuple[str, int]


@dataclass(frozen=True)
class NatBehavior:
    """The NAT between us and the STUN servers, in RFC 4787 terms, plus the classic RFC 3489 name."""

    public_ip: str
    mapping: str  # "none" (no NAT), "endpoint-independent", "endpoint-dependent", "unknown" (one server only)
    filtering: str  # "endpoint-independent", "address-dependent", "address-and-port-dependent", "unknown"

    @property
    def nat_type(self) -> str:
        if self.mapping == "none":
            return "open internet" if self.filtering == "endpoint-independent" else "firewalled, no NAT"
        if self.mapping == "unknown":
            return "NAT, mapping unknown (configure two STUN server IPs)"
        if self.mapping == "endpoint-dependent":
            return "symmetric NAT"
        return {
            "endpoint-independent": "full-cone NAT",
            "address-dependent": "restricted-cone NAT",
            "address-and-port-dependent": "port-restricted-cone NAT",
        }.get(self.filtering, "cone NAT (filtering unknown)")


def parse_server(text: str, default_port: int = 3478) -> tuple[str, int]:
    """'host[:port]' -> (host, port); raises ValueError with the text when it is not one."""
    host, _, port = text.rpartition(":") if ":" in text else (text, "", str(default_port))
    if not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"{text!r} is not a STUN server address of the form host[:port]")
    return host, int(port)


def binding_request(transaction_id: bytes, change_ip: bool = False, change_port: bool = False) -> bytes:
    """A Binding Request, with a CHANGE-REQUEST attribute (RFC 5780) when asked to answer from elsewhere."""
    attrs = b""
    if change_ip or change_port:
        attrs = struct.pack("!HHI", CHANGE_REQUEST, 4, (4 if change_ip else 0) | (2 if change_port else 0))
    return struct.pack("!HHI", BINDING_REQUEST, len(attrs), MAGIC_COOKIE) + transaction_id + attrs


def parse_binding_response(data: bytes, transaction_id: bytes) -> tuple[str, int]:
    """The (XOR-)MAPPED-ADDRESS of a Binding Success Response; raises StunError on anything else."""
    if len(data) < 20:
        raise StunError(f"STUN reply of {len(data)} bytes is shorter than a header")
    kind, length, cookie = struct.unpack_from("!HHI", data)
    if cookie != MAGIC_COOKIE or data[8:20] != transaction_id:
        raise StunError("STUN reply does not belong to our request")
    if kind != BINDING_SUCCESS:
        raise StunError(f"STUN server answered message type {kind:#06x}, not a binding success")
    if 20 + length > len(data):
        raise StunError("STUN reply is truncated")
    found: dict[int, tuple[str, int]] = {}
    pos = 20
    while pos + 4 <= 20 + length:
        attr, size = struct.unpack_from("!HH", data, pos)
        value = data[pos + 4 : pos + 4 + size]
        if attr in (MAPPED_ADDRESS, XOR_MAPPED_ADDRESS) and len(value) == 8 and value[1] == 1:
            port, raw = struct.unpack_from("!HI", value, 2)
            if attr == XOR_MAPPED_ADDRESS:
                port, raw = port ^ (MAGIC_COOKIE >> 16), raw ^ MAGIC_COOKIE
            found[attr] = (str(ipaddress.IPv4Address(raw)), port)
        pos += 4 + size + (-size % 4)
    mapped = found.get(XOR_MAPPED_ADDRESS) or found.get(MAPPED_ADDRESS)
    if mapped is None:
        raise StunError("STUN reply has no IPv4 mapped address")
    return mapped


class StunClient(asyncio.DatagramProtocol):
    """Binding requests from one unconnected UDP socket, so answers from any server address reach us."""

    transport: asyncio.DatagramTransport  # set by connection_made, before `open` returns

    def __init__(self) -> None:
        self.pending: dict[bytes, asyncio.Future[tuple[bytes, tuple]]] = {}

    @classmethod
    async def open(cls, local: tuple[str, int] = ("0.0.0.0", 0)) -> StunClient:
        loop = asyncio.get_running_loop()
        _, client = await loop.create_datagram_endpoint(cls, local_addr=local)
        return client

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.DatagramTransport, transport)  # create_datagram_endpoint passes one

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        future = self.pending.get(data[8:20]) if len(data) >= 20 else None
        if future is not None and not future.done():
            future.set_result((data, addr))

    @property
    def port(self) -> int:
        return self.transport.get_extra_info("sockname")[1]

    async def binding(
        self, server: tuple[str, int], *, change_ip: bool = False, change_port: bool = False, timeout: float = 2.0
    ) -> Binding:
        """One binding request, retransmitted with a doubling wait; raises StunError when unanswered."""
        loop = asyncio.get_running_loop()
        txid = os.urandom(12)
        future = self.pending[txid] = loop.create_future()
        request = binding_request(txid, change_ip, change_port)
        wait, deadline = 0.1, loop.time() + timeout
        try:
            while (left := deadline - loop.time()) > 0:
                self.transport.sendto(request, server)
                try:
                    data, sender = await asyncio.wait_for(asyncio.shield(future), min(wait, left))
                    local = (local_address_towards(server[0]), self.port)
                    return Binding(parse_binding_response(data, txid), local, sender[:2])
                except TimeoutError:
                    wait *= 2
            raise StunError(f"STUN server {server[0]}:{server[1]} did not answer within {timeout:.1f} s")
        finally:
            self.pending.pop(txid, None)

    def close(self) -> None:
        self.transport.close()


async def _answered(client: StunClient, server: tuple[str, int], timeout: float, **change: bool) -> bool:
    try:
        await client.binding(server, timeout=timeout, **change)
        return True
    except StunError:
        return False


async def classify(servers: list[tuple[str, int]], *, timeout: float = 1.0) -> NatBehavior:
    """Mapping: one socket to two server IPs (needs two servers); filtering: CHANGE-REQUEST (RFC 5780)."""
    if not servers:
        raise StunError("no STUN server configured: set [reach] stun_servers (SHARDMARKET_REACH_STUN_SERVERS)")
    client = await StunClient.open()
    try:
        first = await client.binding(servers[0], timeout=2 * timeout)
        checks: list[Awaitable[bool | Binding]] = [
            _answered(client, servers[0], timeout, change_ip=True, change_port=True),
            _answered(client, servers[0], timeout, change_port=True),
        ]
        if len(servers) > 1:
            checks.append(client.binding(servers[1], timeout=2 * timeout))
        from_anywhere, from_other_port, *second = await asyncio.gather(*checks, return_exceptions=True)
    finally:
        client.close()
    if first.mapped == first.local:
        mapping = "none"
    elif not second or not isinstance(second[0], Binding):
        mapping = "unknown"
    else:
        mapping = "endpoint-independent" if second[0].mapped == first.mapped else "endpoint-dependent"
    if from_anywhere is True:
        filtering = "endpoint-independent"
    elif from_other_port is True:
        filtering = "address-dependent"
    else:
        filtering = "address-and-port-dependent"
    return NatBehavior(first.mapped[0], mapping, filtering)
