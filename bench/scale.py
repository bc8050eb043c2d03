"""Scale figures, in one run on a local anvil with real node processes:
- discovery of a model listed by 1,000 nodes, of which only the market's 12 real ones answer (the others are endpoints
  on this machine that accept a connection and never answer, or refuse it): seconds from a client's start (connecting
  to the chain) to a route over nodes that answered, cold (empty data dir) and warm (the same data dir, as after a
  restart), with the JSON-RPC calls each made (a counting provider), against reading the registry the way it was read
  before `nodesOf` (isListed and getNode per node); and how long registering the 988 other nodes took;
- a paid market of 12 real nodes (4 per span of a seeded random model) under 1, 8 and 32 concurrent streams from one
  client: aggregate tokens/s, p50/p99 inter-token latency, errors, and how evenly the steps spread over the nodes of
  each span (the busiest node's steps over the span's mean; goal <= 1.5).
The JSON figures are on the last line."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

import requests
from web3 import HTTPProvider

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shardmarket.chain.contracts import Market, lean_web3
from shardmarket.chain.keys import load_account
from shardmarket.chain.registry import listed_nodes
from shardmarket.cli.devmarket import PASSWORD, DevMarket
from shardmarket.cli.keys import home_keys
from shardmarket.client.directory import Discovery
from shardmarket.client.generation import Completion, RemoteModel
from shardmarket.client.market import connect_paid
from shardmarket.client.routing import plan_route
from shardmarket.config import load_config
from shardmarket.engine.models import random_checkpoint, tiny_config
from shardmarket.engine.sampling import SamplingParams

MODEL, PRICE, STAKE = "tiny", 1000, 100 * 10**18
SPANS = [(0, 2), (2, 4), (4, 5)]
PAYLOAD = tiny_config()["hidden_size"] * 4


class CountingProvider(HTTPProvider):
    """Notes every JSON-RPC method it sends."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.calls: list[str] = []

    def make_request(self, method, params):
        self.calls.append(method)
        return super().make_request(method, params)


def silent_server() -> int:
    """A port on this machine that accepts connections and never answers (a probe waits for its timeout)."""
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    port = [0]

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # until the prober gives up and hangs up
        writer.close()

    async def serve() -> None:
        server = await asyncio.start_server(hold, "127.0.0.1", 0, backlog=1024)
        port[0] = server.sockets[0].getsockname()[1]
        ready.set()
        await server.serve_forever()

    threading.Thread(target=loop.run_until_complete, args=(serve(),), daemon=True).start()
    ready.wait()
    return port[0]


def start_market(market: DevMarket, root: Path, per_span: int) -> Path:
    checkpoint = random_checkpoint(tiny_config(), root / "tiny-model")
    market.checkpoint = checkpoint  # type: ignore[attr-defined]
    market.start_chain()
    market.new_account("publisher")
    market.cli("publisher", "model", "publish", "--checkpoint", str(checkpoint), "--name", MODEL)
    names = [(f"n{s}{i}", f"{start}:{end}") for s, (start, end) in enumerate(SPANS) for i in range(per_span)]
    for name, layers in names:
        market.register_node(name, MODEL, layers, PRICE, STAKE)
    market.start_nodes([name for name, _ in names])
    return checkpoint


def register_crowd(market: DevMarket, count: int) -> float:
    """List `count` nodes that never answer: half on a port that accepts and stays silent, half on a closed port."""
    silent = silent_server()
    with socket.create_server(("127.0.0.1", 0)) as bound:  # bound once, then nothing listens there: connections are refused
        closed = bound.getsockname()[1]
    listings = []
    for i in range(count):
        start, end = SPANS[i % len(SPANS)]
        url = f"http://127.0.0.1:{silent}/n{i}" if i % 2 else f"http://127.0.0.{2 + i % 200}:{closed}/n{i}"
        listings.append((start, end, PRICE, url))
    started = time.monotonic()
    market.register_crowd(MODEL, listings, STAKE)
    return time.monotonic() - started


