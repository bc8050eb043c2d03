"""claim: a node collects what any one tab its client signed promised it beyond what the escrow has paid it, even after
the client signed and settled newer tabs promising it less or paying others first."""

import pytest

from shardmarket.chain import eip712
from shardmarket.chain.contracts import Rejection

from conftest import TOKEN


@pytest.fixture
def client(clients):
    return clients[0]


def ordered(nodes):
    return sorted(nodes[:2], key=lambda n: int(n.address, 16))


def state(escrow, client, nodes):
    return escrow.balanceOf(client), escrow.tabOf(client), [escrow.earningsOf(n) for n in nodes]


@pytest.fixture
def lowered(market, escrow, client, nodes):
    """The client promised b 8 in tab 1, then signed and settled tab 2 promising b 2: b was paid 2 of its 8."""
    a, b = ordered(nodes)
    market.deposit(client, 100 * TOKEN)
    older = market.tab(client, {a: 1 * TOKEN, b: 8 * TOKEN}, seq=1)
    newer = market.tab(client, {a: 10 * TOKEN, b: 2 * TOKEN}, seq=2)
    tx = market.settle([market.item(*newer)], a)
    return a, b, older, newer, market.paid_vector(tx, client)


def test_a_claim_pays_what_an_older_tab_promised_beyond_what_was_paid(market, escrow, client, nodes, lowered):
    a, b, older, _, paid = lowered
    tx = market.claim(b, older, paid, nodes[5])  # anyone may send it; the node named is paid
    assert tx.return_value == 6 * TOKEN
    assert escrow.earningsOf(b) == 8 * TOKEN and escrow.earningsOf(a) == 10 * TOKEN and escrow.earningsOf(nodes[5]) == 0
    assert escrow.balanceOf(client) == 82 * TOKEN
    event = tx.events["Claimed"]
    assert (event["client"], event["node"], event["seq"], event["tabSeq"], event["fromBalance"], event["fromReserve"]) == (
        client,
        b,
        2,
        1,
        6 * TOKEN,
        0,
    )
    raised = market.claimed_vector(tx)
    assert raised == (eip712.Entry(a.address, 10 * TOKEN), eip712.Entry(b.address, 8 * TOKEN))
    assert escrow.tabOf(client) == (2, eip712.paid_vector_hash(raised))  # the settled seq is unchanged


def test_later_tabs_must_name_the_claimed_node_and_pay_it_nothing_below_its_claim(market, escrow, client, lowered):
    a, b, older, _, paid = lowered
    raised = market.claimed_vector(market.claim(b, older, paid, b))
    dropping = market.tab(client, {a: 11 * TOKEN}, seq=3)
    tx = market.settle([market.item(*dropping, raised[:1])], a)  # paid amounts for a only: b cannot be given one
    assert tx.return_value == 0 and tx.events["TabRejected"]["reason"] == Rejection.WRONG_PREVIOUS
    tx = market.settle([market.item(*market.tab(client, {a: 11 * TOKEN, b: 7 * TOKEN}, seq=3), raised)], a)
    assert tx.return_value == TOKEN and market.paid_vector(tx, client) == (
        eip712.Entry(a.address, 11 * TOKEN),
        eip712.Entry(b.address, 8 * TOKEN),
    )
    paid = market.paid_vector(tx, client)
    tx = market.settle([market.item(*market.tab(client, {a: 11 * TOKEN, b: 9 * TOKEN}, seq=4), paid)], a)
    assert tx.return_value == TOKEN and escrow.earningsOf(b) == 9 * TOKEN


def test_after_one_node_claims_another_still_settles_the_rest_its_tab_owes(market, escrow, client, nodes):
    """The client's tab 2 lowered b and left a short; b's claim raises b's paid amount above tab 2's entry for b, and
    a can still settle tab 2 for the rest it owes a."""
    a, b = ordered(nodes)
    market.deposit(client, 3 * TOKEN)
    older = market.tab(client, {a: 2 * TOKEN, b: 8 * TOKEN}, seq=1)
    newer = market.tab(client, {a: 4 * TOKEN, b: 2 * TOKEN}, seq=2)
    tx = market.settle([market.item(*newer)], a)
    assert market.paid_vector(tx, client) == (eip712.Entry(a.address, 3 * TOKEN),)  # a short by 1, b unpaid
    market.deposit(client, 10 * TOKEN)
    tx = market.claim(b, older, market.paid_vector(tx, client), b)
    assert tx.return_value == 8 * TOKEN
    tx = market.settle([market.item(*newer, market.claimed_vector(tx))], a)
    assert tx.return_value == TOKEN and "TabRejected" not in tx.events
    assert (escrow.earningsOf(a), escrow.earningsOf(b), escrow.balanceOf(client)) == (4 * TOKEN, 8 * TOKEN, TOKEN)


