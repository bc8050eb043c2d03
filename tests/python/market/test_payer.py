"""The client's tabs and the node's check of them: one signature per step covering every node, running totals
that survive a restart, and a gate that refuses what a node must not accept."""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass

import pytest
from eth_account import Account

from shardmarket.chain.eip712 import MAX_ENTRIES, Domain, Entry, Tab, pack_tab, recover_tab_signer, sign_tab, unpack_tab
from shardmarket.client.payer import Payer, TabFull
from shardmarket.server.payments import PaymentGate, PaymentRefused
from shardmarket.server.tabs import Claim, TabStore

DOMAIN = Domain(31337, "0x" + "22" * 20)


@dataclass
class _Node:
    operator: str
    price: int


def test_one_tab_per_step_covers_every_node_signs_like_eip712_and_survives_a_restart(tmp_path):
    account = Account.create()
    a, b = _Node(Account.create().address, 7), _Node(Account.create().address, 3)
    payer = Payer(account, DOMAIN, tmp_path / "ledger.sqlite")
    payer.tab([(a, 10), (b, 10)], b"\x01" * 32)
    tab, signature, previous = unpack_tab(payer.tab([(a, 1), (b, 1)], b"\x01" * 32))
    assert previous == () and tab.seq == 2
    assert tab.entries == tuple(sorted([Entry(a.operator, 77), Entry(b.operator, 33)], key=lambda e: int(e.node, 16)))
    assert signature == sign_tab(account.key, tab, DOMAIN)
    assert recover_tab_signer(tab, signature, DOMAIN) == account.address
    assert payer.request_costs[b"\x01" * 32] == 110
    payer.close()
    again = Payer(account, DOMAIN, tmp_path / "ledger.sqlite")
    tab, _, _ = unpack_tab(again.tab([(a, 1)], bytes(32)))
    assert (tab.seq, tab.amount_for(a.operator), tab.amount_for(b.operator)) == (3, 84, 33)  # never less than before
    assert again.tab([(_Node(a.operator, 0), 5)], bytes(32)) is None  # a free step needs no tab


def test_a_client_past_the_node_cap_gets_a_clear_error_and_signs_nothing(tmp_path):
    payer = Payer(Account.create(), DOMAIN, tmp_path / "ledger.sqlite")
    nodes = [_Node(Account.create().address, 1) for _ in range(MAX_ENTRIES + 1)]
    payer.tab([(n, 1) for n in nodes[:MAX_ENTRIES]], bytes(32))
    with pytest.raises(TabFull, match="escrow's cap of 32"):
        payer.tab([(nodes[-1], 1)], bytes(32))
    assert payer.promised(nodes[-1].operator) == 0


def _gate(tmp_path, node: str, balance: int, credit: int = 10, reserve: int | None = None) -> PaymentGate:
    """A gate whose clients hold `balance` and reserve `reserve` (default: the balance) for this node."""

    async def credit_of(client: str) -> tuple[int, int]:
        return balance, balance if reserve is None else reserve

    return PaymentGate(TabStore(tmp_path / "tabs.sqlite", node), node, 1, DOMAIN, credit, credit_of)


def _signed(client, seq: int, amounts: dict[str, int], signer=None) -> bytes:
    tab = Tab(client.address, seq, tuple(Entry(n, a) for n, a in sorted(amounts.items(), key=lambda i: int(i[0], 16))), bytes(32))
    return pack_tab(tab, sign_tab((signer or client).key, tab, DOMAIN))


async def _step() -> str:
    return "answer"


async def _pay(gate: PaymentGate, tokens: int, raw: bytes | None, session: bytes | None = None):
    """One step through the gate as a node runs it: admitted, answered, acknowledged; returns its Credit (None: the tab
    was checked before the answer)."""
    fields = {} if raw is None else {"tab": raw}
    answer, credit = await gate.admit(session or os.urandom(32), tokens, fields, _step)
    assert answer == "answer"
    assert await gate.acknowledge(credit, lambda: "commitment") == "commitment"
    return credit