def client_market(market: DevMarket) -> tuple[Market, CountingProvider]:
    with market.acting_as("publisher"):
        config = load_config()
    provider = CountingProvider(config.chain.rpc_url)
    w3 = lean_web3(provider)
    assert w3.eth.chain_id == config.chain.chain_id  # what Market.connect reads first
    return Market(w3, dict(market.addresses)), provider


async def discovery_once(market: DevMarket, data_dir: Path) -> dict:
    started = time.monotonic()
    chain, provider = client_market(market)
    discovery = Discovery(chain, MODEL, data_dir)
    nodes = await discovery.find(SPANS[-1][1], PAYLOAD)
    plan_route(nodes, 0, SPANS[-1][1], PAYLOAD)
    route_s = time.monotonic() - started
    calls = len(provider.calls)
    await discovery.wait()
    return {
        "route_s": round(route_s, 3),
        "rpc_calls": calls,
        "probes": discovery.probes,
        "all_probes_s": round(time.monotonic() - started, 2),
        "answered": len(nodes),
        "index_bytes": discovery.index.path.stat().st_size,
        "measured_bytes": discovery.measured_path.stat().st_size,
    }


def registry_read(market: DevMarket) -> dict:
    """The whole registry read by nodesOf pages at one block, and the gas a full page's eth_call takes (an RPC
    provider caps it: geth's default --rpc.gascap is 50M)."""
    chain, provider = client_market(market)
    started = time.monotonic()
    nodes = listed_nodes(chain, MODEL)
    elapsed = time.monotonic() - started
    page = chain.registry.functions.nodesOf(chain.model_id(MODEL), 0, 100)
    return {
        "index_read_s": round(elapsed, 3),
        "index_read_calls": len(provider.calls) - 1,
        "index_nodes": len(nodes),
        "page_of_100_gas": page.estimate_gas(),
    }


def legacy_registry_read(market: DevMarket) -> dict:
    """The registry read as before nodesOf: the addresses by page, then isListed and getNode for each."""
    chain, provider = client_market(market)
    started = time.monotonic()
    model_id = chain.model_id(MODEL)
    count = chain.read(chain.registry.functions.modelNodeCount(model_id))
    for offset in range(0, count, 100):
        for operator in chain.read(chain.registry.functions.modelNodes(model_id, offset, 100)):
            if chain.read(chain.registry.functions.isListed(operator)):
                chain.read(chain.registry.functions.getNode(operator))
    return {"legacy_registry_read_s": round(time.monotonic() - started, 2), "legacy_rpc_calls": len(provider.calls)}


def registration_gas(market: DevMarket) -> int:
    """Gas of the last NodeRegistry.register (a crowd node's, one 40-byte endpoint)."""
    chain, _ = client_market(market)
    block = chain.w3.eth.get_block("latest", full_transactions=True)
    registry = chain.addresses["NodeRegistry"].lower()
    tx = next(t for t in reversed(block["transactions"]) if (t["to"] or "").lower() == registry)
    return chain.w3.eth.get_transaction_receipt(tx["hash"])["gasUsed"]


async def streams(model: RemoteModel, count: int, max_tokens: int) -> dict:
    gaps: list[float] = []
    errors: list[str] = []
    tokens = 0

    async def one(i: int) -> None:
        nonlocal tokens
        completion = Completion(prompt_tokens=8)
        last = None
        try:
            async for _ in model.stream(
                [1, 5 + i % 50, 9, 2, 7, 3 + i % 11, 4, 6], SamplingParams(max_tokens=max_tokens), completion
            ):
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                last = now
                tokens += 1
        except Exception as exc:  # counted: the figure is how many streams failed
            errors.append(f"{type(exc).__name__}: {exc}")

    started = time.perf_counter()
    await asyncio.gather(*(one(i) for i in range(count)))
    wall = time.perf_counter() - started
    gaps.sort()
    return {
        "tokens_per_s": round(tokens / wall, 1),
        "itl_p50_ms": round(1000 * statistics.median(gaps), 1) if gaps else None,
        "itl_p99_ms": round(1000 * gaps[min(len(gaps) - 1, int(0.99 * len(gaps)))], 1) if gaps else None,
        "errors": len(errors),
        "first_error": errors[0] if errors else None,
        "tokens": tokens,
        "wall_s": round(wall, 2),
    }


