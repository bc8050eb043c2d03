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
from shardmarket.chain.eip712 import Domain, signing_key, tensor_hash
from shardmarket.chain.evidence import MAX_GATEWAY_HINTS, METADATA_KEY, Evidence, EvidenceError, fetch, gateway_hints, publish
from shardmarket.engine.tensors import tensor_bytes
from shardmarket.ipfs.blockstore import Blockstore
from shardmarket.ipfs.gateway import gateway_routes
from shardmarket.server.verifier import EvidenceUnavailable, VerifierDuty

DOMAIN = Domain(31337, "0x" + "00" * 20)


def evidence(node) -> Evidence:
    request_id, inputs, commitments = os.urandom(32), [torch.randn(1, 3, 8), torch.randn(1, 1, 8)], []
    for step, hidden in enumerate(inputs):
        output = torch.randn(1, hidden.shape[1], 8)
        commitments.append(
            commit(signing_key(node.key), request_id, step, tensor_hash(tensor_bytes(hidden)), tensor_bytes(output), DOMAIN)
        )
    return Evidence("tiny", 0, 2, [0, 3], inputs, commitments, output)


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
    assert decoded.commitments == original.commitments and decoded.positions == original.positions
    assert torch.equal(decoded.inputs[0], original.inputs[0]) and (decoded.start, decoded.end) == (0, 2)
    for bad in [
        b"not safetensors",
        save_tensors({"output": torch.zeros(1)}, metadata={"model": "tiny"}),
        save_tensors({"output": torch.zeros(1)}, metadata={METADATA_KEY: '{"layers": 3}'}),
        original.encode()[:-5],
    ]:
        with pytest.raises(EvidenceError, match="malformed evidence"):
            Evidence.decode(bad)


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
    duty = VerifierDuty(None, None, Blockstore(tmp_path / "verifier"), [], tolerance=0.01)
    dispute = {"disputeId": 7, "evidence": reference}
    with pytest.raises(EvidenceUnavailable, match="no gateway had"):
        asyncio.run(duty.judge(dispute, last_chance=False))
    assert asyncio.run(duty.judge(dispute, last_chance=True)) is False  # the commit phase is about to end: acquitted
    assert publish(original, store, [url]) == reference.replace(f"gateway={quote(down, safe='')}&", "")  # served now
    fetched = asyncio.run(duty.fetch_evidence(dispute, last_chance=False))
    fetched.check(node.address, DOMAIN)
    assert torch.equal(fetched.output, original.output) and fetched.positions == [0, 3]
