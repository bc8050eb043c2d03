"""The paid market end to end on a real anvil with real node processes."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest
import torch

from shardmarket.chain.contracts import Market
from shardmarket.chain.keys import load_account
from shardmarket.cli.devmarket import PASSWORD
from shardmarket.cli.keys import home_keys
from shardmarket.client.session import RequestRefused
from shardmarket.config import load_config
from shardmarket.engine.head import Head
from shardmarket.engine.sampling import SamplingParams
from shardmarket.engine.sampling import generate as local_generate
from shardmarket.engine.stage import Stage

from .conftest import PRICE, RANGES, client_model, generate

PROMPT = [1, 5, 9, 2, 7]


def chain_as(market, name: str) -> Market:
    with market.acting_as(name):
        return Market.connect(load_config().chain, load_account(PASSWORD, home_keys()))


def paid_on_chain(chain: Market, client: str, node: str) -> int:
    """What the escrow has paid `node` on `client`'s tabs (from the client's last TabSettled)."""
    from shardmarket.server.settlement import paid_vector_on_chain

    paid, _ = paid_vector_on_chain(chain, client)
    return next((e.amount for e in paid if e.node.lower() == node.lower()), 0)


def test_pay_per_request_over_three_nodes(market, capsys):
    model = asyncio.run(client_model(market, "alice"))
    tokens, completion = asyncio.run(generate(model, PROMPT, 6))
    head = Head.load(market.checkpoint)
    stage = Stage.load(market.checkpoint, 0, head.num_layers)
    stage.open_session("local", 64)
    local = list(local_generate(head, lambda h, p: stage.step("local", h, p), PROMPT, SamplingParams(max_tokens=6)))
    assert tokens == local
    processed = len(PROMPT) + len(tokens) - 1  # the last sampled token is never sent through the layers
    assert completion.cost == len(RANGES) * PRICE * processed
    alice = market.accounts["alice"]
    chain = chain_as(market, "alice")
    escrow_before = chain.read(chain.escrow.functions.balanceOf(alice))
    for name in ("node0", "node1", "node2"):
        market.cli(name, "node", "redeem")  # the first settles alice's tab for all three; the others find it settled
        assert paid_on_chain(chain, alice, market.accounts[name]) == PRICE * processed
    settlements = chain.escrow.events.TabSettled.get_logs(from_block=0, argument_filters={"client": alice})
    assert len(settlements) == 1  # one signature, one settlement, three nodes paid
    capsys.readouterr()
    market.cli("node2", "node", "earnings", "--raw")
    row = next(line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(alice))
    assert [int(x) for x in row[2:]] == [
        PRICE * processed,
        PRICE * processed,
        PRICE * processed,
        0,
        0,
    ]  # served, promised, redeemed, unconfirmed, pending
    assert escrow_before - chain.read(chain.escrow.functions.balanceOf(alice)) == completion.cost


def test_client_that_stops_paying_gets_no_more_than_its_credit_limit(market):
    async def scenario():
        model = await client_model(market, "mallory")
        honest = model.tab_source
        first: list = []

        def stale(charges, request_id):  # pays the first step, then repeats that tab forever
            if not first:
                first.append(honest(charges, request_id))
            return first[0]

        model.tab_source = stale
        with pytest.raises(RequestRefused, match="payment_required"):  # every node of a span declined it in turn
            await generate(model, PROMPT, 200)
        assert model.failed.current() == set()  # an unpaid request is no node's fault: no node is avoided for others

    asyncio.run(scenario())
    from shardmarket.server.tabs import TabStore, tab_store_path

    credit = 64 * PRICE
    for name in ("node0", "node1", "node2"):
        with market.acting_as(name):
            store = TabStore(tab_store_path(load_config().node.data_dir), market.accounts[name])
        stored = store.get(market.accounts["mallory"])
        assert stored.entry == PRICE * len(PROMPT)  # only the first step was paid
        assert stored.entry < stored.served <= stored.entry + credit


def test_withdrawal_request_triggers_redemption(market):
    model = asyncio.run(client_model(market, "carol"))
    _, completion = asyncio.run(generate(model, PROMPT, 3))
    carol = market.accounts["carol"]
    chain = chain_as(market, "carol")
    balance = chain.read(chain.escrow.functions.balanceOf(carol))
    chain.transact(chain.escrow.functions.requestWithdrawal(balance), "requesting a withdrawal")
    deadline = time.monotonic() + 30
    paid = 0
    while time.monotonic() < deadline and paid < completion.cost:
        paid = sum(paid_on_chain(chain, carol, market.accounts[n]) for n in ("node0", "node1", "node2"))
        time.sleep(0.5)
    assert paid == completion.cost  # the nodes settled before the timelock, without being asked


def test_kill_9_between_ack_and_settlement_loses_nothing(market):
    model = asyncio.run(client_model(market, "dave"))
    _, completion = asyncio.run(generate(model, PROMPT, 4))
    market.stop_node("node1", signal.SIGKILL)
    market.start_node("node1")
    market.cli("node1", "node", "redeem")
    chain = chain_as(market, "dave")
    for name in ("node0", "node1", "node2"):  # node1's tab, kept through the kill, paid every node
        assert paid_on_chain(chain, market.accounts["dave"], market.accounts[name]) == completion.cost // len(RANGES)


def test_chain_down_and_back_loses_nothing(market, capsys):
    model = asyncio.run(client_model(market, "erin"))
    _, first = asyncio.run(generate(model, PROMPT, 2))
    market.stop_chain()
    try:
        _, second = asyncio.run(generate(model, PROMPT, 4))  # nodes keep serving a client whose balance they know
        with pytest.raises(RuntimeError):
            market.cli("node0", "node", "redeem")
        assert "cannot reach the chain" in capsys.readouterr().err
    finally:
        market.restart_chain()
    market.cli("node0", "node", "redeem")
    chain = chain_as(market, "erin")
    assert paid_on_chain(chain, market.accounts["erin"], market.accounts["node0"]) == (first.cost + second.cost) // len(RANGES)


def test_operator_mistakes_get_clear_errors_and_change_nothing(market, capsys):
    import os

    from shardmarket.cli import main

    market.new_account("newbie", tokens=10**18)
    market.node_port("newbie")
    cases = [
        (["--model", "nope", "--layers", "0:2", "--stake", "100e18"], "unknown model 'nope'"),
        (["--model", "tiny", "--layers", "0:9", "--stake", "100e18"], "outside the model"),
        (["--model", "tiny", "--layers", "0:2", "--stake", "1e18"], "too little stake"),
    ]
    for argv, message in cases:
        with pytest.raises(RuntimeError):
            market.cli("newbie", "node", "register", "--price", "1raw", *argv)
        assert message in capsys.readouterr().err
    market.new_account("broke", eth=0, tokens=100 * 10**18)
    market.node_port("broke")
    with pytest.raises(RuntimeError):
        market.cli("broke", "node", "register", "--model", "tiny", "--layers", "0:2", "--price", "1raw", "--stake", "100e18")
    assert "not enough gas money" in capsys.readouterr().err
    with market.acting_as("newbie"):
        os.environ["SHARDMARKET_CHAIN_RPC_URL"] = "http://127.0.0.1:9"
        assert main(["node", "status"]) == 1
    assert "cannot reach the chain at http://127.0.0.1:9" in capsys.readouterr().err
    chain = chain_as(market, "newbie")
    for name in ("newbie", "broke"):
        assert chain.read(chain.stake.functions.totalStakeOf(market.accounts[name])) == 0
        assert not chain.read(chain.registry.functions.isListed(market.accounts[name]))


def test_a_refused_step_is_never_answered_even_on_retry(market):
    from shardmarket.client.session import InferenceSession, NodeFailure

    async def scenario():
        model = await client_model(market, "frank")
        node = next(n for n in model.nodes if n.start == 0)

        def forged(charges, request_id):  # a valid tab whose signature was tampered with
            tab = bytearray(model.tab_source(charges, request_id))
            tab[60] ^= 0xFF  # a byte of r
            return bytes(tab)

        session = InferenceSession([node], model.head.num_layers, model.domain, max_length=8, tab_source=forged)
        hop = (await session._open_hops([node]))[0]
        hidden = torch.randn(1, 2, node.hidden_size)
        session.pay([(node, 2)])
        with pytest.raises(NodeFailure, match=r"signature is invalid|signed by"):
            await session._step(hop, 0, 0, hidden, None)
        with pytest.raises(NodeFailure, match="no open session"):
            await session._step(hop, 0, 0, hidden, None)  # the computed answer was thrown away with the session
        await session.close()

    asyncio.run(scenario())


def test_a_paid_node_opens_a_session_for_a_funded_tab_or_within_a_small_unpaid_allowance(market):
    """Without a tab an address gets unpaid_sessions_per_address (2) sessions and no more; a tab on OPEN counts only if
    its signature holds and its client has something to spend in the escrow; a funded client's tab opens a session
    beyond the strangers' allowance at the same address, and its requests go through as before."""
    from eth_account import Account

    from shardmarket.chain.eip712 import Entry, Tab, pack_tab, sign_tab, signing_key
    from shardmarket.net import wire
    from shardmarket.net.channel import client_handshake, open_transport
    from shardmarket.net.wire import Message

    async def scenario():
        model = await client_model(market, "judy")
        node = next(n for n in model.nodes if n.start == 0)
        funded = model.payer.standing(node)
        key = os.urandom(32)
        tab = Tab(Account.from_key(key).address, 1, (Entry(node.operator, 0),), bytes(32))
        unfunded = pack_tab(tab, sign_tab(signing_key(key), tab, model.payer.domain))
        forged = bytearray(funded)
        forged[60] ^= 0xFF  # a byte of r

        async def open_with(tab: bytes | None):
            transport = await open_transport(node.url, "tcp", node.tcp_port, wire.DEFAULT_LIMITS, 10)
            channel = await client_handshake(transport, node.x25519_public_key)
            fields = {"max_length": 16} if tab is None else {"max_length": 16, "tab": tab}
            await channel.send(Message(wire.OPEN, os.urandom(32), 0, fields))
            reply = await channel.recv()
            return channel, reply.fields.get("code", reply.type)

        opened = [await open_with(tab) for tab in (None, None, None, unfunded, bytes(forged), funded)]
        tokens, _ = await generate(model, PROMPT, 3)  # while the strangers' sessions stay open
        for channel, _ in opened:
            await channel.close()
        return [code for _, code in opened], tokens

    codes, tokens = asyncio.run(scenario())
    assert codes == ["opened", "opened", "payment_required", "insufficient_funds", "bad_tab", "opened"]
    assert len(tokens) == 3


