"""Make a node reachable from outside and keep it so: discover (STUN) -> map a port (PCP, NAT-PMP, UPnP) -> verify
from outside -> else a relay; then `watch` renews, re-checks and follows every change until `close`.

Verifying asks a relay to connect back to the endpoint with a fresh challenge, which only the node's key can answer
(`proves`). Without a relay to ask, a port mapping the router granted is used unverified: the router's answer is the
best evidence there is."""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import logging
import secrets
import time
from collections.abc import AsyncIterator, Callable, Sequence
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
SHARED_SPACE = ipaddress.ip_network("100.64.0.0/10")  # carrier-grade NAT (RFC 6598): never reachable from the internet

# proves(challenge, /health answer) -> whether the answer carries this node's signature over the challenge
Proof = Callable[[str, dict], bool]


@dataclass
class Attempt:
    """One way of becoming reachable that was tried: did it work, how long it took, what went wrong."""

    method: str
    ok: bool
    seconds: float
    detail: str = ""


@dataclass
class Report:
    """What `Reachability.establish` found: `endpoint` is where the node can be reached, `verified` when a relay
    connected back to it and got this node's signature (else it rests on the router's word)."""

    local: str = ""
    nat_type: str = "unknown"
    public_ip: str | None = None
    nat: dict | None = None
    attempts: list[Attempt] = field(default_factory=list)
    method: str | None = None
    endpoint: str | None = None
    verified: bool = False
    seconds: float = 0.0  # from the start until the endpoint was found (or given up)

    def to_dict(self) -> dict:
        return asdict(self)


