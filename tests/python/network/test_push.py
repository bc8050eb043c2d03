"""Node-to-node push on loopback: nodes that push their outputs to the next hop give the same greedy tokens as client
relaying, and the client still gets every hop's signed commitment; a node that cannot reach its next hop relays
through the client instead; a pushed step must carry the token the client gave the previous node, may come before its
session's OPEN (and waits for it), and the next node is named by its key alone."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

import pytest
import torch

from shardmarket.chain.eip712 import Domain
from shardmarket.client.generation import Completion, RemoteModel
from shardmarket.client.session import PREFILL_CHUNK, InferenceSession
from shardmarket.engine.sampling import SamplingParams
from shardmarket.net import wire
from shardmarket.net.channel import SecureChannel, client_handshake, open_transport
from shardmarket.net.wire import Message

from network_processes import free_port, running, start_node

DOMAIN = Domain(31337, "0x" + "00" * 20)
HIDDEN = 64  # tiny_config's hidden size
TOKENS = 8
PROMPT = list(range(3, 40))


@pytest.fixture(scope="module")
def chain(tiny, tmp_path_factory):
    """Nodes a [0,2) -> b [2,4) -> c [4,5) that may push to each other, d [2,4) whose peers leave out c, and f [2,4)
    that pushes to c but forges its commitments from its fourth step on."""
    home = tmp_path_factory.mktemp("push")
    ports = {name: free_port() for name in "abcdf"}
    url = {name: f"http://127.0.0.1:{port}" for name, port in ports.items()}
    peers = {"a": [url["b"], url["d"], url["f"]], "b": [url["c"]], "c": [], "d": [url["a"]], "f": [url["c"]]}
    layers = {"a": "0:2", "b": "2:4", "c": "4:5", "d": "2:4", "f": "2:4"}
    extra = {"f": ["--test-fault", "forge-commitments"]}
    nodes = {
        name: start_node(
            tiny, layers[name], home / name, *extra.get(name, []), port=ports[name], settings={"peers": ",".join(peers[name])}
        )
        for name in "abcdf"
    }
    with running(*nodes.values()):
        yield nodes


@dataclass
class Finished:
    """What a session held when its request finished: each hop's node URL, whether it pushed, its step count."""

    hops: list[tuple[str, bool, int]]
    commitments: list[str]
    failovers: int
    request_ids: int

    @classmethod
    def of(cls, session: InferenceSession) -> Finished:
        hops = [(hop.node.url, hop.pushes, len(hop.inputs)) for hop in session.hops]
        return cls(hops, [url for url, _ in session.commitments], session.failovers, len(session.request_ids))


def generate(
    tiny, urls: list[str], push: bool, prompt: list[int] = PROMPT, spare: str | None = None
) -> tuple[list[int], Finished]:
    """Greedy tokens through `urls` (with `spare` priced so that routes take it only in place of a failed node) and what
    the session held at the end."""

    async def go():
        model = await RemoteModel.connect(tiny, urls + ([spare] if spare else []), DOMAIN, step_timeout_s=30, push=push)
        for node in model.nodes:
            if node.url == spare:
                node.price = 1000
        sessions: list[Finished] = []
        model.on_finished = lambda session: sessions.append(Finished.of(session))
        params = SamplingParams(max_tokens=TOKENS, ignore_eos=True)
        tokens = [t async for t in model.stream(prompt, params, Completion(len(prompt)))]
        await model.aclose()
        return tokens, sessions[0]

    return asyncio.run(asyncio.wait_for(go(), 120))


async def connect(node) -> SecureChannel:
    transport = await open_transport(node.url, "tcp", node.port, wire.DEFAULT_LIMITS, 10)
    return await client_handshake(transport, bytes.fromhex(node.info()["x25519_public_key"]))


def step(request_id: bytes, number: int, position: int, hidden: torch.Tensor, **fields) -> Message:
    return Message(wire.STEP, request_id, number, {"position": position, **fields}, hidden)