def test_the_gate_accepts_a_covering_tab_and_stores_the_newest(tmp_path):
    client, node, other = Account.create(), Account.create().address, Account.create().address
    gate = _gate(tmp_path, node, balance=1000)
    session = b"\x01" * 32

    async def steps():
        assert await _pay(gate, 5, _signed(client, 1, {node: 5, other: 5})) is None  # reads the balance first
        assert await _pay(gate, 5, _signed(client, 2, {node: 10, other: 10}), session) is None  # a known client: on a thread
        assert await _pay(gate, 5, _signed(client, 3, {node: 15, other: 15}), session) is not None  # its session: on credit

    asyncio.run(steps())
    stored = TabStore(tmp_path / "tabs.sqlite", node).get(client.address)
    assert (stored.tab.seq, stored.entry, stored.served, stored.unpaid_total) == (3, 15, 15, 30)


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("tampered", "bad_tab"),
        ("forged", "bad_tab"),
        ("beyond-credit", "payment_required"),
        ("beyond-balance", "insufficient_funds"),
        ("beyond-reserve", "reserve_required"),
        ("lowered", "bad_tab"),
        ("missing", "payment_required"),
    ],
)
def test_the_gate_refuses_what_a_node_must_not_accept(tmp_path, case, code):
    client, node, other = Account.create(), Account.create().address, Account.create().address
    gate = _gate(tmp_path, node, balance=100, reserve=5 if case == "beyond-reserve" else None)

    async def scenario():
        await _pay(gate, 5, _signed(client, 1, {node: 5}))
        raw = {
            "tampered": lambda: _signed(client, 2, {node: 10})[:-40] + b"\x00" * 40,
            "forged": lambda: _signed(client, 2, {node: 10}, signer=Account.create()),
            "beyond-credit": lambda: _signed(client, 2, {node: 5}),  # served 5 + 11 > promised 5 + credit 10
            "beyond-balance": lambda: _signed(client, 2, {node: 16, other: 200}),
            "beyond-reserve": lambda: _signed(client, 2, {node: 16}),  # owed 16 > reserve 5 + credit 10
            "lowered": lambda: _signed(client, 2, {node: 4}),
            "missing": lambda: None,
        }[case]()
        await _pay(gate, 11, raw)

    with pytest.raises(PaymentRefused) as refused:
        asyncio.run(scenario())
    assert TabStore(tmp_path / "tabs.sqlite", node).get(client.address).tab.seq == 1  # nothing refused was stored
    assert refused.value.code == code
    assert TabStore(tmp_path / "tabs.sqlite", node).get(client.address).served == 5  # nothing more was reserved


def test_the_gate_refuses_a_tab_the_escrow_would_reject_over_its_paid_vector(tmp_path):
    client, node, other = Account.create(), Account.create().address, Account.create().address
    gate = _gate(tmp_path, node, balance=1000)

    async def scenario():
        await _pay(gate, 5, _signed(client, 1, {node: 5, other: 5}))
        gate.settled(
            client.address,
            (Entry(node, 5), Entry(other, 5)) if int(node, 16) < int(other, 16) else (Entry(other, 5), Entry(node, 5)),
            1,
        )
        await _pay(gate, 5, _signed(client, 2, {node: 10}))  # drops a paid node

    with pytest.raises(PaymentRefused, match="already paid"):
        asyncio.run(scenario())


def test_the_gate_refuses_a_client_caught_lowering_its_entry_also_after_a_restart(tmp_path):
    client, honest, node = Account.create(), Account.create(), Account.create().address
    gate = _gate(tmp_path, node, balance=1000)

    def step(on: PaymentGate, who, seq: int):
        asyncio.run(_pay(on, 5, _signed(who, seq, {node: 5 * seq})))

    step(gate, client, 1)
    gate.refuse(client.address)  # what the settler does when it finds the client's lowering tab
    with pytest.raises(PaymentRefused) as refused:
        step(gate, client, 2)
    assert refused.value.code == "client_refused"
    gate.store.record_claim(Claim(client.address, 1, 5, 0, "0x" + "ab" * 32, lowered=True))
    restarted = _gate(tmp_path, node, balance=1000)
    with pytest.raises(PaymentRefused, match="no longer serves it"):
        step(restarted, client, 2)
    step(restarted, honest, 1)  # other clients are served as before


def test_a_sessions_later_steps_run_on_credit_and_their_tabs_are_checked_after(tmp_path):
    client, node = Account.create(), Account.create().address
    gate = _gate(tmp_path, node, balance=1000)
    session = b"\x01" * 32

    async def scenario():
        assert await _pay(gate, 5, _signed(client, 1, {node: 5}), session) is None  # checked first: names the payer
        assert await _pay(gate, 5, _signed(client, 2, {node: 10}), session) is not None
        stored = TabStore(tmp_path / "tabs.sqlite", node).get(client.address)
        assert (stored.tab.seq, stored.entry, stored.served) == (2, 10, 10)
        assert await _pay(gate, 11, _signed(client, 3, {node: 21}), session) is None  # 10 + 11 > 10 + credit 10
        assert await _pay(gate, 5, _signed(client, 4, {node: 26}), b"\x02" * 32) is None  # no checked tab named it
        with pytest.raises(PaymentRefused, match="paid by another client"):  # another payer: checked, and refused
            await _pay(gate, 5, _signed(Account.create(), 1, {node: 5}), session)
        with pytest.raises(PaymentRefused) as missing:
            await _pay(gate, 5, None, session)
        assert missing.value.code == "payment_required"

    asyncio.run(scenario())