def steps_served(market: DevMarket) -> dict[str, int]:
    return {
        name: requests.get(f"{node.url}/info", timeout=10).json()["load"]["steps_served"] for name, node in market.nodes.items()
    }


def spread(before: dict[str, int], after: dict[str, int]) -> dict:
    """Per span: the busiest node's steps over the mean of the span's nodes."""
    out = {}
    for s, (start, end) in enumerate(SPANS):
        counts = [after[name] - before[name] for name in after if name.startswith(f"n{s}")]
        mean = statistics.mean(counts)
        out[f"{start}:{end}"] = {"steps": counts, "max_over_mean": round(max(counts) / mean, 2) if mean else None}
    return out


async def market_under_load(market: DevMarket, checkpoint: Path, levels: list[int], max_tokens: int) -> dict:
    market.new_account("client", tokens=10**21)
    market.cli("client", "client", "deposit", f"{10**20}raw")
    with market.acting_as("client"):
        account, config = load_account(PASSWORD, home_keys()), load_config()
    model = await connect_paid(checkpoint, config, account, MODEL)
    assert model.discovery is not None
    await model.discovery.wait()
    await asyncio.gather(*model.background)  # reserves for every node found
    results = {"nodes_found": len(model.nodes)}
    try:
        await streams(model, 2, 4)  # warm the connections and the nodes
        for count in levels:
            before = steps_served(market)
            figures = await streams(model, count, max_tokens)
            figures["spread"] = spread(before, steps_served(market))
            results[f"clients_{count}"] = figures
            print(json.dumps({f"clients_{count}": figures}), flush=True)
    finally:
        await model.aclose()
    one, most = results.get(f"clients_{levels[0]}"), results.get(f"clients_{levels[-1]}")
    if one and most:
        results[f"tokens_per_s_{levels[-1]}_vs_{levels[0]}"] = round(most["tokens_per_s"] / one["tokens_per_s"], 2)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nodes", type=int, default=1000, help="nodes listed for the model in all")
    parser.add_argument("--per-span", type=int, default=4, help="real nodes per span (3 spans)")
    parser.add_argument("--levels", default="1,8,32", help="concurrent streams, comma-separated")
    parser.add_argument("--tokens", type=int, default=32, help="tokens per stream")
    parser.add_argument("--only", choices=["discovery", "market"], help="run one part (default: both)")
    args = parser.parse_args()
    results: dict = {"cpus": os.cpu_count(), "real_nodes": 3 * args.per_span, "listed_nodes": args.nodes}
    with tempfile.TemporaryDirectory(prefix="bench-scale-") as tmp:
        root = Path(tmp)
        market = DevMarket(root / "market")
        try:
            started = time.monotonic()
            checkpoint = start_market(market, root, args.per_span)
            results["real_nodes_setup_s"] = round(time.monotonic() - started, 1)
            if args.only in (None, "discovery"):
                crowd = args.nodes - 3 * args.per_span
                results["crowd_registration_s"] = round(register_crowd(market, crowd), 1)
                results["register_gas"] = registration_gas(market)
                results["cold"] = asyncio.run(discovery_once(market, root / "client"))
                results["warm"] = asyncio.run(discovery_once(market, root / "client"))
                results.update(registry_read(market))
                results.update(legacy_registry_read(market))
                print(json.dumps(results), flush=True)
            if args.only in (None, "market"):
                levels = [int(level) for level in args.levels.split(",")]
                results["market"] = asyncio.run(market_under_load(market, checkpoint, levels, args.tokens))
        finally:
            market.stop()
    print(json.dumps(results))


if __name__ == "__main__":
    main()
