"""What every port mapping protocol (PCP, NAT-PMP, UPnP IGD) hands back, and the lease that keeps one alive."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Protocol

log = logging.getLogger(__name__)


class MappingError(Exception):
    """The router refused or did not answer a mapping request; the message says which router and why."""


@dataclass(frozen=True)
class Mapping:
    """A TCP port forwarded by the router: external_ip:external_port -> internal_ip:internal_port."""

    method: str  # "pcp", "natpmp", "upnp"
    internal_ip: str
    internal_port: int
    external_ip: str
    external_port: int
    lifetime: int  # seconds the router granted; 0: until removed
    nonce: bytes = b""  # PCP: identifies the mapping on renewal and removal

    @property
    def endpoint(self) -> str:
        return f"http://{self.external_ip}:{self.external_port}"


class PortMapper(Protocol):
    method: str

    async def map(self, internal_port: int, external_port: int, lifetime: int) -> Mapping: ...

    async def renew(self, mapping: Mapping, lifetime: int) -> Mapping: ...

    async def unmap(self, mapping: Mapping) -> None: ...


class Lease:
    """Renews a mapping every `refresh_s` (at most half its lifetime), which also re-creates it after the router lost
    it; calls `on_change` when the router hands out a different external address; removes it on close."""

    def __init__(
        self,
        mapper: PortMapper,
        mapping: Mapping,
        lifetime: int,
        refresh_s: float = 10.0,
        on_change: Callable[[Mapping], None] | None = None,
    ) -> None:
        self.mapper, self.mapping, self.lifetime = mapper, mapping, lifetime
        self.refresh_s, self.on_change = refresh_s, on_change
        self.renewals = 0
        self.ok = True  # the last renewal worked
        self.lock = asyncio.Lock()
        self.task = asyncio.create_task(self._run())

    def _interval(self) -> float:
        granted = self.mapping.lifetime or self.lifetime
        return max(0.2, min(self.refresh_s, granted / 2))

    async def renew(self) -> bool:
        """Renew (or re-create) the mapping now; False when the router did not answer or refused."""
        async with self.lock:
            try:
                fresh = await self.mapper.renew(self.mapping, self.lifetime)
            except (MappingError, OSError, TimeoutError) as exc:
                log.warning("renewing the %s port mapping failed (%s); retrying", self.mapping.method, exc)
                self.ok = False
                return False
            self.renewals, self.ok = self.renewals + 1, True
            moved = (fresh.external_ip, fresh.external_port) != (self.mapping.external_ip, self.mapping.external_port)
            self.mapping = replace(fresh, nonce=fresh.nonce or self.mapping.nonce)
        if moved:
            log.warning("the router now maps us to %s: the registered endpoint must change", fresh.endpoint)
            if self.on_change:
                self.on_change(self.mapping)
        return True

    async def _run(self) -> None:
        failures = 0
        while True:
            await asyncio.sleep(self._interval() if not failures else min(30.0, 0.5 * 2**failures))
            failures = 0 if await self.renew() else failures + 1

    async def close(self) -> None:
        """Stop renewing and remove the mapping from the router (best effort: a gone router forgets it anyway)."""
        self.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.task
        try:
            await self.mapper.unmap(self.mapping)
        except (MappingError, OSError, TimeoutError) as exc:
            log.warning("could not remove the %s port mapping (%s); it expires by itself", self.mapping.method, exc)
