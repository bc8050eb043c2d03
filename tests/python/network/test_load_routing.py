"""Load-aware routing against real node processes: a client's concurrent sessions spread over the nodes of a span,
every answer reports the node's load, and a full node declines a session with `capacity` without being counted as
failed (other requests keep routing to it)."""

from __future__ import annotations

import asyncio

import pytest
import torch

from shardmarket.chain.eip712 import Domain
from shardmarket.client.failures import RecentFailures
from shardmarket.client.routing import discover
from shardmarket.client.session import InferenceSession

from network_processes import get_json, running, start_node

DOMAIN = Domain(31337, "0x" + "00" * 20)
HIDDEN = 64


@pytest.fixture(scope="module")
def nodes(tiny, tmp_path_factory):
    """Three nodes serving every layer; the third holds at most one session."""
    home = tmp_path_factory.mktemp("load")
    nodes = [start_node(tiny, "0:5", home / name) for name in "ab"]
    nodes.append(start_node(tiny, "0:5", home / "c", settings={"max_sessions": 1}))
    with running(*nodes):
        yield nodes


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def _measured(nodes):
    """The nodes as the client measures them, with the same latency and throughput: what sets them apart is load."""
    infos = await discover([n.url for n in nodes])
    for info in infos:
        info.rtt_s, info.bytes_per_s, info.decode_ms = 0.001, 1e9, 1.0
    return sorted(infos, key=lambda info: [n.url for n in nodes].index(info.url))


def test_concurrent_sessions_spread_over_the_nodes_of_a_span_and_answers_report_load(nodes):
    twins = nodes[:2]

    async def go():
        infos = await _measured(twins)
        sessions = [InferenceSession(infos, 5, DOMAIN, max_length=16) for _ in range(6)]
        for session in sessions:
            await session.open()
        held = [get_json(f"{n.url}/info")["load"]["sessions"] for n in twins]
        await sessions[0].run_layers(torch.randn(1, 2, HIDDEN), torch.arange(2)[None])
        node = sessions[0].hops[0].node
        reported = (node.sessions, node.free_slots)
        for session in sessions:
            await session.close()
        return held, reported, [info.held for info in infos]

    held, reported, after = run(go())
    assert held == [3, 3]  # not all six on whichever node measured fastest
    assert reported == (3, 61)  # the answer told the client how busy the node is (of the 64 sessions it takes)
    assert after == [0, 0]


@pytest.mark.parametrize("pipelined", [False, True], ids=["open-awaited", "open-pipelined"])
def test_a_full_node_declines_a_session_without_being_marked_failed(nodes, pipelined):
    """Also when the first step followed the OPEN at once: the node refuses that step too, and the client routes the
    step around it."""
    a, b = nodes[0], nodes[2]

    async def go():
        infos = await _measured([a, b])
        failed = RecentFailures()
        holder = InferenceSession([infos[1]], 5, DOMAIN, max_length=16, failed=failed)
        await holder.open()  # b's only session
        full_info = get_json(f"{b.url}/info")["load"]
        infos[1].held = 0  # as if another client held it: this client routes to b, the cheaper node by its own count
        infos[0].held = 3
        session = InferenceSession(infos, 5, DOMAIN, max_length=16, failed=failed)
        if not pipelined:
            await session.open()
        output = await session.run_layers(torch.randn(1, 2, HIDDEN), torch.arange(2)[None])
        route = [hop.node.url for hop in session.hops]
        refusal = session.refusals.get(b.url)
        await session.close()
        await holder.close()
        return full_info, route, refusal, failed.current(), output.shape, infos[1].full()

    full_info, route, refusal, failed, shape, left_out = run(go())
    assert full_info["free_slots"] == 0
    assert route == [a.url]
    assert refusal is not None and refusal.code == "capacity"
    assert failed == set()  # a full node is not a failed one: the next request may use it at once it has room
    assert left_out  # but routes leave it out for a moment
    assert shape == (1, 2, HIDDEN)
