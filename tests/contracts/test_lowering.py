"""claimLowered: a node proves with two client-signed tabs that the client lowered its entry and is paid the older promise."""

import pytest

from shardmarket.chain import eip712
from shardmarket.chain.contracts import Rejection

from conftest import TOKEN


@pytest.fixture
def client(clients):
    return clients[0]


def signed(tab_and_signature) -> bytes:
    """A signed tab as a node stores it and claimLowered takes it (a settleTabs item with no previous vector)."""
    return eip712.pack_tab(*tab_and_signature)


def claim(escrow, node, older, newer, paid, sender):
    return escrow.claimLowered(node, signed(older) + signed(newer), eip712.pack_entries(tuple(paid)), {"from": sender})


def state(escrow, client, nodes):
    return escrow.balanceOf(client), escrow.tabOf(client), [escrow.earningsOf(n) for n in nodes]


@pytest.fixture
def lowered(market, escrow, client, nodes):
    """The client promised b 8 in tab 1, then signed and settled tab 2 promising b 2: b was paid 2 of its 8."""
    a, b = sorted(nodes[:2], key=lambda n: int(n.address, 16))
    market.deposit(client, 100 * TOKEN)
    older = market.tab(client, {a: 1 * TOKEN, b: 8 * TOKEN}, seq=1)
    newer = market.tab(client, {a: 10 * TOKEN, b: 2 * TOKEN}, seq=2)
    tx = market.settle([market.item(*newer)], a)
    return a, b, older, newer, market.paid_vector(tx, client)


def test_the_claim_pays_exactly_what_the_lowering_took_and_raises_the_paid_entry(market, escrow, client, nodes, lowered):
    a, b, older, newer, paid = lowered
    tx = claim(escrow, b, older, newer, paid, nodes[5])  # anyone may send it; the node named pays
    assert tx.return_value == 6 * TOKEN
    assert escrow.earningsOf(b) == 8 * TOKEN and escrow.earningsOf(a) == 10 * TOKEN and escrow.earningsOf(nodes[5]) == 0
    assert escrow.balanceOf(client) == 82 * TOKEN
    event = tx.events["LoweringClaimed"]
    assert (event["client"], event["node"], event["seq"], event["promisedSeq"], event["loweredSeq"], event["amount"]) == (
        client,
        b,
        2,
        1,
        2,
        6 * TOKEN,
    )
    raised = eip712.unpack_entries(bytes(event["paid"]))
    assert raised == (eip712.Entry(a.address, 10 * TOKEN), eip712.Entry(b.address, 8 * TOKEN))
    assert escrow.tabOf(client) == (2, eip712.paid_vector_hash(raised))  # the settled seq is unchanged


def test_later_tabs_must_cover_the_raised_entry(market, escrow, client, lowered, nodes):
    a, b, older, newer, paid = lowered
    raised = eip712.unpack_entries(bytes(claim(escrow, b, older, newer, paid, b).events["LoweringClaimed"]["paid"]))
    below = market.tab(client, {a: 11 * TOKEN, b: 7 * TOKEN}, seq=3)
    tx = market.settle([market.item(*below, raised)], a)
    assert tx.return_value == 0 and tx.events["TabRejected"]["reason"] == Rejection.WRONG_PREVIOUS
    tx = market.settle([market.item(*newer, raised)], a)  # the lowering tab itself can no longer be settled
    assert tx.return_value == 0 and tx.events["TabRejected"]["reason"] == Rejection.WRONG_PREVIOUS
    tx = market.settle([market.item(*market.tab(client, {a: 11 * TOKEN, b: 9 * TOKEN}, seq=3), raised)], a)
    assert tx.return_value == 2 * TOKEN and escrow.earningsOf(b) == 9 * TOKEN


def test_the_claim_is_capped_by_the_balance_and_a_top_up_pays_the_rest(market, escrow, client, nodes):
    a, b = nodes[:2]
    market.deposit(client, 5 * TOKEN)
    older = market.tab(client, {a: TOKEN, b: 8 * TOKEN}, seq=1)
    newer = market.tab(client, {a: 3 * TOKEN, b: TOKEN}, seq=2)
    tx = market.settle([market.item(*newer)], a)
    paid = market.paid_vector(tx, client)
    tx = claim(escrow, b, older, newer, paid, b)
    assert tx.return_value == TOKEN and escrow.balanceOf(client) == 0  # 5 - 3 - 1 left one token
    paid = eip712.unpack_entries(bytes(tx.events["LoweringClaimed"]["paid"]))
    market.deposit(client, 10 * TOKEN)
    assert claim(escrow, b, older, newer, paid, b).return_value == 6 * TOKEN
    assert escrow.earningsOf(b) == 8 * TOKEN and escrow.balanceOf(client) == 4 * TOKEN


