"""NAT-PMP (RFC 6886): the router's external address and TCP port mappings."""

from __future__ import annotations

import asyncio
import socket
import struct

from shardmarket.net.portmap import Mapping, MappingError
from shardmarket.net.udp import exchange, local_address_towards

PORT = 5351
OP_EXTERNAL_ADDRESS = 0
OP_MAP_TCP = 2
RESULTS = {
    0: "success",
    1: "unsupported version",
    2: "not authorized/refused",
    3: "network failure",
    4: "out of resources",
    5: "unsupported opcode",
}


class NatPmpMapper:
    """NAT-PMP client of one gateway (the default router)."""

    method = "natpmp"

    def __init__(self, gateway: str, timeout: float = 1.0) -> None:
        self.gateway, self.timeout = gateway, timeout

    async def _ask(self, request: bytes, opcode: int, size: int) -> bytes:
        def ours(data: bytes, addr: tuple) -> bool:
            return len(data) >= 4 and data[0] == 0 and data[1] == 128 + opcode

        try:
            data, _, _ = await exchange((self.gateway, PORT), request, ours, timeout=self.timeout)
        except ConnectionRefusedError:
            raise MappingError(f"the router {self.gateway} does not serve NAT-PMP (port {PORT} refused)") from None
        except TimeoutError:
            raise MappingError(f"the router {self.gateway} did not answer NAT-PMP in {self.timeout:.1f} s") from None
        result = struct.unpack_from("!H", data, 2)[0]
        if result:
            raise MappingError(f"the router refused NAT-PMP opcode {opcode}: {RESULTS.get(result, result)}")
        if len(data) < size:
            raise MappingError(f"NAT-PMP response of {len(data)} bytes, expected {size}")
        return data

    async def external_address(self) -> str:
        data = await self._ask(struct.pack("!BB", 0, OP_EXTERNAL_ADDRESS), OP_EXTERNAL_ADDRESS, 12)
        return socket.inet_ntoa(data[8:12])

    async def _map(self, internal_port: int, external_port: int, lifetime: int) -> tuple[int, int]:
        request = struct.pack("!BBHHHI", 0, OP_MAP_TCP, 0, internal_port, external_port, lifetime)
        data = await self._ask(request, OP_MAP_TCP, 16)
        _, _, _, _, got_internal, mapped, granted = struct.unpack("!BBHIHHI", data[:16])
        if got_internal != internal_port:
            raise MappingError(f"NAT-PMP answered for internal port {got_internal}, not {internal_port}")
        return mapped, granted

    async def map(self, internal_port: int, external_port: int, lifetime: int) -> Mapping:
        ext_ip, (mapped, granted) = await asyncio.gather(
            self.external_address(), self._map(internal_port, external_port, lifetime)
        )
        return Mapping("natpmp", local_address_towards(self.gateway), internal_port, ext_ip, mapped, granted)

    async def renew(self, mapping: Mapping, lifetime: int) -> Mapping:
        return await self.map(mapping.internal_port, mapping.external_port, lifetime)

    async def unmap(self, mapping: Mapping) -> None:
        await self._map(mapping.internal_port, 0, 0)
