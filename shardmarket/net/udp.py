"""One UDP request/response exchange with retransmission, as STUN, PCP and NAT-PMP clients need."""

from __future__ import annotations

import asyncio
import socket
import struct
from collections.abc import Callable
from pathlib import Path


class _Exchange(asyncio.DatagramProtocol):
    def __init__(self, accept: Callable[[bytes, tuple], bool]) -> None:
        self.accept = accept
        self.reply: asyncio.Future[tuple[bytes, tuple]] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        if not self.reply.done() and self.accept(data, addr):
            self.reply.set_result((data, addr))

    def error_received(self, exc: Exception) -> None:  # ICMP port unreachable: nobody serves there
        if not self.reply.done():
            self.reply.set_exception(exc)


async def exchange(
    server: tuple[str, int],
    request: bytes,
    accept: Callable[[bytes, tuple], bool],
    *,
    timeout: float = 2.0,
    first_wait: float = 0.25,
    local: tuple[str, int] | None = None,
) -> tuple[bytes, tuple, tuple[str, int]]:
    """Send `request` to `server` until a datagram that `accept`s arrives; return (reply, sender, local address).

    Retransmits with a doubling wait (RFC 6886 / RFC 8489 style); raises TimeoutError or ConnectionRefusedError.
    """
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(lambda: _Exchange(accept), remote_addr=server, local_addr=local)
    try:
        wait, deadline = first_wait, loop.time() + timeout
        while True:
            transport.sendto(request)
            left = deadline - loop.time()
            if left <= 0:
                raise TimeoutError(f"no answer from {server[0]}:{server[1]} within {timeout:.1f} s")
            try:
                data, addr = await asyncio.wait_for(asyncio.shield(proto.reply), min(wait, left))
                return data, addr, transport.get_extra_info("sockname")[:2]
            except TimeoutError:
                wait *= 2
    finally:
        transport.close()


def local_address_towards(host: str) -> str:
    """The local IP address the kernel would use to reach `host` (no packet is sent)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect((host, 9))
        return s.getsockname()[0]


def default_gateway() -> str | None:
    """The IPv4 default gateway of this network namespace, from /proc/net/route; None when there is none."""
    try:
        lines = Path("/proc/net/route").read_text().splitlines()[1:]
    except OSError:
        return None
    for line in lines:
        fields = line.split()
        if len(fields) > 3 and fields[1] == "00000000" and int(fields[3], 16) & 2:
            return socket.inet_ntoa(struct.pack("<I", int(fields[2], 16)))
    return None
