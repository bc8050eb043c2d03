"""Checks on nodes, on a real anvil with real node processes: spot checks never accuse honest nodes that
compute with other thread counts or from disk-offloaded layers, a node adding noise is challenged and slashed by
the verifiers' vote (votes that failed to commit, or whose verifier restarted, are sent again), a node signing two
answers for one step is slashed for equivocation, an honest node whose request id a client reuses across a
restart gives nobody slashable evidence, and a dispute its challenger leaves undrawn is drawn by the slice's nodes."""

from __future__ import annotations

import asyncio
import os
import time

import pytest
import torch
from web3.logs import DISCARD

from shardmarket.chain.contracts import ChainError, DisputeStatus, Market
from shardmarket.chain.eip712 import EMPTY_HISTORY
from shardmarket.chain.evidence import relative_difference
from shardmarket.cli.devmarket import DevMarket
from shardmarket.client.session import InferenceSession
from shardmarket.config import load_config
from shardmarket.engine.models import random_checkpoint, tiny_config

from .conftest import MODEL, client_model, generate, serve_market

PROMPT = [3, 1, 4, 1, 5]
# name, layers, price, extra `node run` arguments
NODES = [
    ("a", "0:2", 1000, ["--threads", "1"]),
    ("b1", "2:4", 1000, ["--threads", "1"]),
    ("b2", "2:4", 1000, ["--threads", "2"]),
    ("b3", "2:4", 1000, ["--threads", "1", "--max-memory-mb", "0", "--offload-folder", "{root}/offload-b3"]),  # layers on disk
    ("c", "4:5", 1000, ["--threads", "1"]),
]


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    root = tmp_path_factory.mktemp("disputes")
    checkpoint = random_checkpoint(tiny_config(), root / "tiny-model", seed=3)
    nodes = [(name, layers, price, [arg.format(root=root) for arg in extra]) for name, layers, price, extra in NODES]
    yield from serve_market(root, checkpoint, nodes)


def auditing_client(market: DevMarket, name: str, rate: float):
    return client_model(market, name, tokens=100 * 10**18, spot_check_rate=rate)


def one_hop_session(model, target) -> InferenceSession:
    """A session of `model`'s client through `target` alone, its commitments going to the client's auditor."""
    return InferenceSession(
        [target],
        model.head.num_layers,
        model.domain,
        max_length=16,
        tab_source=model.tab_source,
        on_commitment=model.on_commitment,
    )


def stake_of(market: DevMarket, name: str) -> int:
    with market.acting_as(name):
        chain = Market.connect(load_config().chain)
    return chain.read(chain.stake.functions.totalStakeOf(market.accounts[name]))


def test_honest_nodes_with_other_thread_counts_are_never_accused(market):
    async def scenario():
        model = await auditing_client(market, "honest-client", rate=1.0)
        for _ in range(2):
            await generate(model, PROMPT, 6)
        await model.auditor.wait()
        return model.auditor

    async def same_range_outputs():
        model = await auditing_client(market, "honest-client", rate=0.0)
        inputs = [(0, torch.randn(1, 4, model.head.config.hidden_size)), (4, torch.randn(1, 1, model.head.config.hidden_size))]
        outputs = {}
        for node in [n for n in model.nodes if (n.start, n.end) == (2, 4)]:
            session = InferenceSession([node], model.head.num_layers, model.domain, max_length=8, tab_source=model.tab_source)
            hop = (await session._open_hops([node]))[0]
            outputs[node.url] = [o for _, o in await session._replay_hop(hop, inputs)]
            await session.close()
        return outputs

    auditor = asyncio.run(scenario())
    assert auditor.checks >= 6  # every hop of both requests was re-run elsewhere or locally
    assert auditor.findings == []
    outputs = list(asyncio.run(same_range_outputs()).values())
    assert len(outputs) == 3  # one thread, two threads, layers offloaded to disk
    for other in outputs[1:]:
        for a, b in zip(outputs[0], other, strict=True):
            assert relative_difference(a, b) <= 1e-5  # the same within floating-point noise, far below the tolerance
    with market.acting_as("a"):
        chain = Market.connect(load_config().chain)
    assert chain.read(chain.disputes.functions.disputeCount()) == 0


def set_gas_money(market: DevMarket, names: list[str], wei: int) -> None:
    for name in names:
        market.w3.provider.make_request("anvil_setBalance", [market.accounts[name], hex(wei)])