def test_a_bad_tab_on_a_later_step_is_answered_on_credit_then_refused_in_place_of_the_commitment(market):
    from shardmarket.client.session import CommitmentFailure, InferenceSession, NodeFailure
    from shardmarket.server.tabs import TabStore, tab_store_path

    async def scenario():
        model = await client_model(market, "grace")
        node = next(n for n in model.nodes if n.start == 0)
        signed: list[bytes] = []

        def forged_after_the_first(charges, request_id):  # the first step pays; later tabs are tampered with
            tab = bytearray(model.tab_source(charges, request_id))
            if signed:
                tab[60] ^= 0xFF  # a byte of r
            signed.append(bytes(tab))
            return bytes(tab)

        session = InferenceSession([node], model.head.num_layers, model.domain, max_length=8, tab_source=forged_after_the_first)
        hop = (await session._open_hops([node]))[0]
        session.pay([(node, 2)])
        _, check = await session._step(hop, 0, 0, torch.randn(1, 2, node.hidden_size), None)
        await check()
        session.pay([(node, 1)])
        hidden = torch.randn(1, 1, node.hidden_size)
        _, check = await session._step(hop, 1, 2, hidden, None)  # run on the credit the first tab left
        with pytest.raises(CommitmentFailure, match=r"refused after its answer.*(signature is invalid|signed by)"):
            await check()
        with pytest.raises(NodeFailure, match="no open session"):
            await session._step(hop, 1, 2, hidden, None)  # the session went with the refused tab
        await session.close()
        return node

    node = asyncio.run(scenario())
    name = next(n for n in ("node0", "node1", "node2") if market.accounts[n].lower() == node.operator.lower())
    with market.acting_as(name):
        stored = TabStore(tab_store_path(load_config().node.data_dir), node.operator).get(market.accounts["grace"])
    assert (stored.entry, stored.served) == (2 * PRICE, 3 * PRICE)  # the answered step stands against grace's credit


