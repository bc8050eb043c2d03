from types import SimpleNamespace

import brownie
import pytest
from eth_account import Account

from scripts.deploy import WITHDRAWAL_TIMELOCK
from shardmarket.chain import eip712
from shardmarket.chain.contracts import Rejection

from conftest import TOKEN


@pytest.fixture
def client(clients):
    return clients[0]


@pytest.fixture
def node(nodes):
    return nodes[0]


def high_s(signature: bytes) -> bytes:
    s = int.from_bytes(signature[32:64], "big")
    return signature[:32] + (eip712.SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - signature[64]])


# ---- deposits and withdrawals


def test_deposit_credits_the_client(market, escrow, token, client, accounts):
    tx = market.deposit(client, 5 * TOKEN)
    assert tx.events["Deposited"]["amount"] == 5 * TOKEN
    assert escrow.balanceOf(client) == escrow.spendableOf(client) == 5 * TOKEN
    assert token.balanceOf(escrow) == 5 * TOKEN
    # anyone may top up a client
    token.approve(escrow, TOKEN, {"from": accounts[0]})
    escrow.deposit(client, TOKEN, {"from": accounts[0]})
    assert escrow.balanceOf(client) == 6 * TOKEN


def test_deposit_errors(escrow, client, reverts_with):
    with reverts_with("ZeroAmount"):
        escrow.deposit(client, 0, {"from": client})
    with reverts_with("ZeroAddress"):
        escrow.deposit("0x" + "00" * 20, 1, {"from": client})
    with reverts_with("ERC20InsufficientAllowance"):
        escrow.deposit(client, 1, {"from": client})


def test_withdrawal_waits_for_the_timelock(market, escrow, token, client, reverts_with):
    market.deposit(client, 5 * TOKEN)
    with reverts_with("NoWithdrawalRequested"):
        escrow.withdraw({"from": client})
    tx = escrow.requestWithdrawal(3 * TOKEN, {"from": client})
    assert tx.events["WithdrawalRequested"]["readyAt"] == tx.timestamp + WITHDRAWAL_TIMELOCK
    assert escrow.spendableOf(client) == 2 * TOKEN
    with reverts_with("WithdrawalLocked"):
        escrow.withdraw({"from": client})
    brownie.chain.sleep(WITHDRAWAL_TIMELOCK + 1)
    tx = escrow.withdraw({"from": client})
    assert tx.events["Withdrawn"]["amount"] == 3 * TOKEN
    assert token.balanceOf(client) == 3 * TOKEN
    assert escrow.balanceOf(client) == 2 * TOKEN
    assert escrow.pendingWithdrawalOf(client) == (0, 0)


def test_withdrawal_request_errors_and_cancel(market, escrow, client, reverts_with):
    market.deposit(client, TOKEN)
    with reverts_with("ZeroAmount"):
        escrow.requestWithdrawal(0, {"from": client})
    with reverts_with("InsufficientBalance"):
        escrow.requestWithdrawal(TOKEN + 1, {"from": client})
    with reverts_with("NoWithdrawalRequested"):
        escrow.cancelWithdrawal({"from": client})
    escrow.requestWithdrawal(TOKEN, {"from": client})
    assert "WithdrawalCancelled" in escrow.cancelWithdrawal({"from": client}).events
    brownie.chain.sleep(WITHDRAWAL_TIMELOCK + 1)
    with reverts_with("NoWithdrawalRequested"):
        escrow.withdraw({"from": client})
    assert escrow.balanceOf(client) == TOKEN


def test_deposit_beyond_uint96_is_refused(market, escrow, client, accounts, reverts_with):
    market.token.approve(escrow, 2**255, {"from": accounts[0]})
    with reverts_with("AmountTooLarge"):
        escrow.deposit(client, 2**96, {"from": accounts[0]})
    assert escrow.balanceOf(client) == 0


