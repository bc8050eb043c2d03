"""Routing over known nodes: measure each node, then pick the chain of layer ranges covering [0, L) that
minimises expected latency x price x load (Dijkstra over layer boundaries, as in Petals' routing). A node reports its
load in /info and with every answer; the client adds the sessions it holds on each node itself, so that concurrent
requests spread over the nodes of a span, and routes around a node that said it is full for a few seconds."""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections.abc import Set as AbstractSet
from dataclasses import dataclass

import aiohttp
from yarl import URL

from shardmarket.engine.formats import Numerics
from shardmarket.net import wire
from shardmarket.net.channel import SAME_PORT

log = logging.getLogger("shardmarket.client")
PROBE_BYTES = 256 * 2**10
REPORT_FRESH_S = 5.0  # a node's reported load counts this long; then only the sessions this client holds there do
FULL_FOR_S = 2.0  # a node that refused a session for want of room is left out of routes this long


class RouteError(RuntimeError):
    """No set of live nodes covers the layers asked for."""


@dataclass
class NodeInfo:
    """One node as the client sees it: what it serves, its keys, and how fast it answered."""

    url: str
    model_id: str
    num_layers: int
    hidden_size: int
    dtype: str
    start: int
    end: int
    price: int
    x25519_public_key: bytes
    operator: str
    tcp_port: int | None
    decode_ms: float
    rtt_s: float = 0.0
    bytes_per_s: float = 1e9
    weights: str = "float32"  # the format its layers compute with; `dtype` is that of its hidden states
    # its load as it last reported it (sessions open, those of other clients, sessions it can still open) and when
    sessions: int = 0
    others: int = 0
    free_slots: int | None = None
    reported_at: float = 0.0
    held: int = 0  # sessions this client holds on the node now
    full_until: float = 0.0  # monotonic time until which the node is taken as full

    def report(self, load: dict) -> None:
        """Take in the load a node reported (/info's "load", or an answer's); unknown or malformed fields are ignored."""
        with contextlib.suppress(TypeError, ValueError):
            self.sessions = int(load.get("sessions", self.sessions))
            self.others = max(self.sessions - self.held, 0)
            free = load.get("free_slots")
            self.free_slots = None if free is None else int(free)
            if load.get("decode_ms"):
                self.decode_ms = float(load["decode_ms"])
            self.reported_at = time.monotonic()

    def load(self) -> int:
        """Sessions competing for this node's steps, as far as the client knows: its own now, and those of other
        clients while the node's report of them is fresh (how long a step takes under that load is in `decode_ms`)."""
        if time.monotonic() - self.reported_at > REPORT_FRESH_S:
            return self.held
        return self.held + self.others

    def full(self) -> bool:
        """Whether the node refused a session for want of room lately, or reported no room left."""
        if time.monotonic() < self.full_until:
            return True
        return self.free_slots == 0 and time.monotonic() - self.reported_at < FULL_FOR_S

    @property
    def numerics(self) -> Numerics:
        """How this node computes its layers, as it announces: what a check re-runs its hop in."""
        return Numerics(self.weights, self.dtype)

    @classmethod
    def from_info(cls, url: str, info: dict) -> NodeInfo:
        """Parse a node's /info answer; raises ValueError on a node speaking another wire version."""
        if info.get("wire_version") != wire.WIRE_VERSION:
            raise ValueError(f"node {url} speaks wire version {info.get('wire_version')}, this client {wire.WIRE_VERSION}")
        model, (start, end) = info["model"], info["layers"]
        node = cls(
            url=url.rstrip("/"),
            model_id=model["id"],
            num_layers=int(model["num_layers"]),
            hidden_size=int(model["hidden_size"]),
            dtype=model["dtype"],
            start=int(start),
            end=int(end),
            price=int(info.get("price", 0)),
            x25519_public_key=bytes.fromhex(info["x25519_public_key"]),
            operator=info["operator"],
            tcp_port=URL(url).port if info.get("transports", {}).get("tcp") == SAME_PORT else None,
            decode_ms=float(info.get("load", {}).get("decode_ms", 0.0)),
            weights=model.get("weights", model["dtype"]),
        )
        node.report(info.get("load", {}))
        return node

    def expected_step_s(self, payload_bytes: int) -> float:
        """Expected seconds for one decode step through this node: round trip, compute, transfer both ways."""
        return self.rtt_s + self.decode_ms / 1000 + 2 * payload_bytes / self.bytes_per_s

    def cost(self, payload_bytes: int) -> float:
        """Routing weight: expected latency x (1 + price per token) x (1 + load)^2. The square makes load outweigh the
        noise in measured latencies (a few ms apart on a busy machine), so sessions spread evenly over equal nodes;
        a node several times faster than the others still takes more of them."""
        return self.expected_step_s(payload_bytes) * (1 + self.price) * (1 + self.load()) ** 2


