"""Reserves: money a client sets aside for one node, which only that node's claims draw on and which the client takes back
only a timelock after asking. A node that served within its reserve is paid whatever the client settles first."""

import brownie
import pytest

from scripts.deploy import WITHDRAWAL_TIMELOCK
from shardmarket.chain import eip712

from conftest import TOKEN


@pytest.fixture
def client(clients):
    return clients[0]


@pytest.fixture
def node_and_alias(nodes):
    """The honest node and the client's alias, the alias sorting first (a settlement pays it first)."""
    alias, node = sorted(nodes[:2], key=lambda n: int(n.address, 16))
    return node, alias


def test_funding_moves_balance_into_one_reserve_per_node(market, escrow, client, nodes):
    market.deposit(client, 10 * TOKEN)
    a, b = nodes[:2]
    tx = market.fund_reserves(client, {a: 3 * TOKEN, b: TOKEN})
    assert [(e["node"], e["amount"], e["reserve"]) for e in tx.events["ReserveFunded"]] == [
        (a, 3 * TOKEN, 3 * TOKEN),
        (b, TOKEN, TOKEN),
    ]
    market.fund_reserves(client, {a: TOKEN})
    assert escrow.balanceOf(client) == 5 * TOKEN
    assert escrow.reserveOf(client, a) == (4 * TOKEN, 0) and escrow.reserveOf(client, b) == (TOKEN, 0)
    assert escrow.creditOf(client, a) == (5 * TOKEN, 4 * TOKEN) and escrow.creditOf(client, nodes[2]) == (5 * TOKEN, 0)
    assert market.token.balanceOf(escrow) == 10 * TOKEN  # nothing left the escrow


def test_funding_errors(market, escrow, client, nodes, reverts_with):
    market.deposit(client, TOKEN)
    cases = [
        ("BadReserveList", [nodes[0]], []),
        ("BadReserveList", [nodes[0]] * 33, [1] * 33),
        ("ZeroAmount", [nodes[0]], [0]),
        ("ZeroAddress", ["0x" + "00" * 20], [1]),
        ("InsufficientBalance", [nodes[0], nodes[1]], [TOKEN, 1]),
    ]
    for error, targets, amounts in cases:
        with reverts_with(error):
            escrow.fundReserves(targets, amounts, {"from": client})
    assert escrow.balanceOf(client) == TOKEN and escrow.reserveOf(client, nodes[0]) == (0, 0)


def test_a_release_waits_for_the_timelock_and_the_node_claims_meanwhile(market, escrow, client, nodes, reverts_with):
    node = nodes[0]
    market.deposit(client, 5 * TOKEN)
    market.fund_reserves(client, {node: 5 * TOKEN})
    with reverts_with("NoReleaseRequested"):
        escrow.releaseReserve(node, {"from": client})
    tx = escrow.requestReserveRelease(node, {"from": client})
    ready_at = tx.timestamp + WITHDRAWAL_TIMELOCK
    assert tx.events["ReserveReleaseRequested"]["readyAt"] == ready_at and escrow.reserveOf(client, node) == (5 * TOKEN, ready_at)
    assert escrow.creditOf(client, node) == (0, 0)  # a reserve on its way back is nothing to count on
    with reverts_with("ReserveLocked"):
        escrow.releaseReserve(node, {"from": client})
    tx = market.claim(node, market.tab(client, {node: 2 * TOKEN}), (), node)  # the node saw the request and claims
    assert tx.events["Claimed"]["fromReserve"] == 2 * TOKEN
    brownie.chain.sleep(WITHDRAWAL_TIMELOCK + 1)
    tx = escrow.releaseReserve(node, {"from": client})
    assert tx.events["ReserveReleased"]["amount"] == 3 * TOKEN
    assert escrow.balanceOf(client) == 3 * TOKEN and escrow.reserveOf(client, node) == (0, 0)
    with reverts_with("NoReserve"):
        escrow.requestReserveRelease(node, {"from": client})


def test_a_cancelled_release_keeps_the_reserve(market, escrow, client, nodes, reverts_with):
    node = nodes[0]
    market.deposit(client, TOKEN)
    market.fund_reserves(client, {node: TOKEN})
    with reverts_with("NoReleaseRequested"):
        escrow.cancelReserveRelease(node, {"from": client})
    escrow.requestReserveRelease(node, {"from": client})
    assert "ReserveReleaseCancelled" in escrow.cancelReserveRelease(node, {"from": client}).events
    brownie.chain.sleep(WITHDRAWAL_TIMELOCK + 1)
    with reverts_with("NoReleaseRequested"):
        escrow.releaseReserve(node, {"from": client})
    assert escrow.creditOf(client, node) == (0, TOKEN)


@pytest.mark.parametrize("names_node", [True, False], ids=["paid-first", "dropped"])
def test_a_client_draining_its_balance_to_an_alias_still_pays_the_node_what_it_acknowledged(
    market, escrow, token, client, node_and_alias, names_node
):
    """The node served the client on tab 1 within its reserve. The client signs tab 2 paying an alias its whole balance
    (naming the node after the alias, or dropping it), settles it, and the alias withdraws at once. The node's claim of
    tab 1 is paid out of its reserve."""
    node, alias = node_and_alias
    market.deposit(client, 10 * TOKEN)
    market.fund_reserves(client, {node: 4 * TOKEN})
    acknowledged = market.tab(client, {node: 4 * TOKEN}, seq=1)
    drain = market.tab(client, {alias: 6 * TOKEN, **({node: 4 * TOKEN} if names_node else {})}, seq=2)
    tx = market.settle([market.item(*drain)], alias)
    assert escrow.balanceOf(client) == 0 and escrow.earningsOf(alias) == 6 * TOKEN
    escrow.withdrawEarnings(alias, {"from": alias})
    tx = market.claim(node, acknowledged, market.paid_vector(tx, client), node)
    assert (tx.events["Claimed"]["fromBalance"], tx.events["Claimed"]["fromReserve"]) == (0, 4 * TOKEN)
    assert escrow.earningsOf(node) == 4 * TOKEN and escrow.reserveOf(client, node) == (0, 0)
    escrow.withdrawEarnings(node, {"from": node})
    assert token.balanceOf(node) == 4 * TOKEN and token.balanceOf(escrow) == 0


def test_a_reserve_pays_only_its_node(market, escrow, client, node_and_alias, reverts_with):
    node, alias = node_and_alias
    market.deposit(client, 4 * TOKEN)
    market.fund_reserves(client, {node: 4 * TOKEN})
    with reverts_with("NothingOwed"):  # the alias has a signed tab but no reserve, and the balance is empty
        market.claim(alias, market.tab(client, {alias: 4 * TOKEN, node: 4 * TOKEN}), (), alias)
    assert escrow.reserveOf(client, node) == (4 * TOKEN, 0)


def test_a_claim_takes_the_balance_first_then_the_reserve(market, escrow, client, nodes):
    node = nodes[0]
    market.deposit(client, 5 * TOKEN)
    market.fund_reserves(client, {node: 3 * TOKEN})
    tx = market.claim(node, market.tab(client, {node: 4 * TOKEN}), (), node)
    assert (tx.events["Claimed"]["fromBalance"], tx.events["Claimed"]["fromReserve"]) == (2 * TOKEN, 2 * TOKEN)
    assert market.claimed_vector(tx) == (eip712.Entry(node.address, 4 * TOKEN),)
    assert escrow.balanceOf(client) == 0 and escrow.reserveOf(client, node) == (TOKEN, 0)
