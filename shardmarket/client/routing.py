"""Routing over known nodes: measure each node, then pick the chain of layer ranges covering [0, L) that
minimises expected latency x price (Dijkstra over layer boundaries, as in Petals' routing)."""

from __future__ import annotations

import asyncio
import heapq
import logging
import statistics
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
        return cls(
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

    def expected_step_s(self, payload_bytes: int) -> float:
        """Expected seconds for one decode step through this node: round trip, compute, transfer both ways."""
        return self.rtt_s + self.decode_ms / 1000 + 2 * payload_bytes / self.bytes_per_s

    def cost(self, payload_bytes: int) -> float:
        """Routing weight: expected latency x (1 + price per token)."""
        return self.expected_step_s(payload_bytes) * (1 + self.price)


async def measure_node(http: aiohttp.ClientSession, url: str, timeout: float = 5.0, relay: str = "") -> NodeInfo:
    """Fetch a node's /info, then time three /health round trips and one /probe download (through `relay`, host:port,
    when given: the node then sees the relay's address, not this client's)."""
    url = url.rstrip("/")
    client_timeout = aiohttp.ClientTimeout(total=timeout)
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
    node.rtt_s = statistics.median(rtts)
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
        results = await asyncio.gather(*(measure_node(http, url, timeout, relay) for url in urls), return_exceptions=True)
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
            if node.url in exclude or node.start != boundary or node.end > end:
                continue
            candidate = cost + node.cost(payload_bytes)
            if candidate < best.get(node.end, float("inf")):
                best[node.end] = candidate
                previous[node.end] = (boundary, node)
                heapq.heappush(queue, (candidate, node.end))
    if end not in previous and start != end:
        served = ", ".join(f"{n.url} [{n.start},{n.end})" for n in nodes if n.url not in exclude) or "none"
        raise RouteError(f"no live nodes cover layers [{start}, {end}); nodes available: {served}")
    route = []
    boundary = end
    while boundary != start:
        boundary, node = previous[boundary]
        route.append(node)
    return route[::-1]
