"""Discovery at scale on a real anvil: the registry read in pages and cached with its block, kept current from the
listing events (within `confirmations`, and read again whole after a reorg), and nodes probed concurrently so that
endpoints which never answer do not hold up the first route; a restarted client starts from what it measured."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest
from web3 import HTTPProvider

from shardmarket.chain.contracts import Market, lean_web3
from shardmarket.chain.keys import load_account
from shardmarket.cli.devmarket import PASSWORD
from shardmarket.cli.keys import home_keys
from shardmarket.client.directory import Discovery, RegistryIndex
from shardmarket.config import load_config
from shardmarket.engine.models import random_checkpoint, tiny_config

from .conftest import MODEL, PRICE, RANGES, serve_market

PAYLOAD = 64 * 4


@pytest.fixture(scope="module")
def crowd(tmp_path_factory):
    """The 3 real nodes of the market tests, and 40 more listed nodes that never answer: 10 accept a connection and
    say nothing (a probe waits for its timeout), 10 refuse it, 20 sit on TEST-NET addresses."""
    root = tmp_path_factory.mktemp("crowd")
    checkpoint = random_checkpoint(tiny_config(), root / "tiny-model")
    silent = [socket.create_server(("127.0.0.1", 0), backlog=64) for _ in range(10)]
    closed = [socket.create_server(("127.0.0.1", 0)) for _ in range(10)]
    closed_ports = [s.getsockname()[1] for s in closed]
    for s in closed:
        s.close()
    endpoints = [f"http://127.0.0.1:{s.getsockname()[1]}" for s in silent]
    endpoints += [f"http://127.0.0.1:{port}" for port in closed_ports]
    endpoints += [f"http://192.0.2.{i + 1}:7300" for i in range(20)]
    try:
        for market in serve_market(root, checkpoint, [(f"node{i}", layers, PRICE, []) for i, layers in enumerate(RANGES)]):
            market.register_crowd(MODEL, [(0, 2, PRICE, url) for url in endpoints], 100 * 10**18)
            yield market
    finally:
        for s in silent:
            s.close()


def chain_as(market, name: str) -> Market:
    with market.acting_as(name):
        return Market.connect(load_config().chain, load_account(PASSWORD, home_keys()))


class CountingProvider(HTTPProvider):
    """An HTTP provider that notes the JSON-RPC method of every call it sends."""

    calls: list[str]

    def make_request(self, method, params):
        self.calls.append(method)
        return super().make_request(method, params)


def counted(market: Market) -> list[str]:
    """Point `market` at a provider that counts its calls; returns the list of the methods it calls from now on."""
    provider = CountingProvider(market.w3.provider.endpoint_uri)
    provider.calls = []
    market.w3 = lean_web3(provider)
    return provider.calls


def test_a_route_is_found_without_waiting_for_silent_nodes_and_a_restart_starts_from_what_was_measured(crowd, tmp_path):
    market = chain_as(crowd, "node0")
    real = sorted(node.url for node in crowd.nodes.values())

    async def discover_once() -> tuple[list[str], bool, float, int]:
        discovery = Discovery(market, MODEL, tmp_path, timeout_s=5.0, connect_timeout_s=1.0)
        started = time.monotonic()
        nodes = await discovery.find(5, PAYLOAD)
        elapsed, pending = time.monotonic() - started, not discovery._task.done()
        found = sorted(node.url for node in nodes)
        await discovery.wait()
        return found, pending, elapsed, discovery.probes

    calls = counted(market)
    found, pending, elapsed, probes = asyncio.run(discover_once())
    assert found == real and probes == 43
    assert pending and elapsed < 5.0  # the silent nodes' probes were still waiting for their 5 s timeout
    assert len(calls) <= 6, calls  # not two calls per node: one page of nodesOf holds all 43
    assert "eth_call" in calls and calls.count("eth_call") <= 3

    del calls[:]
    found, _, _, probes = asyncio.run(discover_once())
    assert found == real
    assert probes == 3  # the 40 that did not answer are left alone for a while
    assert calls.count("eth_call") == 0 and len(calls) <= 3, calls  # nothing changed on chain: the cache stands


def test_the_index_follows_the_listing_events_within_confirmations_and_reads_everything_again_after_a_reorg(crowd, tmp_path):
    market = chain_as(crowd, "node0")
    w3 = market.w3
    node0 = crowd.accounts["node0"]
    index = RegistryIndex(market, MODEL, tmp_path / "index.json", confirmations=2)

    def listed() -> set[str]:
        return {entry["operator"] for entry in index.refresh()}

    for _ in range(2):  # the last registrations 2 blocks deep
        w3.provider.make_request("evm_mine", [])
    assert node0 in listed() and len(listed()) == 43
    market.transact(market.registry.functions.pause(), "pausing")
    assert node0 in listed()  # not yet 2 blocks deep
    for _ in range(2):
        w3.provider.make_request("evm_mine", [])
    calls = counted(market)
    assert node0 not in listed() and len(listed()) == 42
    assert calls.count("eth_getLogs") == 1 and calls.count("eth_call") <= 2, calls  # what changed, not the whole registry

    snapshot = w3.provider.make_request("evm_snapshot", [])["result"]
    market.transact(market.registry.functions.unpause(), "unpausing")
    for _ in range(2):
        w3.provider.make_request("evm_mine", [])
    assert node0 in listed()
    w3.provider.make_request("evm_revert", [snapshot])  # the chain forgets the unpause
    for _ in range(4):
        w3.provider.make_request("evm_mine", [])
    assert node0 not in listed()
    market.transact(market.registry.functions.unpause(), "unpausing")