def test_pushed_route_gives_the_relayed_tokens_and_every_hops_commitment(tiny, chain):
    urls = [chain[name].url for name in "abc"]
    relayed, _ = generate(tiny, urls, push=False)
    pushed, session = generate(tiny, urls, push=True)
    assert pushed == relayed and len(pushed) == TOKENS
    steps = TOKENS  # the prompt, then every token but the last
    assert session.hops == [(urls[0], True, steps), (urls[1], True, steps), (urls[2], False, steps)]  # every result said pushed
    assert session.failovers == 0
    assert all(session.commitments.count(url) >= steps - 1 for url in urls)  # every hop's commitment checked


def test_a_node_that_cannot_reach_its_next_hop_relays_through_the_client(tiny, chain):
    """d's directory holds a but not c: told to push to c, it answers that it did not, and the client relays."""
    urls = [chain[name].url for name in "abc"]
    relayed, _ = generate(tiny, urls, push=False)
    pushed, session = generate(tiny, [chain["a"].url, chain["d"].url, chain["c"].url], push=True)
    assert pushed == relayed
    assert [(url, pushes) for url, pushes, _ in session.hops] == [(chain[name].url, name == "a") for name in "adc"]
    assert session.failovers == 0


def test_a_forged_commitment_of_a_pushing_hop_redoes_the_step_around_it(tiny, chain):
    """f's forged commitment is found after its output went on to c (checked while the client picks the token): the
    step is redone on a new request id, every answered step replayed, with b in f's place; the text is unchanged."""
    urls = [chain[name].url for name in "abc"]
    relayed, _ = generate(tiny, urls, push=False)
    pushed, session = generate(tiny, [chain[name].url for name in "afc"], push=True, spare=chain["b"].url)
    assert pushed == relayed
    assert session.failovers >= 1 and session.request_ids == 2
    assert chain["f"].url not in [url for url, _, _ in session.hops]
    assert [url for url, _, _ in session.hops] == urls