async def measure_node(
    http: aiohttp.ClientSession, url: str, timeout: float = 5.0, connect_timeout: float | None = None, relay: str = ""
) -> NodeInfo:
    """Fetch a node's /info, then time three /health round trips and one /probe download (through `relay`, host:port,
    when given: the node then sees the relay's address, not this client's)."""
    url = url.rstrip("/")
    client_timeout = aiohttp.ClientTimeout(total=timeout, sock_connect=connect_timeout)
    proxy = f"http://{relay}" if relay else None
    async with http.get(f"{url}/info", timeout=client_timeout, proxy=proxy) as response:
        response.raise_for_status()
        node = NodeInfo.from_info(url, await response.json())
    rtts = []
    for _ in range(3):
        started = time.perf_counter()
        async with http.get(f"{url}/health", timeout=client_timeout, proxy=proxy) as response:
            await response.read()
        rtts.append(time.perf_counter() - started)
    node.rtt_s = min(rtts)  # the least the path takes; a busy moment on either side only adds to it
    started = time.perf_counter()
    params = {"bytes": str(PROBE_BYTES)}
    async with http.get(f"{url}/probe", params=params, timeout=client_timeout, proxy=proxy) as response:
        size = len(await response.read())
    node.bytes_per_s = size / max(time.perf_counter() - started - node.rtt_s, 1e-6)
    return node


async def discover(urls: list[str], model_id: str | None = None, timeout: float = 5.0, relay: str = "") -> list[NodeInfo]:
    """Measure every reachable node (of `model_id` if given; through `relay` when given); unreachable ones are logged and
    skipped."""
    async with aiohttp.ClientSession() as http:
        results = await asyncio.gather(*(measure_node(http, url, timeout, relay=relay) for url in urls), return_exceptions=True)
    nodes = []
    for url, result in zip(urls, results, strict=True):
        if isinstance(result, BaseException):
            log.warning("node %s is unreachable or answered badly (%s); skipping it", url, result)
        elif model_id is None or result.model_id == model_id:
            nodes.append(result)
        else:
            log.info("node %s serves %s, not %s; skipping it", url, result.model_id, model_id)
    return nodes


def trusted_nodes(nodes: list[NodeInfo], trusted: frozenset[str]) -> list[NodeInfo]:
    """The nodes run by one of the `trusted` operators (lowercase addresses)."""
    return [node for node in nodes if node.operator.lower() in trusted]


def plan_route(
    nodes: list[NodeInfo], start: int, end: int, payload_bytes: int, exclude: AbstractSet[str] = frozenset()
) -> list[NodeInfo]:
    """The cheapest chain of nodes whose ranges tile [start, end) exactly; raises RouteError if none does."""
    best = {start: 0.0}
    previous: dict[int, tuple[int, NodeInfo]] = {}
    queue = [(0.0, start)]
    while queue:
        cost, boundary = heapq.heappop(queue)
        if boundary == end:
            break
        if cost > best.get(boundary, float("inf")):
            continue
        for node in nodes:
            if node.url in exclude or node.start != boundary or node.end > end or node.full():
                continue
            candidate = cost + node.cost(payload_bytes)
            if candidate < best.get(node.end, float("inf")):
                best[node.end] = candidate
                previous[node.end] = (boundary, node)
                heapq.heappush(queue, (candidate, node.end))
    if end not in previous and start != end:
        served = ", ".join(f"{n.url} [{n.start},{n.end})" + " (full)" * n.full() for n in nodes if n.url not in exclude)
        served = served or "none"
        raise RouteError(f"no live nodes cover layers [{start}, {end}); nodes available: {served}")
    route = []
    boundary = end
    while boundary != start:
        boundary, node = previous[boundary]
        route.append(node)
    return route[::-1]
