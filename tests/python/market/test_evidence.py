"""Dispute evidence reaches verifiers on other machines: its reference names the challenger's gateways, a
verifier with no gateway of its own fetches it from them, verified against the CID and the node's signatures; while
no gateway serves it, the verifier asks again rather than vote. The same evidence always has the same CID, and
malformed evidence is refused with a clear error."""

from __future__ import annotations

import asyncio
import os
import threading
from urllib.parse import quote

import pytest
import torch
from aiohttp import web
from eth_account import Account
from safetensors.torch import save as save_tensors

from shardmarket.chain.commitment import commit
from shardmarket.chain.devchain import free_port
from shardmarket.chain.eip712 import EMPTY_HISTORY, Domain, StepContext, chain_history, signing_key, tensor_hash
from shardmarket.chain.evidence import MAX_GATEWAY_HINTS, METADATA_KEY, Evidence, EvidenceError, fetch, gateway_hints, publish
from shardmarket.engine.tensors import tensor_bytes
from shardmarket.ipfs.blockstore import Blockstore
from shardmarket.ipfs.gateway import gateway_routes
from shardmarket.server.verifier import EvidenceUnavailable, VerifierDuty

DOMAIN = Domain(31337, "0x" + "00" * 20)


def evidence(node) -> Evidence:
    """A session of two steps on layers [0, 2): the second is challenged."""
    inputs, output = [torch.randn(1, 3, 8), torch.randn(1, 1, 8)], torch.randn(1, 1, 8)
    history = chain_history(EMPTY_HISTORY, tensor_hash(tensor_bytes(inputs[0])))
    context = StepContext(b"\x0a" * 32, 0, 2, os.urandom(32), os.urandom(32), 1, 3, history, tensor_hash(tensor_bytes(inputs[1])))
    return Evidence([0, 3], inputs, commit(signing_key(node.key), context, tensor_bytes(output), DOMAIN), output)


@pytest.fixture
def gateway(tmp_path):
    """A trustless gateway over the challenger's store, on a real socket (as `client serve` mounts it)."""
    store, port = Blockstore(tmp_path / "challenger"), free_port()
    loop = asyncio.new_event_loop()

    async def start() -> web.AppRunner:
        app = web.Application()
        app.add_routes(gateway_routes(store))
        runner = web.AppRunner(app)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port).start()
        return runner

    runner = loop.run_until_complete(start())
    thread = threading.Thread(target=loop.run_forever, daemon=True)
    thread.start()
    yield store, f"http://127.0.0.1:{port}"
    asyncio.run_coroutine_threadsafe(runner.cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_a_verifier_elsewhere_fetches_the_evidence_from_the_gateway_its_reference_names(gateway, tmp_path):
    store, url = gateway
    node = Account.create()
    original = evidence(node)
    reference = publish(original, store, [url])
    assert reference.startswith("ipfs://") and gateway_hints(reference) == [url]
    verifier_store = Blockstore(tmp_path / "verifier")
    with pytest.raises(EvidenceError, match="names a gateway"):
        fetch(reference.partition("?")[0], verifier_store)  # no hint and no gateway configured: a clear error
    fetched = fetch(reference, verifier_store)  # no gateway configured: the hint is enough
    fetched.check(node.address, DOMAIN)
    assert torch.equal(fetched.output, original.output) and fetched.positions == [0, 3]


def test_the_same_evidence_always_has_the_same_cid_and_malformed_evidence_is_refused(tmp_path):
    original = evidence(Account.create())
    references = {publish(original, Blockstore(tmp_path / f"store{i}")) for i in range(3)}
    assert len(references) == 1  # safetensors' own metadata order varies from call to call; the evidence's does not
    decoded = Evidence.decode(original.encode())
    assert decoded.challenged == original.challenged and decoded.positions == original.positions
    assert torch.equal(decoded.inputs[0], original.inputs[0]) and torch.equal(decoded.output, original.output)
    for bad in [
        b"not safetensors",
        save_tensors({"output": torch.zeros(1)}, metadata={"model": "tiny"}),
        save_tensors({"output": torch.zeros(1)}, metadata={METADATA_KEY: '{"layers": 3}'}),
        original.encode()[:-5],
    ]:
        with pytest.raises(EvidenceError, match="malformed evidence"):
            Evidence.decode(bad)


def test_evidence_must_be_the_session_the_node_committed_to():
    """A verifier re-runs only what the node signed: the earlier inputs must hash into the commitment's history, the
    positions run on from 0, the last input and the answer are the committed ones, and the accused signed it."""
    node = Account.create()
    good = evidence(node)
    good.check(node.address, DOMAIN)
    other_first = Evidence(good.positions, [torch.randn(1, 3, 8), good.inputs[1]], good.challenged, good.output)
    other_last = Evidence(good.positions, [good.inputs[0], torch.randn(1, 1, 8)], good.challenged, good.output)
    for bad, error in [
        (other_first, "history"),
        (Evidence([0, 2], good.inputs, good.challenged, good.output), "position"),
        (other_last, "challenged input"),
        (Evidence(good.positions, good.inputs, good.challenged, torch.randn(1, 1, 8)), "answer"),
        (Evidence(good.positions[:1], good.inputs[:1], good.challenged, good.output), "needs 2 inputs"),
    ]:
        with pytest.raises(EvidenceError, match=error):
            bad.check(node.address, DOMAIN)
    with pytest.raises(EvidenceError, match="not signed by the accused"):
        good.check(Account.create().address, DOMAIN)


def test_only_a_few_http_gateways_are_taken_from_a_reference():
    reference = "ipfs://bafkqaaa?gateway=file%3A%2F%2F%2Fetc%2Fpasswd&gateway=ftp%3A%2F%2Fx&gateway=http%3A%2F%2F" + "&".join(
        ["a.example"] + [f"gateway=https%3A%2F%2Fg{i}.example" for i in range(6)]
    )
    hints = gateway_hints(reference)
    assert hints == ["http://a.example"] + [f"https://g{i}.example" for i in range(MAX_GATEWAY_HINTS - 1)]


def test_a_verifier_asks_again_for_evidence_no_gateway_serves_yet_and_acquits_only_at_its_last_chance(gateway, tmp_path):
    """A gateway that is down, or does not hold the evidence yet, postpones the vote (the duty asks again at a later
    tick) instead of acquitting the node; only at the last chance to vote does missing evidence acquit it."""
    store, url = gateway
    node = Account.create()
    original = evidence(node)
    down = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    reference = publish(original, Blockstore(tmp_path / "challenger-offline"), [down, url])  # on neither gateway yet
    duty = VerifierDuty(None, None, b"\x0a" * 32, Blockstore(tmp_path / "verifier"), [], tolerance=0.01)
    dispute = {"disputeId": 7, "evidence": reference}
    with pytest.raises(EvidenceUnavailable, match="no gateway had"):
        asyncio.run(duty.judge(dispute, last_chance=False))
    assert asyncio.run(duty.judge(dispute, last_chance=True)) is False  # the commit phase is about to end: acquitted
    assert publish(original, store, [url]) == reference.replace(f"gateway={quote(down, safe='')}&", "")  # served now
    fetched = asyncio.run(duty.fetch_evidence(dispute, last_chance=False))
    fetched.check(node.address, DOMAIN)
    assert torch.equal(fetched.output, original.output) and fetched.positions == [0, 3]
