"""Make a node reachable from outside: discover (STUN) -> map a port (PCP, NAT-PMP, UPnP) -> verify from
outside -> else a relay; keep the chosen path alive and remove it on close."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field

import aiohttp

from shardmarket.net import stun
from shardmarket.net.natpmp import NatPmpMapper
from shardmarket.net.pcp import PcpMapper, UnsupportedVersion
from shardmarket.net.portmap import Lease, Mapping, MappingError, PortMapper
from shardmarket.net.relay import RelayClient, RelayError, verify
from shardmarket.net.udp import default_gateway, local_address_towards
from shardmarket.net.upnp import UpnpMapper

log = logging.getLogger(__name__)
METHODS = ("pcp", "natpmp", "upnp")


@dataclass
class Attempt:
    """One way of becoming reachable that was tried: did it work, how long it took, what went wrong."""

    method: str
    ok: bool
    seconds: float
    detail: str = ""


@dataclass
class Report:
    """What `Reachability.establish` found; `endpoint` is what the node registers when `verified`."""

    local: str = ""
    nat_type: str = "unknown"
    public_ip: str | None = None
    nat: dict | None = None
    attempts: list[Attempt] = field(default_factory=list)
    method: str | None = None
    endpoint: str | None = None
    verified: bool = False
    seconds: float = 0.0  # from the start until the endpoint was verified (or given up)

    def to_dict(self) -> dict:
        return asdict(self)


class Reachability:
    """Finds and holds one public endpoint for the TCP service on `port` (the node daemon)."""

    def __init__(
        self,
        port: int,
        *,
        stun_servers: Sequence[str] = (),
        relays: Sequence[str] = (),
        methods: Sequence[str] = METHODS,
        lease_s: int = 3600,
        refresh_s: float = 30.0,
        node_id: str | None = None,
        timeout: float = 1.5,
        on_endpoint_change: Callable[[str], None] | None = None,
    ) -> None:
        unknown = set(methods) - set(METHODS)
        if unknown:
            names = ", ".join(sorted(unknown))
            raise ValueError(f"unknown port mapping method(s) {names}; known: {', '.join(METHODS)}")
        self.port, self.methods, self.lease_s, self.refresh_s = port, list(methods), lease_s, refresh_s
        self.stun_servers = [stun.parse_server(s) for s in stun_servers]
        self.relays, self.timeout = list(relays), timeout
        self.node_id = node_id or secrets.token_hex(8)
        self.lease: Lease | None = None
        self.relay: RelayClient | None = None
        self.report = Report()
        self.on_endpoint_change = on_endpoint_change

    def _moved(self, endpoint: str) -> None:
        """The router or relay handed out a new public address: the registered endpoint must follow."""
        self.report.endpoint = endpoint
        if self.on_endpoint_change:
            self.on_endpoint_change(endpoint)

    async def _local_health(self) -> str | None:
        try:
            async with (
                aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as session,
                session.get(f"http://127.0.0.1:{self.port}/health") as resp,
            ):
                return await resp.text() if resp.status == 200 else None
        except (aiohttp.ClientError, TimeoutError, OSError):
            return None

    def _tried(self, method: str, start: float, ok: bool, detail: str = "") -> None:
        self.report.attempts.append(Attempt(method, ok, round(time.monotonic() - start, 3), detail))

    async def _verify(self, endpoint: str, expected: str | None) -> tuple[bool, str]:
        if not self.relays:
            return False, "no relay configured to verify from outside ([reach] relays)"
        return await verify(self.relays[0], endpoint, expected, timeout=self.timeout + 3)

    async def _classify(self) -> None:
        start = time.monotonic()
        try:
            nat = await stun.classify(self.stun_servers, timeout=self.timeout / 2)
        except stun.StunError as exc:
            self._tried("stun", start, False, str(exc))
            return
        self.report.nat, self.report.nat_type, self.report.public_ip = asdict(nat), nat.nat_type, nat.public_ip
        self._tried("stun", start, True, f"{nat.nat_type}, public address {nat.public_ip}")

    async def _map(self, gateway: str) -> tuple[PortMapper, Mapping] | None:
        """PCP first (NAT-PMP when the router answers PCP with version 0), UPnP discovery in parallel."""
        upnp = UpnpMapper(timeout=self.timeout) if "upnp" in self.methods else None
        discovery = asyncio.create_task(upnp.prepare()) if upnp else None
        try:
            mappers: list[PortMapper] = [PcpMapper(gateway, self.timeout), NatPmpMapper(gateway, self.timeout)]
            for mapper in mappers:
                if mapper.method not in self.methods:
                    continue
                start = time.monotonic()
                try:
                    mapping = await mapper.map(self.port, self.port, self.lease_s)
                    self._tried(mapper.method, start, True, f"{mapping.endpoint} for {mapping.lifetime} s")
                    return mapper, mapping
                except UnsupportedVersion as exc:
                    self._tried(mapper.method, start, False, str(exc))
                except MappingError as exc:
                    self._tried(mapper.method, start, False, str(exc))
                    if mapper.method == "pcp":
                        break  # a router without PCP (refused or silent) has no NAT-PMP either
            if upnp and discovery:
                start = time.monotonic()
                try:
                    await discovery
                    mapping = await upnp.map(self.port, self.port, self.lease_s)
                    self._tried("upnp", start, True, f"{mapping.endpoint} for {mapping.lifetime} s")
                    return upnp, mapping
                except (MappingError, aiohttp.ClientError, TimeoutError) as exc:
                    self._tried("upnp", start, False, str(exc) or type(exc).__name__)
            return None
        finally:
            if discovery and not discovery.done():
                discovery.cancel()

    async def establish(self) -> Report:
        """Find a verified endpoint; tries STUN, mapping and the relay connection concurrently."""
        t0 = time.monotonic()
        report = self.report = Report()
        gateway = default_gateway()
        report.local = f"{local_address_towards(gateway or '10.255.255.255')}:{self.port}"
        expected = await self._local_health()
        if expected is None:
            log.warning("nothing answers http://127.0.0.1:%d/health: start the node first", self.port)
        relay_task = asyncio.create_task(self._open_relay()) if self.relays else None
        classify = asyncio.create_task(self._classify()) if self.stun_servers else None
        mapping_task = asyncio.create_task(self._map(gateway)) if gateway and self.methods else None
        try:
            mapped = await mapping_task if mapping_task else None
            mapping_task = None
            if mapped:
                mapper, mapping = mapped
                if await self._use(mapping.endpoint, mapping.method, expected, time.monotonic(), t0):
                    self.lease = Lease(
                        mapper, mapping, self.lease_s, self.refresh_s, on_change=lambda fresh: self._moved(fresh.endpoint)
                    )
                    return self.report
                await self._unmap(mapper, mapping)
            if classify:
                await classify
                classify = None
            direct = report.nat and report.nat["mapping"] == "none"  # a public address on this host
            if direct and await self._use(f"http://{report.public_ip}:{self.port}", "direct", expected, time.monotonic(), t0):
                return self.report
            if relay_task:
                start = time.monotonic()
                endpoint = await relay_task
                relay_task = None
                if endpoint and await self._use(endpoint, "relay", expected, start, t0):
                    return self.report
            report.seconds = round(time.monotonic() - t0, 3)
            return self.report
        finally:
            if classify:  # the NAT type is reported even when a mapping was verified first
                await classify
            for task in (mapping_task, relay_task):
                if task:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            if self.report.method != "relay" and self.relay:
                await self.relay.close()
                self.relay = None

    @staticmethod
    async def _unmap(mapper: PortMapper, mapping: Mapping) -> None:
        with contextlib.suppress(MappingError, OSError, TimeoutError):
            await mapper.unmap(mapping)

    async def _open_relay(self) -> str | None:
        start = time.monotonic()
        for url in self.relays:
            client = RelayClient(url, self.port, self.node_id, on_change=self._moved)
            try:
                endpoint = await client.start(timeout=self.timeout + 3)
                self.relay = client
                self._tried("relay-connect", start, True, f"{url} gives {endpoint}")
                return endpoint
            except RelayError as exc:
                await client.close()
                self._tried("relay-connect", start, False, str(exc))
        return None

    async def _use(self, endpoint: str, method: str, expected: str | None, start: float, t0: float) -> bool:
        """Verify `endpoint` from outside; on success it becomes the report's endpoint (seconds: since `t0`)."""
        ok, why = await self._verify(endpoint, expected)
        self._tried(f"verify-{method}", start, ok, endpoint if ok else why)
        if ok:
            self.report.method, self.report.endpoint, self.report.verified = method, endpoint, True
            self.report.seconds = round(time.monotonic() - t0, 3)
        return ok

    async def close(self) -> None:
        """Remove the port mapping and leave the relay."""
        if self.lease:
            await self.lease.close()
            self.lease = None
        if self.relay:
            await self.relay.close()
            self.relay = None