def wait_for_log(node, text: str, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while text.encode() not in node.log.read_bytes()[node.log_start :]:
        assert time.monotonic() < deadline, f"{node.name} never logged {text!r}:\n{node.log.read_text()[-2000:]}"
        time.sleep(0.2)


def test_noisy_node_is_challenged_and_slashed_by_the_verifiers_even_if_their_votes_fail_and_one_restarts(market):
    """The verifiers first hold no gas money, so their commitVote fails; one restarts while its vote is pending. Each
    vote is sent again once it can be, with the verdict and salt kept across the restart, and none is penalized."""
    verifiers = ["b1", "b2", "b3"]
    set_gas_money(market, verifiers, 0)
    market.new_account("cheat", tokens=100 * 10**18)
    market.node_port("cheat")
    market.cli("cheat", "node", "register", "--model", MODEL, "--layers", "2:4", "--price", "1raw", "--stake", "100e18")
    market.start_node("cheat", "--cheat-noise", "0.1")  # the cheapest node of its range: every route uses it

    async def scenario():
        model = await auditing_client(market, "checking-client", rate=1.0)
        await generate(model, PROMPT, 4)
        await model.auditor.wait()
        return model.auditor

    auditor = asyncio.run(scenario())
    challenges = [f for f in auditor.findings if f.kind == "challenge"]
    assert [f.node for f in challenges] == [market.accounts["cheat"]]  # only the cheater is accused
    for name in verifiers:
        wait_for_log(market.nodes[name], "not enough gas money")
    market.stop_node("b2")
    wait_for_log(market.start_node("b2"), "verifier state: 1 ballot(s)")  # its pending vote, from its data folder
    set_gas_money(market, verifiers, 10**19)
    with market.acting_as("cheat"):
        chain = Market.connect(load_config().chain)
    dispute_id = challenges[0].dispute_id
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        status = chain.read(chain.disputes.functions.getDispute(dispute_id)).status
        if status != DisputeStatus.OPEN:
            break
        time.sleep(0.5)
    assert status == DisputeStatus.NODE_SLASHED
    assert all(chain.read(chain.disputes.functions.ballotOf(dispute_id, market.accounts[name])).revealed for name in verifiers)
    assert stake_of(market, "cheat") == 50 * 10**18  # wrongOutputSlashBps = 50 %
    assert all(stake_of(market, name) == 100 * 10**18 for name, _, _, _ in NODES)
    # the challenger's bond and reward wait as a credit until it withdraws them
    challenger = market.accounts["checking-client"]
    credit = chain.read(chain.disputes.functions.creditOf(challenger))
    assert credit == 10 * 10**18 + 25 * 10**18  # the bond, and rewardBps (50 %) of the 50 tokens slashed
    wallet = chain.read(chain.token.functions.balanceOf(challenger))
    assert market.cli("checking-client", "client", "withdraw-credit") == 0
    assert chain.read(chain.token.functions.balanceOf(challenger)) == wallet + credit
    market.stop_node("cheat")


def test_equivocating_node_is_slashed(market):
    market.new_account("twofaced", tokens=100 * 10**18)
    market.node_port("twofaced")
    market.cli("twofaced", "node", "register", "--model", MODEL, "--layers", "4:5", "--price", "5000raw", "--stake", "100e18")
    node = market.start_node("twofaced", "--test-fault", "equivocate")

    async def scenario():
        model = await auditing_client(market, "witness", rate=0.0)
        target = next(n for n in model.nodes if n.url == node.url)
        session = one_hop_session(model, target)
        hop = (await session._open_hops([target]))[0]
        hidden = torch.randn(1, 3, target.hidden_size)
        session.pay([(target, 3)])
        for _ in range(2):  # the second is a retry: the node answers differently and signs it again
            hop.history, hop.next_position = EMPTY_HISTORY, 0  # step 0 again, after no earlier input
            _, check = await session._step(hop, 0, 0, hidden, None)
            await check()
        await session.close()
        await model.auditor.wait()
        return model.auditor

    auditor = asyncio.run(scenario())
    assert [f.kind for f in auditor.findings] == ["equivocation"]
    assert stake_of(market, "twofaced") == 0
    market.stop_node("twofaced")


def test_a_request_id_reused_across_a_node_restart_gives_no_slashable_evidence(market):
    """Issue 18's attack: a client runs request R on node c (step 0: A, step 1: X), c restarts (forgetting every
    request id), the client opens R again (step 0: B, step 1: X). c honestly answers step 1 differently (its KV cache
    differs). Both step-1 commitments name R, step 1 and X's hash, but also the session nonce c chose and the history:
    the auditor sees no equivocation, and the contract refuses the pair."""
    name = "c"
    target_url = market.nodes[name].url
    same = torch.randn(1, 1, 64)

    async def session(request_id: bytes, first: torch.Tensor):
        model = await auditing_client(market, "reuser", rate=0.0)
        target = next(n for n in model.nodes if n.url == target_url)
        session = one_hop_session(model, target)
        session.request_id = request_id
        hop = (await session._open_hops([target]))[0]
        for step, (position, hidden) in enumerate([(0, first), (first.shape[1], same)]):
            session.pay([(target, hidden.shape[1])])
            _, check = await session._step(hop, step, position, hidden, None)
            await check()
        await session.close()
        await model.auditor.wait()
        return model.auditor, session.commitments[-1][1]

    request_id = os.urandom(32)
    auditor_a, a = asyncio.run(session(request_id, torch.randn(1, 3, 64)))
    market.stop_node(name)
    market.start_node(name)
    auditor_b, b = asyncio.run(session(request_id, torch.randn(1, 2, 64)))
    ca, cb = a.commitment, b.commitment
    assert (ca.context.request_id, ca.context.step, ca.context.input_hash) == (cb.context.request_id, 1, cb.context.input_hash)
    assert ca.output_hash != cb.output_hash  # two honest, different answers
    assert ca.context.session_nonce != cb.context.session_nonce and ca.context.history_hash != cb.context.history_hash
    assert auditor_a.findings == auditor_b.findings == []
    with market.acting_as("reuser"):
        chain = Market.connect(load_config().chain, auditor_b.market.account)
    call = chain.disputes.functions.slashEquivocation(ca.as_tuple(), a.signature, cb.as_tuple(), b.signature)
    with pytest.raises(ChainError, match="NotEquivocation"):
        chain.transact(call, "reporting the two honest answers as equivocation")
    assert stake_of(market, name) == 100 * 10**18


def test_a_dispute_its_challenger_leaves_undrawn_is_drawn_by_the_slices_nodes(market):
    """Nobody can wait for the draw block's hash to expire (and be drawn again): a few blocks on, the nodes serving the
    commitment's slice draw the panel themselves; here they find the junk evidence unreadable and acquit the node."""
    from shardmarket.chain import eip712
    from shardmarket.chain.keys import load_account
    from shardmarket.cli.devmarket import PASSWORD
    from shardmarket.cli.keys import home_keys

    market.new_account("accused", tokens=100 * 10**18)
    market.node_port("accused")
    market.cli("accused", "node", "register", "--model", MODEL, "--layers", "2:4", "--price", "1raw", "--stake", "100e18")
    market.new_account("idle-challenger", tokens=10 * 10**18)
    with market.acting_as("accused"):
        accused = load_account(PASSWORD, home_keys())
    with market.acting_as("idle-challenger"):
        chain = Market.connect(load_config().chain, load_account(PASSWORD, home_keys()))
    context = eip712.StepContext(chain.model_id(MODEL), 2, 4, os.urandom(32), os.urandom(32), 0, 0, EMPTY_HISTORY, bytes(32))
    commitment = eip712.Commitment(context, b"\x01" * 32, chain.w3.eth.get_block("latest")["timestamp"])
    signature = eip712.sign_commitment(accused.key, commitment, chain.dispute_domain())
    disputes = chain.disputes.functions
    chain.transact(chain.token.functions.approve(chain.disputes.address, 10 * 10**18), "approving the bond")
    receipt = chain.transact(
        disputes.challenge(accused.address, commitment.as_tuple(), signature, "ipfs://bafkqaaa"), "challenging"
    )
    dispute_id = chain.disputes.events.DisputeOpened().process_receipt(receipt, errors=DISCARD)[0]["args"]["disputeId"]
    for _ in range(4):  # blocks come; the challenger never draws
        market.w3.provider.make_request("evm_mine", [])
    deadline = time.monotonic() + 120
    while (status := chain.read(disputes.getDispute(dispute_id)).status) in (DisputeStatus.DRAWING, DisputeStatus.OPEN):
        assert time.monotonic() < deadline, f"dispute {dispute_id} still {DisputeStatus(status).name} after 120 s"
        time.sleep(0.5)
    assert status == DisputeStatus.CHALLENGER_LOST
    assert stake_of(market, "accused") == 100 * 10**18