def test_client_cannot_front_run_a_settlement_with_a_withdrawal(market, escrow, token, client, node, reverts_with):
    """A client who got served tries to pull its deposit before the node settles: the timelock stops it."""
    market.deposit(client, 10 * TOKEN)
    tab, signature = market.tab(client, {node: 7 * TOKEN})
    escrow.requestWithdrawal(10 * TOKEN, {"from": client})
    with reverts_with("WithdrawalLocked"):
        escrow.withdraw({"from": client})  # the front-running attempt, same block as the request
    brownie.chain.sleep(WITHDRAWAL_TIMELOCK // 2)
    market.settle([market.item(tab, signature)], node)  # the node saw WithdrawalRequested and settles in time
    brownie.chain.sleep(WITHDRAWAL_TIMELOCK // 2 + 1)
    tx = escrow.withdraw({"from": client})
    assert tx.events["Withdrawn"]["amount"] == 3 * TOKEN  # only what was not owed
    assert escrow.earningsOf(node) == 7 * TOKEN
    assert token.balanceOf(client) == 3 * TOKEN


# ---- settling tabs


def test_one_tab_pays_every_node_it_names(market, escrow, token, client, nodes):
    market.deposit(client, 10 * TOKEN)
    a, b, c = nodes[:3]
    tab, signature = market.tab(client, {a: TOKEN, b: 2 * TOKEN, c: 3 * TOKEN}, seq=4)
    tx = market.settle([market.item(tab, signature)], accounts_other := nodes[3])
    assert tx.return_value == 6 * TOKEN
    event = tx.events["TabSettled"]
    assert (event["client"], event["seq"]) == (client, 4)
    paid = market.paid_vector(tx, client)
    assert paid == tab.entries
    assert [escrow.earningsOf(n) for n in (a, b, c)] == [TOKEN, 2 * TOKEN, 3 * TOKEN]
    assert escrow.earningsOf(accounts_other) == 0  # anyone may settle; only the named nodes are paid
    assert escrow.balanceOf(client) == 4 * TOKEN
    assert escrow.tabOf(client) == (4, eip712.paid_vector_hash(paid))
    assert token.balanceOf(escrow) == 10 * TOKEN  # nothing left the escrow yet


def test_a_newer_tab_pays_only_what_is_new(market, escrow, client, nodes):
    market.deposit(client, 10 * TOKEN)
    a, b, c = nodes[:3]
    tx = market.settle([market.item(*market.tab(client, {a: TOKEN, b: TOKEN}, seq=1))], a)
    previous = market.paid_vector(tx, client)
    tab, signature = market.tab(client, {a: 3 * TOKEN, b: TOKEN, c: 2 * TOKEN}, seq=2)  # a node joins later
    tx = market.settle([market.item(tab, signature, previous)], c)
    assert tx.return_value == 4 * TOKEN
    assert [escrow.earningsOf(n) for n in (a, b, c)] == [3 * TOKEN, TOKEN, 2 * TOKEN]
    assert market.paid_vector(tx, client) == tab.entries


def test_digest_and_paid_hash_match_the_python_module(market, escrow, client, nodes):
    tab, _ = market.tab(client, {nodes[0]: 123, nodes[1]: 2**128 - 1}, seq=9)
    abi_tab = (tab.client, tab.seq, [(e.node, e.amount) for e in tab.entries], tab.usage_hash)
    assert escrow.tabDigest(abi_tab) == "0x" + eip712.tab_digest(tab, market.escrow_domain).hex()
    assert escrow.paidVectorHash(eip712.pack_entries(tab.entries)) == eip712.paid_vector_hash(tab.entries)
    assert escrow.paidVectorHash(b"") == eip712.paid_vector_hash(()) == 0


def test_withdraw_earnings(market, escrow, token, client, node, accounts, reverts_with):
    with reverts_with("NothingToWithdraw"):
        escrow.withdrawEarnings(node, {"from": node})
    market.deposit(client, TOKEN)
    market.settle([market.item(*market.tab(client, {node: TOKEN}))], node)
    with reverts_with("ZeroAddress"):
        escrow.withdrawEarnings("0x" + "00" * 20, {"from": node})
    tx = escrow.withdrawEarnings(accounts[6], {"from": node})
    assert tx.events["EarningsWithdrawn"]["amount"] == TOKEN
    assert token.balanceOf(accounts[6]) == TOKEN
    assert escrow.earningsOf(node) == 0
    with reverts_with("NothingToWithdraw"):
        escrow.withdrawEarnings(node, {"from": node})


def test_shortfall_pays_in_entry_order_and_a_top_up_pays_the_rest_with_the_same_tab(market, escrow, client, nodes):
    market.deposit(client, 3 * TOKEN)
    tab, signature = market.tab(client, {nodes[0]: 2 * TOKEN, nodes[1]: 2 * TOKEN}, seq=5)
    first, second = tab.entries
    tx = market.settle([market.item(tab, signature)], nodes[0])
    assert tx.return_value == 3 * TOKEN
    paid = market.paid_vector(tx, client)
    assert paid == (first, eip712.Entry(second.node, TOKEN))  # the stored vector is what was actually paid
    assert escrow.balanceOf(client) == 0
    market.deposit(client, 10 * TOKEN)
    tx = market.settle([market.item(tab, signature, paid)], nodes[1])  # equal seq: collects the shortfall
    assert tx.return_value == TOKEN
    assert market.paid_vector(tx, client) == tab.entries
    assert escrow.earningsOf(second.node) == escrow.earningsOf(first.node) == 2 * TOKEN
    assert escrow.balanceOf(client) == 9 * TOKEN


# ---- attacks on settlement


def test_a_replayed_tab_pays_nothing_and_an_older_one_is_stale(market, escrow, client, node):
    market.deposit(client, 10 * TOKEN)
    older = market.tab(client, {node: TOKEN}, seq=1)
    newer = market.tab(client, {node: 2 * TOKEN}, seq=2)
    tx = market.settle([market.item(*newer)], node)
    paid = market.paid_vector(tx, client)
    tx = market.settle([market.item(*newer, paid)], node)
    assert tx.return_value == 0 and market.paid_vector(tx, client) == paid
    tx = market.settle([market.item(*older, paid)], node)
    assert tx.return_value == 0
    assert (tx.events["TabRejected"]["index"], tx.events["TabRejected"]["reason"]) == (0, Rejection.STALE_SEQ)
    assert escrow.earningsOf(node) == 2 * TOKEN and escrow.balanceOf(client) == 8 * TOKEN


def with_paid_amounts(item: bytes, amounts: list[int]) -> bytes:
    """A packed tab's bytes with `amounts` appended as its paid amounts, whatever they are (the Python packer refuses
    what the escrow would reject)."""
    header = item[: eip712.TAB_PAID_COUNT] + bytes([len(amounts)]) + item[eip712.TAB_PAID_COUNT + 1 :]
    return header + b"".join(a.to_bytes(eip712.PAID_BYTES, "big") for a in amounts)


def test_paid_amounts_that_are_not_the_stored_vector_are_rejected(market, escrow, client, nodes):
    market.deposit(client, 10 * TOKEN)
    a, b = nodes[:2]
    tx = market.settle([market.item(*market.tab(client, {a: 2 * TOKEN, b: TOKEN}, seq=1))], a)
    paid = market.paid_vector(tx, client)
    tab, signature = market.tab(client, {a: 5 * TOKEN, b: 5 * TOKEN}, seq=2)
    first, second = (next(p.amount for p in paid if p.node == e.node) for e in tab.entries)
    bare = market.item(tab, signature)
    # nothing paid, one node understated (to be paid twice), overstated, a single amount for two entries
    for amounts in [[], [first, 0], [first, second + 1], [first]]:
        tx = market.settle([with_paid_amounts(bare, amounts)], a)
        assert tx.return_value == 0 and tx.events["TabRejected"]["reason"] == Rejection.WRONG_PREVIOUS
    assert escrow.earningsOf(a) + escrow.earningsOf(b) == 3 * TOKEN
    assert market.settle([market.item(tab, signature, paid)], a).return_value == 7 * TOKEN


def test_a_tab_that_drops_a_paid_node_is_rejected(market, escrow, client, nodes):
    market.deposit(client, 10 * TOKEN)
    a, b = nodes[:2]
    tx = market.settle([market.item(*market.tab(client, {a: 2 * TOKEN, b: 2 * TOKEN}, seq=1))], a)
    paid = market.paid_vector(tx, client)
    dropping, signature = market.tab(client, {a: 9 * TOKEN}, seq=2)
    amounts = [next(p.amount for p in paid if p.node == a.address)]  # b cannot even be given a paid amount
    tx = market.settle([with_paid_amounts(market.item(dropping, signature), amounts)], a)
    assert tx.return_value == 0 and tx.events["TabRejected"]["reason"] == Rejection.WRONG_PREVIOUS
    assert escrow.balanceOf(client) == 6 * TOKEN


def test_an_entry_below_what_its_node_was_paid_pays_that_node_nothing_and_the_others_their_due(market, escrow, client, nodes):
    market.deposit(client, 10 * TOKEN)
    a, b = nodes[:2]
    tx = market.settle([market.item(*market.tab(client, {a: 2 * TOKEN, b: 2 * TOKEN}, seq=1))], a)
    paid = market.paid_vector(tx, client)
    tab, signature = market.tab(client, {a: 5 * TOKEN, b: TOKEN}, seq=2)
    tx = market.settle([market.item(tab, signature, paid)], a)
    assert tx.return_value == 3 * TOKEN and "TabRejected" not in tx.events
    assert market.paid_vector(tx, client) == tuple(
        eip712.Entry(e.node, 5 * TOKEN if e.node == a.address else 2 * TOKEN) for e in tab.entries
    )  # b keeps what it was paid
    assert (escrow.earningsOf(a), escrow.earningsOf(b), escrow.balanceOf(client)) == (5 * TOKEN, 2 * TOKEN, 3 * TOKEN)


@pytest.mark.parametrize("other", ["chain-id", "escrow"])
def test_tab_for_another_chain_or_escrow_is_rejected(market, escrow, disputes, client, node, other):
    market.deposit(client, 10 * TOKEN)
    domain = eip712.Domain(1, escrow.address) if other == "chain-id" else eip712.Domain(31337, disputes.address)
    tx = market.settle([market.item(*market.tab(client, {node: TOKEN}, domain=domain))], node)
    assert tx.events["TabRejected"]["reason"] == Rejection.BAD_SIGNATURE
    assert escrow.balanceOf(client) == 10 * TOKEN


def test_tampered_amount_or_entry_and_foreign_signers_fail_the_signature(market, escrow, client, nodes, clients):
    market.deposit(client, 10 * TOKEN)
    a, b = nodes[:2]
    tab, signature = market.tab(client, {a: TOKEN, b: TOKEN})
    raised = eip712.Tab(tab.client, tab.seq, (tab.entries[0], eip712.Entry(tab.entries[1].node, 5 * TOKEN)), tab.usage_hash)
    swapped_node = nodes[2] if int(nodes[2].address, 16) > int(tab.entries[0].node, 16) else nodes[3]
    moved = eip712.Tab(tab.client, tab.seq, (tab.entries[0], eip712.Entry(swapped_node.address, TOKEN)), tab.usage_hash)
    items = [
        market.item(raised, signature),
        market.item(moved, signature),
        market.item(*market.tab(client, {a: TOKEN}, signer=a)),  # a node forging its client's tab
        market.item(*market.tab(client, {a: TOKEN}, signer=clients[1])),
        market.item(tab, high_s(signature)),
        market.item(tab, b"\x01" * 64 + b"\x00"),
    ]
    tx = market.settle(items, a)
    assert tx.return_value == 0
    assert [(e["index"], e["reason"]) for e in tx.events["TabRejected"]] == [(i, Rejection.BAD_SIGNATURE) for i in range(6)]
    assert escrow.balanceOf(client) == 10 * TOKEN


def raw_tab(client, entries, paid=()):
    """A packed tab with any entries and paid amounts (an attacker skips the Python checks) and a dummy signature."""
    return (
        bytes.fromhex(client.address[2:])
        + (1).to_bytes(4, "big")
        + b"\x11" * 32
        + b"\x01" * 64
        + bytes([27, len(entries), len(paid)])
        + b"".join(bytes.fromhex(n[2:]) + a.to_bytes(16, "big") for n, a in entries)
        + b"".join(a.to_bytes(eip712.PAID_BYTES, "big") for a in paid)
    )


def test_malformed_tabs_are_rejected(market, escrow, client, nodes):
    market.deposit(client, 10 * TOKEN)
    low, high = sorted((n.address for n in nodes[:2]), key=lambda a: int(a, 16))
    many = [("0x" + f"{i + 1:040x}", 1) for i in range(33)]
    items = [
        raw_tab(client, []),
        raw_tab(client, [(high, 1), (low, 1)]),
        raw_tab(client, [(low, 1), (low, 1)]),
        raw_tab(client, many),
        raw_tab(client, [("0x" + "00" * 20, 1)]),
        raw_tab(SimpleNamespace(address="0x" + "00" * 20), [(low, 1)]),
        raw_tab(client, [(low, 1)], [1, 1]),
    ]
    tx = market.settle(items, nodes[0])
    assert [e["reason"] for e in tx.events["TabRejected"]] == [Rejection.MALFORMED] * 6 + [Rejection.WRONG_PREVIOUS]
    assert escrow.balanceOf(client) == 10 * TOKEN


def test_a_truncated_batch_reverts_and_pays_nothing(market, escrow, client, node, reverts_with):
    market.deposit(client, 10 * TOKEN)
    good = market.item(*market.tab(client, {node: TOKEN}))
    with reverts_with("TruncatedTab"):
        market.settle([good, good[:-1]], node)
    with reverts_with("TruncatedTab"):
        market.settle([good[:50]], node)
    assert escrow.balanceOf(client) == 10 * TOKEN


def test_a_batch_skips_bad_items_and_pays_the_rest(market, escrow, clients, nodes):
    a, b, c = clients
    for client in clients:
        market.deposit(client, 10 * TOKEN)
    good_a = market.tab(a, {nodes[0]: TOKEN, nodes[1]: TOKEN})
    forged_b = market.tab(b, {nodes[0]: 5 * TOKEN}, signer=nodes[0])
    good_c = market.tab(c, {nodes[1]: 3 * TOKEN})
    tx = market.settle([market.item(*good_a), market.item(*forged_b), market.item(*good_c)], nodes[0])
    assert tx.return_value == 5 * TOKEN
    assert [(e["index"], e["client"], e["reason"]) for e in tx.events["TabRejected"]] == [(1, b, Rejection.BAD_SIGNATURE)]
    assert len(tx.events["TabSettled"]) == 2
    assert [escrow.balanceOf(x) for x in clients] == [8 * TOKEN, 10 * TOKEN, 7 * TOKEN]
    assert escrow.earningsOf(nodes[0]) == TOKEN and escrow.earningsOf(nodes[1]) == 4 * TOKEN


def test_the_same_tab_twice_in_one_batch_pays_once(market, escrow, client, nodes):
    market.deposit(client, 10 * TOKEN)
    pair = market.tab(client, {nodes[0]: 3 * TOKEN})
    tx = market.settle([market.item(*pair), market.item(*pair)], nodes[0])
    assert tx.return_value == 3 * TOKEN  # the second carries a stale previous vector
    assert tx.events["TabRejected"]["reason"] == Rejection.WRONG_PREVIOUS
    assert escrow.balanceOf(client) == 7 * TOKEN


@pytest.mark.parametrize("first", [0, 1])
def test_two_nodes_settling_the_same_client_in_either_order_pay_each_once(market, escrow, client, nodes, first):
    """Both nodes hold the client's newest tab and settle it; the loser of the race re-reads the paid vector."""
    market.deposit(client, 10 * TOKEN)
    pair = market.tab(client, {nodes[0]: 2 * TOKEN, nodes[1]: 3 * TOKEN}, seq=7)
    settlers = [nodes[first], nodes[1 - first]]
    tx = market.settle([market.item(*pair)], settlers[0])
    assert tx.return_value == 5 * TOKEN
    raced = market.settle([market.item(*pair)], settlers[1])  # built before it saw the first settlement
    assert raced.return_value == 0 and raced.events["TabRejected"]["reason"] == Rejection.WRONG_PREVIOUS
    again = market.settle([market.item(*pair, market.paid_vector(tx, client))], settlers[1])
    assert again.return_value == 0
    assert (escrow.earningsOf(nodes[0]), escrow.earningsOf(nodes[1])) == (2 * TOKEN, 3 * TOKEN)
    assert escrow.balanceOf(client) == 5 * TOKEN


def test_empty_batch_pays_nothing(market, node):
    tx = market.settle([], node)
    assert tx.return_value == 0 and "TabSettled" not in tx.events


def test_unknown_key_signature_never_pays(market, escrow, client, node):
    market.deposit(client, 10 * TOKEN)
    stranger = Account.create()
    tab = eip712.Tab(client.address, 1, (eip712.Entry(node.address, TOKEN),), b"\x00" * 32)
    signature = eip712.sign_tab(stranger.key, tab, market.escrow_domain)
    tx = market.settle([market.item(tab, signature)], node)
    assert tx.return_value == 0 and tx.events["TabRejected"]["reason"] == Rejection.BAD_SIGNATURE
