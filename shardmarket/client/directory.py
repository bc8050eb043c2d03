"""Where a client finds a model's nodes fast, at any market size: the registry's listings cached on disk and kept current
from the chain's events, and nodes probed concurrently, best known first, until some route covers every layer. What
was measured is kept on disk too, so a restarted client probes the nodes it knows answer first and skips, for a while,
those that did not."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import random
import time
from pathlib import Path

import aiohttp

from shardmarket.chain.contracts import Market
from shardmarket.chain.registry import listed_nodes, listing_changes, listings_of
from shardmarket.client.routing import NodeInfo, RouteError, measure_node, plan_route

log = logging.getLogger("shardmarket.client")
MEASURED_FOR_S = 3600.0  # a node's measured round trip and throughput are reused this long; /info is read every time
SKIP_FAILED_S = 600.0  # a node that did not answer is not probed again for this long (unless no route is found)


class RegistryIndex:
    """A model's listed nodes as of block `head - confirmations`, cached in `path` with that block's hash. A refresh
    reads only what changed since: the listing events of the blocks in between, then the nodes they name; when the cached
    block is no longer on the chain (a reorg deeper than `confirmations`, or a chain reset) the whole registry is read."""

    def __init__(self, market: Market, model_name: str, path: Path, confirmations: int = 0) -> None:
        self.market, self.model_name, self.path, self.confirmations = market, model_name, path, confirmations

    def refresh(self) -> list[dict]:
        """The listed nodes of the model, read from the chain as far as the cache does not already have them."""
        w3 = self.market.w3
        target = max(w3.eth.block_number - self.confirmations, 0)
        cached = self._load()
        if cached is not None and cached["block"] <= target and self._on_chain(cached["block"], cached["hash"]):
            nodes = {entry["operator"]: entry for entry in cached["nodes"]}
            if cached["block"] == target:
                return list(nodes.values())
            block = w3.eth.get_block(target)
            changed = listing_changes(self.market, cached["block"] + 1, target)
            for operator, entry in listings_of(self.market, self.model_name, changed, target).items():
                if entry is None:
                    nodes.pop(operator, None)
                else:
                    nodes[operator] = entry
            entries = list(nodes.values())
        else:
            block = w3.eth.get_block(target)
            entries = listed_nodes(self.market, self.model_name, target)
        self._save(target, block["hash"].to_0x_hex(), entries)
        return entries

    def _on_chain(self, number: int, block_hash: str) -> bool:
        return self.market.w3.eth.get_block(number)["hash"].to_0x_hex() == block_hash

    def _load(self) -> dict | None:
        try:
            cached = json.loads(self.path.read_text())
        except (FileNotFoundError, ValueError):
            return None
        if cached.get("registry") != self.market.addresses["NodeRegistry"] or cached.get("model") != self.model_name:
            return None
        for entry in cached["nodes"]:
            entry["key"] = bytes.fromhex(entry["key"])
        return cached

    def _save(self, block: int, block_hash: str, entries: list[dict]) -> None:
        nodes = [{**entry, "key": entry["key"].hex()} for entry in entries]
        record = {"registry": self.market.addresses["NodeRegistry"], "model": self.model_name, "block": block}
        _write_json(self.path, {**record, "hash": block_hash, "nodes": nodes})


class Discovery:
    """Finds a route's worth of a model's nodes: listings from a RegistryIndex, then /info probes, `concurrency` at a
    time with short timeouts; `find` returns once the nodes that answered cover every layer, while the other probes go
    on in the background and add the nodes they find to the same list."""

    def __init__(
        self,
        market: Market,
        model_name: str,
        data_dir: Path,
        *,
        confirmations: int = 0,
        concurrency: int = 256,
        timeout_s: float = 2.0,
        connect_timeout_s: float = 1.0,
        relay: str = "",
    ) -> None:
        self.model_name = model_name
        self.relay = relay  # host:port of a relay every probe goes through, so that no node sees this client's address
        model_file = model_name.replace("/", "_")
        self.index = RegistryIndex(market, model_name, data_dir / f"registry-{model_file}.json", confirmations)
        self.measured_path = data_dir / f"measured-{model_file}.json"
        self.concurrency, self.timeout_s, self.connect_timeout_s = concurrency, timeout_s, connect_timeout_s
        self.nodes: list[NodeInfo] = []
        self.probes = 0  # /info probes started
        self._measured: dict[str, dict] = {}
        self._task: asyncio.Task | None = None

    async def find(self, num_layers: int, payload_bytes: int, retry_failed: bool = False) -> list[NodeInfo]:
        """The nodes that answered so far, once they cover layers [0, num_layers) or every probe is done; the list keeps
        growing while the remaining probes answer. `retry_failed` probes even the nodes that lately did not answer."""
        await self.aclose()
        registered = await asyncio.to_thread(self.index.refresh)
        self._measured = _read_json(self.measured_path)
        nodes: list[NodeInfo] = []
        self.nodes = nodes
        ready = asyncio.Event()
        now = time.time()

        def rank(entry: dict) -> tuple[int, float]:
            seen = self._measured.get(entry["url"], {})
            if seen.get("failed_at", 0) > seen.get("ok_at", 0):
                return 2, seen["failed_at"]
            return (0, seen.get("cost", 0.0)) if "ok_at" in seen else (1, random.random())  # unknown: in no set order

        queue = sorted(registered, key=rank)
        if not retry_failed:
            queue = [e for e in queue if rank(e)[0] < 2 or now - self._measured[e["url"]]["failed_at"] > SKIP_FAILED_S]
        self._task = asyncio.create_task(self._probe_all(queue, nodes, num_layers, payload_bytes, ready))
        waiter = asyncio.create_task(ready.wait())
        await asyncio.wait([self._task, waiter], return_when=asyncio.FIRST_COMPLETED)
        waiter.cancel()
        if self._task.done():
            self._task.result()
            if not retry_failed and len(queue) < len(registered):
                with contextlib.suppress(RouteError):
                    plan_route(nodes, 0, num_layers, payload_bytes)
                    return nodes
                return await self.find(num_layers, payload_bytes, retry_failed=True)
        return nodes

    async def _probe_all(
        self, queue: list[dict], nodes: list[NodeInfo], num_layers: int, payload_bytes: int, ready: asyncio.Event
    ) -> None:
        slots = asyncio.Semaphore(self.concurrency)
        connector = aiohttp.TCPConnector(limit=self.concurrency)
        async with aiohttp.ClientSession(connector=connector) as http:

            async def probe(entry: dict) -> None:
                async with slots:
                    node = await self._probe(http, entry)
                if node is None:
                    return
                nodes.append(node)
                if not ready.is_set():
                    with contextlib.suppress(RouteError):
                        plan_route(nodes, 0, num_layers, payload_bytes)
                        ready.set()
                        self._save_measured()

            try:
                await asyncio.gather(*(probe(entry) for entry in queue))
            finally:
                self._save_measured()

    async def _probe(self, http: aiohttp.ClientSession, entry: dict) -> NodeInfo | None:
        """The node at `entry`'s endpoint as it answers, or None when it does not or disagrees with its listing."""
        url, seen = entry["url"], self._measured.get(entry["url"], {})
        fresh = time.time() - seen.get("measured_at", 0) < MEASURED_FOR_S and seen.get("key") == entry["key"].hex()
        self.probes += 1
        try:
            if fresh:  # its round trip and throughput are known: /info alone says it is there, who it is and its load
                timeout = aiohttp.ClientTimeout(total=self.timeout_s, sock_connect=self.connect_timeout_s)
                proxy = f"http://{self.relay}" if self.relay else None
                async with http.get(f"{url}/info", timeout=timeout, proxy=proxy) as response:
                    response.raise_for_status()
                    node = NodeInfo.from_info(url, await response.json())
                node.rtt_s, node.bytes_per_s = seen["rtt_s"], seen["bytes_per_s"]
            else:
                node = await measure_node(http, url, self.timeout_s, self.connect_timeout_s, self.relay)
        except (aiohttp.ClientError, TimeoutError, OSError, ValueError, KeyError) as exc:
            log.info("node %s is unreachable or answered badly (%s); skipping it", url, exc or type(exc).__name__)
            self._measured[url] = {**seen, "failed_at": time.time()}
            return None
        if node.model_id != self.model_name:
            log.info("node %s serves %s, not %s; skipping it", url, node.model_id, self.model_name)
            return None
        if node.x25519_public_key != entry["key"] or node.operator.lower() != entry["operator"].lower():
            log.warning("node %s presents another key or operator than it registered on chain; skipping it", url)
            return None
        if (node.start, node.end) != (entry["start"], entry["end"]):
            log.warning(
                "node %s serves layers %d:%d, not the registered %d:%d; skipping it",
                url,
                node.start,
                node.end,
                entry["start"],
                entry["end"],
            )
            return None
        node.price = entry["price"]
        now = time.time()
        measured_at = seen["measured_at"] if fresh else now
        self._measured[url] = {
            "key": entry["key"].hex(),
            "rtt_s": node.rtt_s,
            "bytes_per_s": node.bytes_per_s,
            "cost": node.cost(node.hidden_size * 4),
            "measured_at": measured_at,
            "ok_at": now,
        }
        return node

    def _save_measured(self) -> None:
        _write_json(self.measured_path, self._measured)

    async def wait(self) -> None:
        """Until every probe of the last `find` is done."""
        if self._task is not None:
            await asyncio.shield(self._task)

    async def aclose(self) -> None:
        """Stop the probes still running."""
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (FileNotFoundError, ValueError):
        return {}


def _write_json(path: Path, value: dict) -> None:
    """Replace `path` whole (a crash leaves the old file or the new one, never half of one)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.name}.{os.getpid()}")
    temporary.write_text(json.dumps(value))
    os.replace(temporary, path)