class Reachability:
    """Finds and holds one public endpoint for the node's port (HTTP and raw TCP sessions share it)."""

    def __init__(
        self,
        port: int,
        proves: Proof,
        *,
        stun_servers: Sequence[str] = (),
        relays: Sequence[str] = (),
        methods: Sequence[str] = METHODS,
        lease_s: int = 3600,
        refresh_s: float = 10.0,
        check_s: float = 5.0,
        node_id: str | None = None,
        timeout: float = 1.5,
    ) -> None:
        unknown = set(methods) - set(METHODS)
        if unknown:
            names = ", ".join(sorted(unknown))
            raise ValueError(f"unknown port mapping method(s) {names}; known: {', '.join(METHODS)}")
        self.port, self.proves, self.methods, self.lease_s, self.refresh_s = port, proves, list(methods), lease_s, refresh_s
        self.check_s = check_s
        self.stun_servers = [stun.parse_server(s) for s in stun_servers]
        self.relays, self.timeout = list(relays), timeout
        self.node_id = node_id or secrets.token_hex(8)
        self.lease: Lease | None = None
        self.relay: RelayClient | None = None
        self.report = Report()
        self.checked_at: float | None = None  # unix time a relay last checked the endpoint from outside
        self.news = asyncio.Event()  # set when the router or the relay changed something: `watch` looks at once

    def _tried(self, method: str, start: float, ok: bool, detail: str = "") -> None:
        self.report.attempts.append(Attempt(method, ok, round(time.monotonic() - start, 3), detail))

    async def _verify(self, endpoint: str) -> bool | None:
        """Whether `endpoint` answers from outside as this node; None when no relay can be asked."""
        for relay in self.relays:
            try:
                ok, why = await verify(relay, endpoint, self.proves, timeout=self.timeout + 3)
            except RelayError as exc:
                log.warning("cannot verify %s: %s", endpoint, exc)
                continue
            self.checked_at = time.time()
            if not ok:
                log.warning("%s", why)
            return ok
        return None

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

    def _behind_another_nat(self, mapping: Mapping) -> str | None:
        """Why the router's external address is not the public one (a NAT above the router), or None."""
        if ipaddress.ip_address(mapping.external_ip) in SHARED_SPACE:
            return f"the router's external address {mapping.external_ip} is behind a carrier-grade NAT"
        public = self.report.public_ip
        if public and public != mapping.external_ip:
            return f"the router's external address {mapping.external_ip} is not the public address {public} (a NAT above it)"
        return None

    async def _use_mapping(self, mapper: PortMapper, mapping: Mapping, classify: asyncio.Task | None, t0: float) -> bool:
        start = time.monotonic()
        method = mapping.method
        why = self._behind_another_nat(mapping)
        verified = None if why else await self._verify(mapping.endpoint)
        if verified is None and not why and classify:  # no relay to ask: at least STUN must see the same address
            await classify
            why = self._behind_another_nat(mapping)
        if why or verified is False:
            self._tried(f"verify-{method}", start, False, why or f"{mapping.endpoint} does not answer from outside")
            await self._unmap(mapper, mapping)
            return False
        detail = mapping.endpoint if verified else f"{mapping.endpoint} unverified: no relay answered to check it from outside"
        self._tried(f"verify-{method}", start, bool(verified), detail)
        self._found(mapping.endpoint, method, bool(verified), t0)
        self.lease = Lease(mapper, mapping, self.lease_s, self.refresh_s, on_change=lambda _: self.news.set())
        return True

    def _found(self, endpoint: str, method: str, verified: bool, t0: float) -> None:
        self.report.method, self.report.endpoint, self.report.verified = method, endpoint, verified
        self.report.seconds = round(time.monotonic() - t0, 3)

    async def establish(self) -> Report:
        """Find an endpoint; tries STUN, mapping and the relay connection concurrently."""
        t0 = time.monotonic()
        report = self.report = Report()
        gateway = default_gateway()
        report.local = f"{local_address_towards(gateway or '10.255.255.255')}:{self.port}"
        relay_task = asyncio.create_task(self._open_relay()) if self.relays else None
        classify = asyncio.create_task(self._classify()) if self.stun_servers else None
        mapping_task = asyncio.create_task(self._map(gateway)) if gateway and self.methods else None
        try:
            mapped = await mapping_task if mapping_task else None
            mapping_task = None
            if mapped and await self._use_mapping(*mapped, classify, t0):
                return report
            if classify:
                await classify
                classify = None
            if report.nat and report.nat["mapping"] == "none":  # a public address on this host
                endpoint, start = f"http://{report.public_ip}:{self.port}", time.monotonic()
                verified = await self._verify(endpoint)
                self._tried("verify-direct", start, verified is not False, endpoint)
                if verified is not False:
                    self._found(endpoint, "direct", bool(verified), t0)
                    return report
            if relay_task:
                start = time.monotonic()
                relayed = await relay_task
                relay_task = None
                if relayed:
                    verified = await self._verify(relayed)
                    self._tried("verify-relay", start, verified is not False, relayed)
                    if verified is not False:
                        self._found(relayed, "relay", bool(verified), t0)
                        return report
            report.seconds = round(time.monotonic() - t0, 3)
            return report
        finally:
            if classify:  # the NAT type is reported even when a mapping was found first
                await classify
            for task in (mapping_task, relay_task):
                if task:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError):
                        await task
            if report.method != "relay" and self.relay:
                await self.relay.close()
                self.relay = None

    @staticmethod
    async def _unmap(mapper: PortMapper, mapping: Mapping) -> None:
        with contextlib.suppress(MappingError, OSError, TimeoutError):
            await mapper.unmap(mapping)

    async def _open_relay(self) -> str | None:
        start = time.monotonic()
        for url in self.relays:
            client = RelayClient(url, self.port, self.node_id, on_change=lambda _: self.news.set())
            try:
                endpoint = await client.start(timeout=self.timeout + 3)
                self.relay = client
                self._tried("relay-connect", start, True, f"{url} gives {endpoint}")
                return endpoint
            except RelayError as exc:
                await client.close()
                self._tried("relay-connect", start, False, str(exc))
        return None

    def _held(self) -> str | None:
        """The endpoint the mapping or relay connection gives now; None when the relay connection is down."""
        if self.lease:
            return self.lease.mapping.endpoint
        if self.relay:
            return self.relay.endpoint if self.relay.connected else None
        return self.report.endpoint  # direct

    async def _answers(self, endpoint: str) -> bool:
        verified = await self._verify(endpoint)
        return verified if verified is not None else (self.lease is None or self.lease.ok)

    async def _reachable(self) -> str | None:
        """The endpoint if it answers from outside now; a mapping that does not is renewed at once, then given up
        for a new `establish` (mapping or relay), as is a lost path."""
        endpoint = self._held()
        if endpoint and await self._answers(endpoint):
            return endpoint
        if self.lease and await self.lease.renew() and await self._answers(self.lease.mapping.endpoint):
            return self.lease.mapping.endpoint
        if self.relay and not self.relay.connected:
            return None  # the relay client is reconnecting by itself
        await self.close()
        report = await self.establish()
        return report.endpoint

    async def watch(self) -> AsyncIterator[str | None]:
        """After `establish`: yields the endpoint whenever it changes, and None when the node has become unreachable
        (then the new endpoint once it is reachable again). Checks from outside every `check_s`, at once when the
        router or the relay changed something, and every second while unreachable."""
        current = self.report.endpoint
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self.news.wait(), self.check_s if current else 1.0)
            self.news.clear()
            endpoint = await self._reachable()
            if endpoint != current:
                current = endpoint
                yield endpoint

    async def close(self) -> None:
        """Remove the port mapping and leave the relay."""
        if self.lease:
            await self.lease.close()
            self.lease = None
        if self.relay:
            await self.relay.close()
            self.relay = None