def _tab(account, seq: int, amounts: dict[str, int]):
    from shardmarket.chain.eip712 import Entry, Tab

    return Tab(
        account.address, seq, tuple(Entry(n, a) for n, a in sorted(amounts.items(), key=lambda i: int(i[0], 16))), bytes(32)
    )


@pytest.mark.parametrize("lowered", [False, True], ids=["short-then-topped-up", "client-lowered-the-entry"])
def test_a_node_holding_an_older_tab_collects_through_the_newer_one_or_claims_a_lowered_entry(market, tmp_path, lowered):
    """Another node settled the client's newer tab short: this node reads that tab back from the settlement's
    calldata and collects the rest once the client tops up; a newer tab promising it less leaves the older tab to
    claim: what the balance holds at once, the rest after a deposit."""
    from shardmarket.chain.eip712 import pack_tab, sign_tab
    from shardmarket.server.settlement import settle_pending
    from shardmarket.server.tabs import TabStore

    name = f"ivan-{lowered}"
    market.new_account(name, tokens=10**18)
    market.cli(name, "client", "deposit", "15raw")
    with market.acting_as(name):
        client = load_account(PASSWORD, home_keys())
    first, second = sorted((market.accounts["node0"], market.accounts["node1"]), key=lambda a: int(a, 16))
    holder = chain_as(market, "node1" if second == market.accounts["node1"] else "node0")  # paid last, so paid short
    domain = holder.escrow_domain()
    older = _tab(client, 1, {first: 1, second: 8})
    newer = _tab(client, 2, {first: 10, second: 2 if lowered else 10})
    store = TabStore(tmp_path / f"{name}.sqlite", second)
    store.record(older, sign_tab(client.key, older, domain), 8)
    holder.transact(holder.escrow.functions.settleTabs(pack_tab(newer, sign_tab(client.key, newer, domain))), "settling")
    assert paid_on_chain(holder, client.address, second) == (2 if lowered else 5)  # 15 - 10 paid to the first

    def claims() -> list:
        return holder.escrow.events.Claimed.get_logs(from_block=0, argument_filters={"client": client.address})

    if lowered:
        assert settle_pending(holder, store) == [] and paid_on_chain(holder, client.address, second) == 5  # the 3 left
        assert settle_pending(holder, store) == [] and len(claims()) == 1  # an empty balance: no claim is sent
    market.cli(name, "client", "deposit", "100raw")
    settlements = settle_pending(holder, store)
    if lowered:
        assert settlements == [] and paid_on_chain(holder, client.address, second) == 8 and len(claims()) == 2
        assert [(c.tab_seq, c.amount, c.lowered) for c in store.claims()] == [(1, 3, True), (1, 3, True)]
        assert store.get(client.address).owed == 0
        assert settle_pending(holder, store) == [] and len(claims()) == 2  # nothing owed: nothing more is claimed
    else:
        assert [s.paid for s in settlements] == [5] and paid_on_chain(holder, client.address, second) == 10
        assert store.get(client.address).tab == newer


