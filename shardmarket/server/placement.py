"""Which layers a new node should serve, as Petals' load balancing chooses: the span of the model the market serves
worst (least throughput per layer, summed over the listed nodes that answer), as long as this machine holds it."""

from __future__ import annotations

import asyncio
import math
import statistics
from dataclasses import dataclass

import aiohttp

from shardmarket.chain.contracts import Market
from shardmarket.chain.registry import listed_nodes

HEADROOM = 0.8  # of the free memory, for weights; the rest is left for KV caches, activations and the process itself
DTYPE_BYTES = {"float32": 4, "float16": 2, "bfloat16": 2}  # the dtypes a node loads layers in


@dataclass(frozen=True)
class Served:
    """One listed node's layers and its throughput (decode steps per second; 0 when it does not answer)."""

    start: int
    end: int
    throughput: float


async def _throughputs(urls: list[str], timeout: float) -> list[float | None]:
    """Each node's decode steps per second from its /info; None when unmeasured yet, 0 when it does not answer."""

    async def one(http: aiohttp.ClientSession, url: str) -> float | None:
        try:
            async with http.get(f"{url}/info", timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                decode_ms = float((await resp.json())["load"]["decode_ms"])
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError, KeyError, TypeError):
            return 0.0
        return 1000.0 / decode_ms if decode_ms > 0 else None

    async with aiohttp.ClientSession() as http:
        return list(await asyncio.gather(*(one(http, url) for url in urls)))


async def market_load(market: Market, model: str, timeout: float = 3.0) -> list[Served]:
    """The listed nodes of `model` with their throughput; a node not yet measured counts as the median measured one."""
    nodes = await asyncio.to_thread(listed_nodes, market, model)
    measured = await _throughputs([n["url"] for n in nodes], timeout)
    typical = statistics.median([t for t in measured if t]) if any(measured) else 1.0
    return [Served(n["start"], n["end"], typical if t is None else t) for n, t in zip(nodes, measured, strict=True)]


def per_layer(num_layers: int, served: list[Served]) -> list[float]:
    """Throughput of each layer: the sum over the nodes that serve it."""
    totals = [0.0] * num_layers
    for node in served:
        for layer in range(node.start, min(node.end, num_layers)):
            totals[layer] += node.throughput
    return totals


def weakest_span(throughputs: list[float], span: int) -> tuple[int, int]:
    """The `span` consecutive layers whose throughputs, sorted, are smallest (Petals' choose_best_blocks): the worst
    served layer first, ties broken by the next worst, then by the earliest start."""
    span = min(span, len(throughputs))
    start = min(range(len(throughputs) - span + 1), key=lambda i: (sorted(throughputs[i : i + span]), i))
    return start, start + span


def layer_bytes(manifest: dict, dtype: str) -> int:
    """Bytes of the largest layer of a model manifest once loaded as `dtype` (from its tensors' shapes)."""
    return max(sum(DTYPE_BYTES[dtype] * math.prod(t["shape"]) for t in shard["tensors"].values()) for shard in manifest["layers"])


def free_memory_bytes() -> int:
    """What accelerate's max_memory estimate gives the device the node computes on (the first GPU, else the CPU)."""
    from accelerate.utils import get_max_memory

    memory = get_max_memory()
    gpus = [device for device in memory if isinstance(device, int)]
    return int(memory[gpus[0]] if gpus else memory["cpu"])


def layers_that_fit(manifest: dict, dtype: str, budget_bytes: int) -> int:
    """How many layers of the model `budget_bytes` holds, with headroom for caches and the process."""
    return min(manifest["num_layers"], int(budget_bytes * HEADROOM) // max(1, layer_bytes(manifest, dtype)))
