"""The client against real node processes: it closes the sessions of a route it could not open."""

from __future__ import annotations

import asyncio

import pytest

from shardmarket.chain.eip712 import Domain
from shardmarket.client.routing import RouteError, discover
from shardmarket.client.session import InferenceSession
from shardmarket.net.channel import ChannelPool

from network_processes import free_port, get_json, start_node, stop_all, wait_ready

DOMAIN = Domain(31337, "0x" + "00" * 20)  # what nodes use when no DisputeManager is deployed


@pytest.fixture(scope="module")
def nodes(tiny, tmp_path_factory):
    home = tmp_path_factory.mktemp("courtesy")
    nodes = [start_node(tiny, "0:2", home / "a"), start_node(tiny, "2:5", home / "b")]
    try:
        wait_ready(*nodes)
        yield nodes
    finally:
        stop_all(nodes)


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


def load(node) -> dict:
    return get_json(f"{node.url}/info")["load"]


async def wait_until(condition, timeout: float = 15.0) -> None:
    """Poll `condition` (run off the event loop) until it holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await asyncio.to_thread(condition):
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.1)


def test_a_route_that_cannot_be_opened_closes_the_sessions_it_opened_on_the_healthy_hops(nodes):
    a, b = nodes

    async def go() -> int:
        route = await discover([a.url, b.url])
        route[1].tcp_port = free_port()  # b is unreachable now: nothing listens there
        pool = ChannelPool()
        session = InferenceSession(route, 5, DOMAIN, max_length=16, pool=pool, step_timeout_s=5)
        with pytest.raises(RouteError):
            await session.open()
        kept = len(pool)
        await pool.close()
        return kept

    before = load(a)["sessions"]
    kept = run(go())
    assert load(a)["sessions"] == before  # closed at once, not left to its 300 s idle timeout
    assert kept == 1  # with CLOSE, answered: the connection to a is kept for the next request