def test_a_claim_is_capped_by_the_balance_and_a_top_up_pays_the_rest(market, escrow, client, nodes):
    a, b = nodes[:2]
    market.deposit(client, 5 * TOKEN)
    older = market.tab(client, {a: TOKEN, b: 8 * TOKEN}, seq=1)
    newer = market.tab(client, {a: 3 * TOKEN, b: TOKEN}, seq=2)
    tx = market.settle([market.item(*newer)], a)
    tx = market.claim(b, older, market.paid_vector(tx, client), b)
    assert tx.return_value == TOKEN and escrow.balanceOf(client) == 0  # 5 - 3 - 1 left one token
    market.deposit(client, 10 * TOKEN)
    assert market.claim(b, older, market.claimed_vector(tx), b).return_value == 6 * TOKEN
    assert escrow.earningsOf(b) == 8 * TOKEN and escrow.balanceOf(client) == 4 * TOKEN


def test_an_unsettled_tab_is_claim_enough_and_the_node_joins_the_paid_vector(market, escrow, client, nodes):
    a, b = nodes[:2]
    market.deposit(client, 10 * TOKEN)
    older = market.tab(client, {a: TOKEN, b: 4 * TOKEN}, seq=3)
    newer = market.tab(client, {a: 2 * TOKEN}, seq=4)  # drops b altogether, never settled
    tx = market.claim(b, older, (), b)
    assert tx.return_value == 4 * TOKEN
    paid = market.claimed_vector(tx)
    assert paid == (eip712.Entry(b.address, 4 * TOKEN),) and escrow.tabOf(client) == (0, eip712.paid_vector_hash(paid))
    with pytest.raises(ValueError, match="does not name every node the escrow paid"):
        market.item(*newer, paid)  # the tab dropping b cannot be settled any more


def test_bad_claims_revert_with_clear_errors_and_change_nothing(market, escrow, client, clients, nodes, lowered, reverts_with):
    a, b, older, newer, paid = lowered
    before = state(escrow, client, (a, b))
    forged = market.tab(client, {a: TOKEN, b: 9 * TOKEN}, seq=1, signer=clients[1])
    cases = [
        ("BadTabSignature", b, forged, paid),  # signed by someone else than its client
        ("NothingOwed", a, older, paid),  # a was paid more than tab 1 promised it
        ("NothingOwed", b, newer, paid),  # b was paid all tab 2 promised it
        ("NothingOwed", nodes[5], older, paid),  # a node the tab does not name
        ("WrongPaidVector", b, older, ()),
        ("WrongPaidVector", b, older, (paid[0], eip712.Entry(paid[1].node, 1))),  # understated: paid twice
    ]
    for error, node, signed, vector in cases:
        with reverts_with(error):
            market.claim(node, signed, vector, b)
    packed = eip712.pack_tab(*older)
    for malformed in [b"", packed[:-1], packed + b"\x00", market.item(*older, paid)]:  # cut, too long, with paid amounts
        with reverts_with("MalformedClaim"):
            escrow.claim(b, malformed, eip712.pack_entries(paid), {"from": b})
    assert state(escrow, client, (a, b)) == before


def test_a_replayed_claim_pays_nothing_more(market, escrow, client, lowered, reverts_with):
    a, b, older, _, paid = lowered
    raised = market.claimed_vector(market.claim(b, older, paid, b))
    before = state(escrow, client, (a, b))
    with reverts_with("NothingOwed"):
        market.claim(b, older, raised, a)
    with reverts_with("WrongPaidVector"):
        market.claim(b, older, paid, a)  # the vector before the claim is no longer the stored one
    assert state(escrow, client, (a, b)) == before


def test_nothing_to_claim_from_an_empty_balance_without_a_reserve(market, client, nodes, reverts_with):
    a, b = nodes[:2]
    with reverts_with("NothingOwed"):
        market.claim(b, market.tab(client, {a: TOKEN, b: 8 * TOKEN}, seq=1), (), b)