def test_a_long_prompt_is_prefilled_in_chunks_pipelined_through_the_pushing_route(tiny, chain):
    """A 300-token prompt goes to the first hop as 3 steps of at most PREFILL_CHUNK positions (each hop works on one
    while the next works on the one before): the same tokens as one relayed prefill step, every chunk's commitment
    checked."""
    urls = [chain[name].url for name in "abc"]
    prompt = [3 + (i * 7) % 370 for i in range(300)]
    relayed, one_step = generate(tiny, urls, push=False, prompt=prompt)
    pushed, chunked = generate(tiny, urls, push=True, prompt=prompt)
    assert pushed == relayed
    chunks = -(-len(prompt) // PREFILL_CHUNK)
    assert [steps for _, _, steps in one_step.hops] == [TOKENS + 1] * 3  # the engine's 256 and 44 positions, then decode
    assert chunked.hops == [
        (urls[0], True, chunks + TOKENS - 1),
        (urls[1], True, chunks + TOKENS - 1),
        (urls[2], False, chunks + TOKENS - 1),
    ]
    assert chunked.failovers == 0 and chunked.request_ids == 1
    assert all(chunked.commitments.count(url) >= chunks + TOKENS - 2 for url in urls)


def test_a_chunked_prefill_that_cannot_push_starts_over_relayed(tiny, chain):
    """d cannot reach c: the chunked prefill is given up after d's first chunk, and the prompt runs again on a new
    request id in one step, relayed from d to c, with no node blamed."""
    urls = [chain[name].url for name in "abc"]
    prompt = [3 + (i * 5) % 370 for i in range(300)]
    relayed, _ = generate(tiny, urls, push=False, prompt=prompt)
    pushed, session = generate(tiny, [chain[name].url for name in "adc"], push=True, prompt=prompt)
    assert pushed == relayed
    assert session.request_ids == 2 and session.failovers == 0
    assert [steps for _, _, steps in session.hops] == [TOKENS] * 3  # the whole prompt in one step


def test_a_pushed_step_needs_the_token_the_client_gave_the_previous_node(chain):
    """A step naming a token other than the one the session was opened with is refused, and nothing runs."""
    node = chain["b"]

    async def go():
        owner, stranger = await connect(node), await connect(node)
        request_id = os.urandom(32)
        await owner.send(Message(wire.OPEN, request_id, 0, {"max_length": 16, "previous": os.urandom(32)}))
        assert (await owner.recv()).type == wire.OPENED
        await stranger.send(step(request_id, 0, 0, torch.randn(1, 2, HIDDEN), via=os.urandom(32)))
        refused = await stranger.recv()
        await stranger.send(step(request_id, 0, 0, torch.randn(1, 2, HIDDEN)))  # the step is still the next one
        answered = await stranger.recv()
        await owner.close(), await stranger.close()
        return refused, answered

    refused, answered = asyncio.run(asyncio.wait_for(go(), 60))
    assert refused.type == wire.ERROR and refused.fields["code"] == "bad_push"
    assert answered.type == wire.RESULT


async def overtaken_open(node, open_fields: dict) -> tuple[Message, Message, Message | None]:
    """A step pushed (by `pusher`) before its session's OPEN (by `owner`) reached the node, as when a client sends the
    OPENs and the first step back to back: the owner's answer to OPEN, the next frame on the owner's channel and on
    the pusher's (None where nothing came within 5 s)."""
    owner, pusher = await connect(node), await connect(node)
    request_id, token = os.urandom(32), os.urandom(32)
    await pusher.send(step(request_id, 0, 0, torch.randn(1, 2, HIDDEN), via=token))
    pushed_answer = asyncio.ensure_future(pusher.recv())
    while (await asyncio.to_thread(node.info))["load"]["in_flight"] < 1:  # until the node holds the pushed step
        if (await asyncio.wait({pushed_answer}, timeout=0.01))[0]:  # or answered it at once
            return pushed_answer.result(), pushed_answer.result(), None
    await owner.send(Message(wire.OPEN, request_id, 0, {**open_fields, "previous": token}))
    opened = await owner.recv()
    frames = []
    for channel, pending in ((owner, None), (pusher, pushed_answer)):
        try:
            frames.append(await asyncio.wait_for(pending or channel.recv(), 5))
        except TimeoutError:
            frames.append(None)
    await owner.close(), await pusher.close()
    return opened, frames[0], frames[1]


def test_a_pushed_step_that_overtook_its_open_waits_for_it(chain):
    """Answered once the OPEN is, to the client that opened the session; refused if the node refuses that OPEN."""
    opened, answer, to_pusher = asyncio.run(asyncio.wait_for(overtaken_open(chain["b"], {"max_length": 16}), 60))
    assert opened.type == wire.OPENED
    assert answer.type == wire.RESULT and answer.step == 0 and to_pusher is None
    refused, nothing, to_pusher = asyncio.run(asyncio.wait_for(overtaken_open(chain["b"], {"max_length": 0}), 60))
    assert refused.type == wire.ERROR and refused.fields["code"] == "bad_open"
    assert to_pusher is not None and to_pusher.type == wire.ERROR and to_pusher.fields["code"] == "unknown_session"
    assert nothing is None  # the refused session ran nothing


def test_open_names_the_next_node_by_its_key_only(chain):
    """`next` must be a 32-byte key and token (no address a client could point the node at); a key no peer announces
    gets a result that says it was not pushed."""
    node = chain["a"]

    async def go():
        channel = await connect(node)
        bad = os.urandom(32)
        await channel.send(
            Message(wire.OPEN, bad, 0, {"max_length": 16, "next": {"key": "10.0.0.1:22", "token": os.urandom(32)}})
        )
        refused = await channel.recv()
        request_id = os.urandom(32)
        await channel.send(
            Message(wire.OPEN, request_id, 0, {"max_length": 16, "next": {"key": os.urandom(32), "token": os.urandom(32)}})
        )
        opened = await channel.recv()
        await channel.send(step(request_id, 0, 0, torch.randn(1, 2, HIDDEN), push=1))
        result, commit = await channel.recv(), await channel.recv()
        await channel.close()
        return refused, opened, result, commit

    refused, opened, result, commit = asyncio.run(asyncio.wait_for(go(), 60))
    assert refused.type == wire.ERROR and refused.fields["code"] == "bad_open"
    assert opened.type == wire.OPENED and opened.fields["push"] is True
    assert result.type == wire.RESULT and result.fields["pushed"] is False and commit.type == wire.COMMIT
