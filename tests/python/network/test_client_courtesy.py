"""The client against real node processes and a real `client serve`: it closes the sessions of a route it could not
open, never counts against a node a refusal that blames the request, and stops generating for a caller who hung up."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys

import pytest
import torch

from shardmarket.chain.eip712 import Domain
from shardmarket.client.generation import Completion, RemoteModel
from shardmarket.client.routing import RouteError, discover
from shardmarket.client.session import InferenceSession, RequestRefused
from shardmarket.engine.sampling import SamplingParams
from shardmarket.net.channel import ChannelPool

from network_processes import ROOT, child_env, free_port, get_json, running, start_node, wait_http

DOMAIN = Domain(31337, "0x" + "00" * 20)  # what nodes use when no DisputeManager is deployed
HIDDEN, CONTEXT = 64, 512  # tiny_config's hidden size and max_position_embeddings
API_KEY = "courtesy-key"


@pytest.fixture(scope="module")
def nodes(tiny, tmp_path_factory):
    home = tmp_path_factory.mktemp("courtesy")
    nodes = [start_node(tiny, "0:2", home / "a"), start_node(tiny, "2:5", home / "b")]
    with running(*nodes):
        yield nodes


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


def test_a_refusal_that_blames_the_request_is_not_counted_against_the_node(tiny, nodes):
    """A request past the model's context (the nodes refuse its OPEN) and a step of the wrong shape: each refused with
    an error naming the request, no node is avoided, and the next request is served at once without a fail-over."""

    async def go():
        model = await RemoteModel.connect(tiny, [n.url for n in nodes], DOMAIN, step_timeout_s=10)
        prompt = model.prompt_ids("hello")
        try:
            with pytest.raises(RequestRefused, match="too_long") as too_long:
                async for _ in model.stream(prompt, SamplingParams(max_tokens=CONTEXT), Completion(len(prompt))):
                    pass
            session = InferenceSession(model.nodes, 5, DOMAIN, max_length=16, failed=model.failed)
            with pytest.raises(RequestRefused, match="bad_tensor") as bad_shape:
                await session.run_layers(torch.randn(1, 2, HIDDEN + 1), torch.arange(2).unsqueeze(0))
            await session.close()
            avoided = model.failed.current()
            completion = Completion(len(prompt))
            tokens = [t async for t in model.stream(prompt, SamplingParams(max_tokens=3, temperature=0), completion)]
        finally:
            await model.aclose()
        return too_long.value, bad_shape.value, avoided, tokens, completion

    too_long, bad_shape, avoided, tokens, completion = run(go())
    assert too_long.code == "too_long" and bad_shape.code == "bad_tensor"
    assert avoided == set()
    assert len(tokens) == 3 and completion.failovers == 0


@pytest.fixture(scope="module")
def api(tiny, nodes, tmp_path_factory):
    """`shardmarket client serve` over the two nodes."""
    home = tmp_path_factory.mktemp("courtesy-api")
    port = free_port()
    log = home / "api.log"
    cmd = [sys.executable, "-m", "shardmarket", "client", "serve", "--checkpoint", str(tiny), "--port", str(port)]
    cmd += ["--nodes", ",".join(n.url for n in nodes)]
    env = dict(child_env(home), SHARDMARKET_CLIENT_API_KEY=API_KEY)
    process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    try:
        wait_http(f"http://127.0.0.1:{port}/v1/models", process, log, headers={"Authorization": f"Bearer {API_KEY}"})
        yield port, log
    finally:
        process.terminate()
        process.wait(15)


def test_a_caller_that_hangs_up_on_a_non_streaming_request_is_no_longer_generated_for(nodes, api):
    port, log = api
    a = nodes[0]
    body = json.dumps({"model": "tiny", "prompt": "hello", "max_tokens": 400, "temperature": 0}).encode()
    request = (
        f"POST /v1/completions HTTP/1.1\r\nHost: api\r\nAuthorization: Bearer {API_KEY}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n"
    ).encode() + body

    async def go() -> tuple[int, int]:
        before = load(a)["steps_served"]
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(request)
        await wait_until(lambda: load(a)["steps_served"] >= before + 10)  # generating
        writer.close()  # the caller hangs up
        served, previous = before, -1
        while served != previous:  # until no step runs for a second
            previous = served
            await asyncio.sleep(1.0)
            served = (await asyncio.to_thread(load, a))["steps_served"]
        return before, served

    before, after = run(go())
    assert after - before < 200, f"{after - before} steps ran for a request of 400 tokens whose caller hung up at 10"
    assert "hung up; stopping its generation" in log.read_text()
