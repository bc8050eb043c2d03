"""PCP (RFC 6887) MAP requests: ask the router to forward a TCP port to us, renew it, delete it."""

from __future__ import annotations

import ipaddress
import os
import struct

from shardmarket.net.portmap import Mapping, MappingError
from shardmarket.net.udp import exchange, local_address_towards

PORT = 5351
VERSION = 2
OPCODE_MAP = 1
TCP = 6
RESULTS = {
    0: "SUCCESS",
    1: "UNSUPP_VERSION",
    2: "NOT_AUTHORIZED",
    3: "MALFORMED_REQUEST",
    4: "UNSUPP_OPCODE",
    5: "UNSUPP_OPTION",
    6: "MALFORMED_OPTION",
    7: "NETWORK_FAILURE",
    8: "NO_RESOURCES",
    9: "UNSUPP_PROTOCOL",
    10: "USER_EX_QUOTA",
    11: "CANNOT_PROVIDE_EXTERNAL",
    12: "ADDRESS_MISMATCH",
    13: "EXCESSIVE_REMOTE_PEERS",
}
HEADER = struct.Struct("!BBHI16s")  # version, opcode, reserved, lifetime, client IP
MAP_BODY = struct.Struct("!12sB3xHH16s")  # nonce, protocol, internal port, external port, external IP
RESPONSE_HEADER = struct.Struct("!BBxBII12x")  # version, R|opcode, result, lifetime, epoch


class UnsupportedVersion(MappingError):
    """The router speaks NAT-PMP only (it answered with version 0): fall back to NAT-PMP."""


def _v6(ip: str) -> bytes:
    return ipaddress.IPv6Address(f"::ffff:{ip}").packed


def map_request(client_ip: str, nonce: bytes, internal_port: int, external_port: int, lifetime: int) -> bytes:
    """A MAP request for TCP `internal_port`, suggesting `external_port` (0: any)."""
    return HEADER.pack(VERSION, OPCODE_MAP, 0, lifetime, _v6(client_ip)) + MAP_BODY.pack(
        nonce, TCP, internal_port, external_port, _v6("0.0.0.0")
    )


def parse_map_response(data: bytes, nonce: bytes) -> tuple[int, int, int, str]:
    """(lifetime, epoch, external port, external IP) of a successful MAP response; raises MappingError otherwise."""
    if len(data) >= 4 and data[0] == 0:
        raise UnsupportedVersion("the router answered PCP with a NAT-PMP (version 0) message")
    if len(data) < RESPONSE_HEADER.size + MAP_BODY.size:
        raise MappingError(f"PCP response of {len(data)} bytes is too short for a MAP response")
    version, opcode, result, lifetime, epoch = RESPONSE_HEADER.unpack_from(data)
    if version != VERSION or opcode != 0x80 | OPCODE_MAP:
        raise MappingError(f"PCP response has version {version}, opcode {opcode:#x}: not a MAP response")
    if result != 0:
        if result == 1:
            raise UnsupportedVersion("the router does not support PCP version 2")
        raise MappingError(f"the router refused the PCP mapping: {RESULTS.get(result, result)}")
    got_nonce, protocol, _, external_port, external_ip = MAP_BODY.unpack_from(data, RESPONSE_HEADER.size)
    if got_nonce != nonce or protocol != TCP:
        raise MappingError("PCP response is for another mapping (nonce or protocol differ)")
    mapped = ipaddress.IPv6Address(external_ip).ipv4_mapped
    if mapped is None:
        raise MappingError("PCP response carries no IPv4 external address")
    return lifetime, epoch, external_port, str(mapped)


class PcpMapper:
    """PCP client of one gateway (the default router)."""

    method = "pcp"

    def __init__(self, gateway: str, timeout: float = 1.0) -> None:
        self.gateway, self.timeout = gateway, timeout

    async def _send(self, nonce: bytes, internal_port: int, external_port: int, lifetime: int) -> Mapping:
        client_ip = local_address_towards(self.gateway)
        request = map_request(client_ip, nonce, internal_port, external_port, lifetime)

        def ours(data: bytes, addr: tuple) -> bool:
            return len(data) >= 2 and (data[1] == 0x80 | OPCODE_MAP or data[0] == 0)

        try:
            data, _, _ = await exchange((self.gateway, PORT), request, ours, timeout=self.timeout, local=(client_ip, 0))
        except ConnectionRefusedError:
            raise MappingError(f"the router {self.gateway} does not serve PCP (port {PORT} refused)") from None
        except TimeoutError:
            raise MappingError(f"the router {self.gateway} did not answer PCP within {self.timeout:.1f} s") from None
        granted, _, ext_port, ext_ip = parse_map_response(data, nonce)
        return Mapping("pcp", client_ip, internal_port, ext_ip, ext_port, granted, nonce)

    async def map(self, internal_port: int, external_port: int, lifetime: int) -> Mapping:
        return await self._send(os.urandom(12), internal_port, external_port, lifetime)

    async def renew(self, mapping: Mapping, lifetime: int) -> Mapping:
        return await self._send(mapping.nonce, mapping.internal_port, mapping.external_port, lifetime)

    async def unmap(self, mapping: Mapping) -> None:
        await self._send(mapping.nonce, mapping.internal_port, 0, 0)