@pytest.mark.parametrize(
    ("case", "code"),
    [
        ("tampered", "bad_tab"),
        ("forged", "bad_tab"),
        ("lowered", "bad_tab"),
        ("beyond-balance", "insufficient_funds"),
    ],
)
def test_a_bad_tab_on_credit_is_refused_and_its_answered_step_counts_against_the_credit(tmp_path, case, code):
    client, node, other = Account.create(), Account.create().address, Account.create().address
    gate = _gate(tmp_path, node, balance=100)
    session = b"\x01" * 32
    raw = {
        "tampered": lambda: _signed(client, 2, {node: 10})[:-40] + b"\x00" * 40,
        "forged": lambda: _signed(client, 2, {node: 10}, signer=Account.create()),
        "lowered": lambda: _signed(client, 2, {node: 4}),
        "beyond-balance": lambda: _signed(client, 2, {node: 10, other: 200}),
    }[case]()

    async def scenario():
        await _pay(gate, 5, _signed(client, 1, {node: 5}), session)
        answer, credit = await gate.admit(session, 5, {"tab": raw}, _step)
        assert answer == "answer" and credit is not None  # answered before its tab was checked
        with pytest.raises(PaymentRefused) as refused:
            await gate.acknowledge(credit, lambda: "commitment")
        assert refused.value.code == code
        stored = TabStore(tmp_path / "tabs.sqlite", node).get(client.address)
        assert (stored.tab.seq, stored.entry, stored.served) == (1, 5, 10)  # the old tab stays; the answered step is served
        assert await _pay(gate, 6, _signed(client, 3, {node: 16}), session) is None  # 10 + 6 > 5 + credit 10

    asyncio.run(scenario())


def test_a_tab_the_node_cannot_store_refuses_the_step_instead_of_answering_it_unpaid(tmp_path):
    client, node = Account.create(), Account.create().address
    gate = _gate(tmp_path, node, balance=1000)
    asyncio.run(_pay(gate, 5, _signed(client, 1, {node: 5})))
    gate.store.close()  # what a full disk or a broken database does to the next write

    with pytest.raises(PaymentRefused) as refused:
        asyncio.run(_pay(gate, 5, _signed(client, 2, {node: 10})))
    assert refused.value.code == "payment_unavailable"


def test_a_presigned_tab_is_sent_only_if_nothing_was_signed_since_and_promises_nothing_until_sent(tmp_path, monkeypatch):
    import shardmarket.client.payer as payer_module

    signings = []
    monkeypatch.setattr(payer_module, "sign_tab", lambda *args: signings.append(1) or sign_tab(*args))
    account = Account.create()
    a, b = _Node(Account.create().address, 7), _Node(Account.create().address, 3)
    payer = Payer(account, DOMAIN, tmp_path / "ledger.sqlite")
    payer.tab([(a, 2), (b, 2)], b"\x01" * 32)
    payer.presign([(a, 1), (b, 1)])
    assert len(signings) == 2
    sent = payer.tab([(a, 1), (b, 1)], b"\x01" * 32)
    assert len(signings) == 2  # sent as presigned: no signing on the step's path
    tab, signature, _ = unpack_tab(sent)
    assert (tab.seq, tab.amount_for(a.operator), tab.amount_for(b.operator)) == (2, 21, 9)
    assert recover_tab_signer(tab, signature, DOMAIN) == account.address
    payer.presign([(a, 1), (b, 1)])
    other = unpack_tab(payer.tab([(a, 5)], b"\x02" * 32))[0]  # another request signs first
    assert (other.seq, other.amount_for(a.operator), other.amount_for(b.operator)) == (3, 56, 9)
    tab = unpack_tab(payer.tab([(a, 1), (b, 1)], b"\x01" * 32))[0]  # so the presigned tab is not sent
    assert (tab.seq, tab.amount_for(a.operator), tab.amount_for(b.operator)) == (4, 63, 12)
    payer.presign([(a, 100), (b, 100)])  # never sent
    payer.close()
    again = Payer(account, DOMAIN, tmp_path / "ledger.sqlite")
    assert (again.promised(a.operator), again.promised(b.operator)) == (63, 12)
    tab = unpack_tab(again.tab([(b, 1)], bytes(32)))[0]
    assert (tab.seq, tab.amount_for(a.operator), tab.amount_for(b.operator)) == (5, 63, 15)