def test_an_unsettled_lowering_tab_is_proof_enough_and_the_node_joins_the_paid_vector(market, escrow, client, nodes):
    a, b = nodes[:2]
    market.deposit(client, 10 * TOKEN)
    older = market.tab(client, {a: TOKEN, b: 4 * TOKEN}, seq=3)
    newer = market.tab(client, {a: 2 * TOKEN}, seq=4)  # drops b altogether, never settled
    tx = claim(escrow, b, older, newer, (), b)
    assert tx.return_value == 4 * TOKEN
    paid = eip712.unpack_entries(bytes(tx.events["LoweringClaimed"]["paid"]))
    assert paid == (eip712.Entry(b.address, 4 * TOKEN),) and escrow.tabOf(client) == (0, eip712.paid_vector_hash(paid))
    tx = market.settle([market.item(*newer, paid)], a)  # the lowering tab drops a paid node: refused
    assert tx.return_value == 0 and tx.events["TabRejected"]["reason"] == Rejection.WRONG_PREVIOUS


def test_bad_claims_revert_with_clear_errors_and_change_nothing(market, escrow, client, clients, nodes, lowered, reverts_with):
    a, b, older, newer, paid = lowered
    outsider = clients[1]
    before = state(escrow, client, (a, b))
    other_client = market.tab(outsider, {a: TOKEN, b: TOKEN}, seq=5)
    forged = market.tab(client, {a: TOKEN, b: 9 * TOKEN}, seq=1, signer=outsider)
    cases = [
        ("BadTabSignature", b, forged, newer, paid),  # the older tab signed by someone else
        ("BadTabSignature", b, older, market.tab(client, {a: 10 * TOKEN, b: 2 * TOKEN}, seq=2, signer=outsider), paid),
        ("NotNewer", b, older, market.tab(client, {a: TOKEN, b: 2 * TOKEN}, seq=1), paid),  # same seq
        ("NotNewer", b, newer, older, paid),  # lower seq (the pair swapped)
        ("NotLowered", a, older, newer, paid),  # a's entry went up
        ("NotLowered", b, older, market.tab(client, {a: 10 * TOKEN, b: 8 * TOKEN}, seq=3), paid),  # equal
        ("NotLowered", nodes[5], older, newer, paid),  # a node neither tab names
        ("DifferentClients", b, older, other_client, paid),
        ("WrongPaidVector", b, older, newer, ()),
        ("WrongPaidVector", b, older, newer, (paid[0], eip712.Entry(paid[1].node, 0))),  # understated: paid twice
    ]
    for error, node, first, second, vector in cases:
        with reverts_with(error):
            claim(escrow, node, first, second, vector, b)
    with reverts_with("MalformedClaim"):
        escrow.claimLowered(b, signed(older), eip712.pack_entries(paid), {"from": b})  # one tab only
    with reverts_with("MalformedClaim"):
        escrow.claimLowered(b, signed(older) + signed(newer) + b"\x00", eip712.pack_entries(paid), {"from": b})
    with reverts_with("MalformedClaim"):  # a tab carrying a previous vector
        escrow.claimLowered(b, market.item(*older, paid) + signed(newer), eip712.pack_entries(paid), {"from": b})
    assert state(escrow, client, (a, b)) == before


def test_a_replayed_claim_pays_nothing_more(market, escrow, client, lowered, reverts_with):
    a, b, older, newer, paid = lowered
    raised = eip712.unpack_entries(bytes(claim(escrow, b, older, newer, paid, b).events["LoweringClaimed"]["paid"]))
    before = state(escrow, client, (a, b))
    with reverts_with("NothingOwed"):
        claim(escrow, b, older, newer, raised, a)
    with reverts_with("WrongPaidVector"):
        claim(escrow, b, older, newer, paid, a)  # the pre-claim vector is no longer the stored one
    assert state(escrow, client, (a, b)) == before


def test_nothing_to_claim_from_an_empty_balance(market, escrow, client, nodes, reverts_with):
    a, b = nodes[:2]
    older = market.tab(client, {b: 8 * TOKEN}, seq=1)
    newer = market.tab(client, {a: TOKEN, b: TOKEN}, seq=2)
    with reverts_with("NothingOwed"):
        claim(escrow, b, older, newer, (), b)