def test_a_client_that_lowers_a_node_entry_and_settles_it_itself_still_pays_that_node(market, capsys):
    """Served by the node processes, the client signs a newer tab cutting node1's entry to a quarter and settles it
    itself; `node redeem` on node1 claims its held tab and node1 is paid all that tab promised."""
    from shardmarket.chain.eip712 import Entry, Tab, pack_tab, sign_tab
    from shardmarket.server.tabs import TabStore, tab_store_path

    model = asyncio.run(client_model(market, "lucy"))
    asyncio.run(generate(model, PROMPT, 4))
    lucy, node = market.accounts["lucy"], market.accounts["node1"]
    with market.acting_as("node1"):
        held = TabStore(tab_store_path(load_config().node.data_dir), node).get(lucy)
    promised = held.entry
    assert promised > 0 and held.owed == promised
    lowering = Tab(
        lucy,
        held.tab.seq + 1,
        tuple(Entry(e.node, e.amount // 4 if e.node.lower() == node.lower() else e.amount) for e in held.tab.entries),
        held.tab.usage_hash,
    )
    chain = chain_as(market, "lucy")
    with market.acting_as("lucy"):
        key = load_account(PASSWORD, home_keys()).key
    chain.transact(
        chain.escrow.functions.settleTabs(pack_tab(lowering, sign_tab(key, lowering, chain.escrow_domain()))),
        "the client settling its own lowering tab",
    )
    assert paid_on_chain(chain, lucy, node) == promised // 4
    capsys.readouterr()
    market.cli("node1", "node", "redeem", "--raw")
    market.cli("node1", "node", "earnings", "--raw")
    out = capsys.readouterr().out
    assert paid_on_chain(chain, lucy, node) == promised
    row = next(line.split() for line in out.splitlines() if line.startswith(lucy))
    assert [int(x) for x in row[3:]] == [promised, promised, 0, 0]  # promised, redeemed, unconfirmed, pending
    claim = f"claim on client {lucy.lower()}'s tab {held.tab.seq} (it had settled a newer tab promising this node less) "
    assert f"{claim}collected {promised - promised // 4}, 0 of it out of its reserve for this node" in out


def test_a_client_that_drains_its_balance_to_an_alias_still_pays_every_node_what_it_acknowledged(market, capsys):
    """Served by the node processes within the reserves its client software set aside, the client signs a newer tab
    paying an alias its whole balance and dropping the nodes, settles it itself, and the alias withdraws at once. Each
    node's `node redeem` claims the tab it acknowledged, out of its reserve: every node is paid all it was promised."""
    from eth_account import Account

    from shardmarket.chain.eip712 import Entry, Tab, pack_tab, sign_tab
    from shardmarket.server.tabs import TabStore, tab_store_path

    model = asyncio.run(client_model(market, "oscar"))
    _, completion = asyncio.run(generate(model, PROMPT, 3))
    oscar, names = market.accounts["oscar"], ("node0", "node1", "node2")
    held = {}
    for name in names:
        with market.acting_as(name):
            held[name] = TabStore(tab_store_path(load_config().node.data_dir), market.accounts[name]).get(oscar)
    assert sum(h.entry for h in held.values()) == completion.cost
    chain = chain_as(market, "oscar")
    alias = Account.create()
    market.fund(alias.address, 1.0, 0)
    balance = chain.read(chain.escrow.functions.balanceOf(oscar))
    drain = Tab(oscar, max(h.tab.seq for h in held.values()) + 1, (Entry(alias.address, balance),), bytes(32))
    with market.acting_as("oscar"):
        key = load_account(PASSWORD, home_keys()).key
    chain.transact(chain.escrow.functions.settleTabs(pack_tab(drain, sign_tab(key, drain, chain.escrow_domain()))), "draining")
    assert chain.read(chain.escrow.functions.balanceOf(oscar)) == 0
    as_alias = Market(chain.w3, chain.addresses, Account.from_key(alias.key))
    as_alias.transact(as_alias.escrow.functions.withdrawEarnings(alias.address), "the alias withdrawing at once")
    for name in names:
        capsys.readouterr()
        market.cli(name, "node", "redeem", "--raw")
        assert paid_on_chain(chain, oscar, market.accounts[name]) == held[name].entry
        assert f"{held[name].entry} of it out of its reserve for this node" in capsys.readouterr().out
    claims = chain.escrow.events.Claimed.get_logs(from_block=0, argument_filters={"client": oscar})
    assert sorted(c["args"]["fromReserve"] for c in claims) == sorted(h.entry for h in held.values())


def test_a_settlement_the_chain_forgets_is_no_longer_redeemed_and_is_settled_again(market, capsys, monkeypatch):
    """A settlement counts as redeemed once `confirmations` blocks are on top of it. Then the chain goes back to a
    state from before it (anvil_revert, as a reorg or a dev chain restarted from an older state would): `node earnings`
    shows it pending again, and the node daemons settle it again."""
    from shardmarket.server.tabs import TabStore, tab_store_path

    model = asyncio.run(client_model(market, "rita"))
    _, completion = asyncio.run(generate(model, PROMPT, 3))
    rita, w3 = market.accounts["rita"], market.w3
    owed = completion.cost // len(RANGES)
    chain = chain_as(market, "rita")

    said: list[str] = []

    def earnings(name: str) -> list[int]:
        capsys.readouterr()
        market.cli(name, "node", "earnings", "--raw")
        out = capsys.readouterr()
        said.append(out.err)
        row = next(line.split() for line in out.out.splitlines() if line.startswith(rita))
        return [int(x) for x in row[4:]]  # redeemed, unconfirmed, pending

    def redeemed_in_store(name: str) -> int:
        with market.acting_as(name):
            return TabStore(tab_store_path(load_config().node.data_dir), market.accounts[name]).get(rita).redeemed

    snapshot = w3.provider.make_request("anvil_snapshot", [])["result"]
    monkeypatch.setenv("SHARDMARKET_CHAIN_CONFIRMATIONS", "2")
    market.cli("node0", "node", "redeem")  # settles rita's tab for all three nodes, then withdraws node0's earnings
    assert paid_on_chain(chain, rita, market.accounts["node0"]) == owed
    assert earnings("node0") == [0, owed, 0]  # one block on top of the settlement: not final yet
    w3.provider.make_request("evm_mine", [])
    assert earnings("node0") == [owed, 0, 0]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and redeemed_in_store("node1") < owed:  # node1's daemon reads the settlement
        w3.provider.make_request("evm_mine", [])
        time.sleep(0.5)
    assert redeemed_in_store("node1") == owed
    assert w3.provider.make_request("anvil_revert", [snapshot])["result"]
    for _ in range(4):  # past the forgotten blocks' height, so only their hashes tell that the chain changed
        w3.provider.make_request("evm_mine", [])
    assert paid_on_chain(chain, rita, market.accounts["node0"]) == 0
    assert earnings("node0") == [0, 0, owed]  # the lost settlement is pending again
    assert "the chain forgot blocks" in said[-1]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and paid_on_chain(chain, rita, market.accounts["node1"]) < owed:
        time.sleep(0.5)
    assert [paid_on_chain(chain, rita, market.accounts[n]) for n in ("node0", "node1", "node2")] == [owed] * 3
    for _ in range(2):
        w3.provider.make_request("evm_mine", [])
    assert earnings("node0") == [owed, 0, 0]


def test_the_duties_block_watch_reads_the_chain_shares_a_recent_read_waits_while_serving_and_says_when_the_chain_is_down(market):
    from shardmarket.chain.contracts import ChainError
    from shardmarket.chain.watch import BlockWatch

    chain = chain_as(market, "node0")

    async def scenario():
        watch = BlockWatch(chain.w3.provider.endpoint_uri)
        first = await watch.latest()
        assert first == chain.w3.eth.block_number
        chain.w3.provider.make_request("evm_mine", [])
        assert await watch.latest(max_age_s=60) == first  # read less than a minute ago: no call
        assert await watch.latest() == first + 1
        await watch.close()
        steps = [0]
        busy = BlockWatch(chain.w3.provider.endpoint_uri, steps_served=lambda: steps[0], busy_age_s=60)
        assert await busy.latest() == first + 1
        chain.w3.provider.make_request("evm_mine", [])
        steps[0] += 1  # the node is serving: a read less than a minute old will do
        assert await busy.latest() == first + 1
        busy.busy_s = 0.0  # ... until it stops
        assert await busy.latest() == first + 2
        await busy.close()
        down = BlockWatch(f"http://127.0.0.1:{_closed_port()}")
        with pytest.raises(ChainError, match="cannot read the newest block"):
            await down.latest()
        await down.close()

    asyncio.run(scenario())


def _closed_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_speculative_steps_pay_every_position_each_node_computes_rejected_drafts_included(market, capsys):
    """Draft tokens ride on the decode steps (the model's own greedy continuation with its last token spoiled, so every
    pass keeps some and rejects one): the text is the greedy text, each node is promised and serves price x every
    position it computed, and a spot check of every hop (re-run from the committed inputs, rollbacks and all) finds
    the honest nodes honest."""
    from shardmarket.engine.speculation import Draft, ModelDrafter

    head = Head.load(market.checkpoint)
    stage = Stage.load(market.checkpoint, 0, head.num_layers)

    class SpoiledLast:
        def __init__(self) -> None:
            self.drafter = ModelDrafter(head, stage, max_length=64)

        def propose(self, tokens, k):
            draft = self.drafter.propose(tokens, k)
            if len(draft.tokens) < 2:
                return draft
            return Draft([*draft.tokens[:-1], (draft.tokens[-1] + 1) % head.config.vocab_size])

        def close(self) -> None:
            self.drafter.close()

    async def speculate():
        model = await client_model(market, "sienna", spot_check_rate=1.0)
        model.max_draft, model.drafter = 4, SpoiledLast
        tokens, completion = await generate(model, PROMPT, 12)
        await model.auditor.wait()
        return tokens, completion, model.auditor

    tokens, completion, auditor = asyncio.run(speculate())
    assert auditor.checks == len(RANGES) and not auditor.findings
    stage.open_session("local", 64)
    assert tokens == list(local_generate(head, lambda h, p: stage.step("local", h, p), PROMPT, SamplingParams(max_tokens=12)))
    stats = completion.speculation
    assert stats is not None and 0 < stats.accepted < stats.drafted
    computed = len(PROMPT) + len(tokens) - 1 + stats.drafted - stats.accepted
    assert completion.computed_positions == computed
    assert completion.cost == len(RANGES) * PRICE * computed
    capsys.readouterr()
    sienna = market.accounts["sienna"]  # a client of its own: what it promised is this request alone
    for name in ("node0", "node1", "node2"):
        market.cli(name, "node", "earnings", "--raw")
        row = next(line.split() for line in capsys.readouterr().out.splitlines() if line.startswith(sienna))
        assert [int(x) for x in row[2:4]] == [PRICE * computed, PRICE * computed]  # served, promised
