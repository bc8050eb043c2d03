"""Speculative decoding through a real 3-node pipeline of the default model on loopback: prompt-lookup drafts ride on
the decode steps, every node rolls its KV cache back past the rejected ones, and the greedy text is exactly the text
without drafts; each hop computes (and bills) every position it was sent, and `usage` says what speculation did."""

from __future__ import annotations

import asyncio

import pytest
import requests
from aiohttp import web

from shardmarket.chain.eip712 import Domain
from shardmarket.client.api import build_api
from shardmarket.client.generation import Completion, RemoteModel
from shardmarket.engine.sampling import SamplingParams

from network_processes import free_port, running, start_node

DOMAIN = Domain(31337, "0x" + "00" * 20)
TEXT = (
    "The committee met on Tuesday to discuss the budget for the new library. After a long debate, the members agreed "
    "to fund the reading room, to delay the cafe until next year, and to ask the city for a grant to repair the roof "
    "before winter."
)
CODE = "def area(w, h):\n    x = w * h\n    print('area', x)\n    return x\n"
PROMPTS = [
    f"Rewrite this text in the past perfect tense:\n\n{TEXT}",
    f"Summarize this text in one sentence:\n\n{TEXT}",
    f"Rename the variable x to total in this code and show the whole code:\n\n{CODE}",
    "Write a short poem about the sea.",  # drafts rarely help here
]
MAX_TOKENS = 40


@pytest.fixture(scope="module")
def route(smollm, tmp_path_factory):
    home = tmp_path_factory.mktemp("speculation")
    spans = ("0:10", "10:20", "20:30")
    ports = [free_port() for _ in spans]
    urls = [f"http://127.0.0.1:{port}" for port in ports]
    nodes = [  # each may push to the next when a route asks it to
        start_node(smollm, layers, home / layers.replace(":", "-"), port=port, settings={"peers": ",".join(urls[i + 1 : i + 2])})
        for i, (layers, port) in enumerate(zip(spans, ports, strict=True))
    ]
    with running(*nodes):
        yield [node.url for node in nodes]


async def complete(model: RemoteModel, prompt: str) -> tuple[list[int], Completion]:
    ids = model.chat_ids([{"role": "user", "content": prompt}])
    completion = Completion(len(ids))
    tokens = [t async for t in model.stream(ids, SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True), completion)]
    return tokens, completion


def test_greedy_text_with_drafts_is_the_text_without_and_every_computed_position_is_counted(smollm, route):
    async def go():
        model = await RemoteModel.connect(smollm, route, DOMAIN, step_timeout_s=30)
        try:
            plain = [await complete(model, prompt) for prompt in PROMPTS]
            model.max_draft = 8
            drafted = [await complete(model, prompt) for prompt in PROMPTS]
        finally:
            await model.aclose()
        return plain, drafted

    plain, drafted = asyncio.run(asyncio.wait_for(go(), 300))
    for (expected, without), (tokens, completion) in zip(plain, drafted, strict=True):
        assert tokens == expected and len(tokens) == MAX_TOKENS
        stats = completion.speculation
        assert stats is not None and without.speculation is None
        # the prompt, every token sent back in, and the drafts rejected: what each node computed and billed
        rejected = stats.drafted - stats.accepted
        assert completion.computed_positions == completion.prompt_tokens + len(tokens) - 1 + rejected
        assert without.computed_positions == without.prompt_tokens + len(tokens) - 1
        assert stats.passes == len(tokens) - 1 - stats.accepted
    rewrite = drafted[0][1].speculation
    assert rewrite is not None and rewrite.accepted >= MAX_TOKENS / 2  # half the text came from drafts
    assert sum(c.speculation.drafted - c.speculation.accepted for _, c in drafted) > 0  # caches were rolled back


def test_drafts_on_a_pushing_route_give_the_same_greedy_text(smollm, route):
    """Speculative steps pushed node to node: every node rolls back from the position the pushed step carries."""

    async def go():
        model = await RemoteModel.connect(smollm, route, DOMAIN, step_timeout_s=30)
        pushed = await RemoteModel.connect(smollm, route, DOMAIN, step_timeout_s=30, push=True, max_draft=8)
        pushes: list[list[bool]] = []
        pushed.on_finished = lambda session: pushes.append([hop.pushes for hop in session.hops])
        try:
            plain = [await complete(model, p) for p in PROMPTS[:2]]
            return plain, [await complete(pushed, p) for p in PROMPTS[:2]], pushes
        finally:
            await model.aclose()
            await pushed.aclose()

    plain, drafted, pushes = asyncio.run(asyncio.wait_for(go(), 300))
    assert pushes == [[True, True, False]] * 2  # the first two nodes pushed every step on
    for (expected, _), (tokens, completion) in zip(plain, drafted, strict=True):
        assert tokens == expected
        assert completion.speculation is not None and completion.speculation.accepted > 0


def test_usage_reports_the_accepted_tokens_and_what_speculation_did(smollm, route):
    port = free_port()

    async def go():
        model = await RemoteModel.connect(smollm, route, DOMAIN, step_timeout_s=30, max_draft=8)
        runner = web.AppRunner(build_api(model, "key"))
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        try:
            body = {"messages": [{"role": "user", "content": PROMPTS[0]}], "max_tokens": 24, "temperature": 0}
            response = await asyncio.to_thread(
                requests.post,
                f"http://127.0.0.1:{port}/v1/chat/completions",
                json=body,
                headers={"Authorization": "Bearer key"},
                timeout=60,
            )
        finally:
            await runner.cleanup()
        return response.json()["usage"]

    usage = asyncio.run(asyncio.wait_for(go(), 120))
    spec = usage["speculation"]
    assert 0 < spec["accepted_draft_tokens"] <= spec["drafted_tokens"]
    assert (
        usage["computed_positions"]
        == (usage["prompt_tokens"] + usage["completion_tokens"] - 1 + spec["drafted_tokens"] - spec["accepted_draft_tokens"])
        or usage["completion_tokens"] < 24
    )  # an end of text stops the count short
    assert usage["cost"] == 0 and usage["cost_per_completion_token"] == 0  # free nodes
