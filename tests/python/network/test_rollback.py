"""A real node process rolls its KV cache back when a step starts inside the previous one (the client rejected draft
tokens there): the answer is that of a cache that never held the dropped positions, the signed history says where the
cache was cut, so dispute evidence and a checker's re-run agree with the node, and a rollback beyond the previous step
or past the cache's end is refused."""

from __future__ import annotations

import asyncio
import os

import pytest
import torch
from eth_utils import keccak

from shardmarket.chain.commitment import check_commitment
from shardmarket.chain.eip712 import EMPTY_HISTORY, Domain, StepContext, chain_history, chain_rollback, tensor_hash
from shardmarket.chain.evidence import Evidence, EvidenceError
from shardmarket.engine.stage import Stage
from shardmarket.engine.tensors import tensor_bytes
from shardmarket.net import wire
from shardmarket.net.channel import client_handshake, open_transport
from shardmarket.net.wire import Message

from network_processes import running, start_node

HIDDEN = 64  # tiny_config's hidden size


@pytest.fixture(scope="module")
def node(tiny, tmp_path_factory):
    process = start_node(tiny, "0:2", tmp_path_factory.mktemp("rollback-node"))
    with running(process):
        yield process


async def exchange(node, info, steps: list[tuple[int, torch.Tensor]], then: list[int]) -> tuple[bytes, bytes, list, list]:
    """Open a session, run `steps` (position, hidden) in order, then try one more one-token step at each of `then`;
    returns the request id, the session nonce, the (result, commitment) pairs and the error frames."""
    transport = await open_transport(node.url, "tcp", node.port, wire.DEFAULT_LIMITS, 10)
    channel = await client_handshake(transport, bytes.fromhex(info["x25519_public_key"]))
    request_id = os.urandom(32)
    await channel.send(Message(wire.OPEN, request_id, 0, {"max_length": 16}))
    nonce = (await channel.recv()).fields["nonce"]
    answers, errors = [], []
    for number, (position, hidden) in enumerate(steps):
        await channel.send(Message(wire.STEP, request_id, number, {"position": position}, hidden))
        result = await channel.recv()
        assert result.type == wire.RESULT, f"step {number} at position {position}: {result.fields}"
        answers.append((result, await channel.recv()))
    for position in then:
        await channel.send(Message(wire.STEP, request_id, len(steps), {"position": position}, torch.randn(1, 1, HIDDEN)))
        errors.append(await channel.recv())
    await channel.close()
    return request_id, nonce, answers, errors


def test_a_step_inside_the_previous_one_rolls_the_cache_back_and_commits_to_where(node, tiny):
    info = node.info()
    prompt, verify, corrected = torch.randn(1, 4, HIDDEN), torch.randn(1, 3, HIDDEN), torch.randn(1, 1, HIDDEN)
    # positions 4..6 carry a token and two drafts; the client keeps one draft (position 5) and sends its own token there
    steps = [(0, prompt), (4, verify), (5, corrected)]
    request_id, nonce, answers, errors = asyncio.run(asyncio.wait_for(exchange(node, info, steps, then=[5, 3, 7, -1, True]), 60))
    assert [e.type for e in errors] == [wire.ERROR] * 5
    assert {e.fields["code"] for e in errors} == {"bad_position"}  # before the previous step, past the end, not a position

    stage = Stage.load(tiny, 0, 2)
    stage.open_session("clean", 16)  # a cache that never saw position 6's draft
    clean = [stage.step("clean", x, torch.arange(p, p + x.shape[1])[None]) for p, x in ((0, prompt), (4, verify[:, :2]))]
    clean.append(stage.step("clean", corrected, torch.tensor([[5]])))
    result, _ = answers[2]
    assert torch.allclose(result.tensor, clean[2], atol=1e-5)

    inputs = [tensor_hash(tensor_bytes(x)) for _, x in steps]
    history = chain_rollback(chain_history(chain_history(EMPTY_HISTORY, inputs[0]), inputs[1]), 5)
    domain = Domain(info["commitment_domain"]["chain_id"], info["commitment_domain"]["verifying_contract"])
    context = StepContext(keccak(text=info["model"]["id"]), 0, 2, request_id, nonce, 2, 5, history, inputs[2])
    signed = check_commitment(answers[2][1].fields, context, result.payload, info["operator"], domain)

    # dispute evidence of the rolled-back step checks out, and a verifier's re-run matches the node's answer
    evidence = Evidence([p for p, _ in steps], [x for _, x in steps], signed, result.tensor)
    evidence.check(info["operator"], domain)
    assert torch.allclose(Stage.load(tiny, 0, 2).rerun(evidence.positions, evidence.inputs)[-1], result.tensor, atol=1e-5)
    # a challenger cannot move the cut: the history binds it
    for positions in ([0, 4, 6], [0, 4, 4], [0, 3, 5]):
        with pytest.raises(EvidenceError):
            Evidence(positions, evidence.inputs, signed, result.tensor).check(info["operator"], domain)
