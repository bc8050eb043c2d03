import brownie
import pytest
from eth_account import Account

from conftest import TOKEN
from node.chain import eip712
from scripts.deploy import WITHDRAWAL_TIMELOCK

REJECT_BAD_SIGNATURE, REJECT_NOT_NEWER, REJECT_TOO_LARGE = 1, 2, 3


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


def test_client_cannot_front_run_a_redeem_with_a_withdrawal(market, escrow, token, client, node, reverts_with):
    """A client who got served tries to pull its deposit before the node redeems: the timelock stops it."""
    market.deposit(client, 10 * TOKEN)
    receipt, signature = market.receipt(client, node, 7 * TOKEN)
    escrow.requestWithdrawal(10 * TOKEN, {"from": client})
    with reverts_with("WithdrawalLocked"):
        escrow.withdraw({"from": client})  # the front-running attempt, same block as the request
    brownie.chain.sleep(WITHDRAWAL_TIMELOCK // 2)
    market.redeem(receipt, signature, node)  # the node saw WithdrawalRequested and redeems in time
    brownie.chain.sleep(WITHDRAWAL_TIMELOCK // 2 + 1)
    tx = escrow.withdraw({"from": client})
    assert tx.events["Withdrawn"]["amount"] == 3 * TOKEN  # only what was not owed
    assert escrow.earningsOf(node) == 7 * TOKEN
    assert token.balanceOf(client) == 3 * TOKEN


# ---- single redeem


def test_redeem_pays_the_new_part_of_a_cumulative_receipt(market, escrow, token, client, node):
    market.deposit(client, 10 * TOKEN)
    tx = market.redeem(*market.receipt(client, node, 2 * TOKEN, nonce=1), node)
    assert tx.return_value == 2 * TOKEN
    event = tx.events["ReceiptRedeemed"]
    assert (event["client"], event["node"], event["paid"], event["cumulativeAmount"]) == (client, node, 2 * TOKEN, 2 * TOKEN)
    tx = market.redeem(*market.receipt(client, node, 5 * TOKEN, nonce=2), node)
    assert tx.return_value == 3 * TOKEN
    assert escrow.channelOf(client, node) == (5 * TOKEN, 5 * TOKEN)
    assert escrow.balanceOf(client) == 5 * TOKEN
    assert escrow.earningsOf(node) == 5 * TOKEN
    assert token.balanceOf(escrow) == 10 * TOKEN  # nothing left the escrow yet


def test_anyone_may_submit_a_receipt_but_only_the_node_is_paid(market, escrow, client, node, accounts):
    market.deposit(client, TOKEN)
    market.redeem(*market.receipt(client, node, TOKEN), accounts[5])
    assert escrow.earningsOf(node) == TOKEN
    assert escrow.earningsOf(accounts[5]) == 0


def test_digest_matches_the_python_module(market, escrow, client, node):
    receipt, _ = market.receipt(client, node, 123, nonce=9)
    expected = eip712.receipt_digest(receipt, market.escrow_domain)
    assert escrow.receiptDigest(client, node, 123, receipt.usage_hash, 9) == "0x" + expected.hex()


def test_withdraw_earnings(market, escrow, token, client, node, accounts, reverts_with):
    with reverts_with("NothingToWithdraw"):
        escrow.withdrawEarnings(node, {"from": node})
    market.deposit(client, TOKEN)
    market.redeem(*market.receipt(client, node, TOKEN), node)
    with reverts_with("ZeroAddress"):
        escrow.withdrawEarnings("0x" + "00" * 20, {"from": node})
    tx = escrow.withdrawEarnings(accounts[6], {"from": node})
    assert tx.events["EarningsWithdrawn"]["amount"] == TOKEN
    assert token.balanceOf(accounts[6]) == TOKEN
    assert escrow.earningsOf(node) == 0
    with reverts_with("NothingToWithdraw"):
        escrow.withdrawEarnings(node, {"from": node})


def test_receipt_above_the_balance_pays_what_there_is_and_records_the_shortfall(market, escrow, client, node):
    market.deposit(client, 3 * TOKEN)
    receipt, signature = market.receipt(client, node, 5 * TOKEN)
    tx = market.redeem(receipt, signature, node)
    assert tx.return_value == 3 * TOKEN
    assert tx.events["Shortfall"]["owed"] == 2 * TOKEN
    assert escrow.channelOf(client, node) == (3 * TOKEN, 5 * TOKEN)  # claimed - paid = owed
    assert escrow.balanceOf(client) == 0
    # the client tops up: the same receipt collects the rest, never more
    market.deposit(client, 10 * TOKEN)
    tx = market.redeem(receipt, signature, node)
    assert tx.return_value == 2 * TOKEN and "Shortfall" not in tx.events
    assert escrow.channelOf(client, node) == (5 * TOKEN, 5 * TOKEN)
    assert escrow.earningsOf(node) == 5 * TOKEN


# ---- attacks on a single redeem


def test_replayed_receipt_is_rejected(market, escrow, client, node, reverts_with):
    market.deposit(client, 10 * TOKEN)
    receipt, signature = market.receipt(client, node, 2 * TOKEN)
    market.redeem(receipt, signature, node)
    with reverts_with("ReceiptNotNewer"):
        market.redeem(receipt, signature, node)
    with reverts_with("ReceiptNotNewer"):  # an older one too
        market.redeem(*market.receipt(client, node, TOKEN, nonce=0), node)
    assert escrow.earningsOf(node) == 2 * TOKEN


@pytest.mark.parametrize("other", ["chain-id", "escrow"])
def test_receipt_for_another_chain_or_escrow_is_rejected(market, escrow, disputes, client, node, other, reverts_with):
    market.deposit(client, 10 * TOKEN)
    domain = eip712.Domain(1, escrow.address) if other == "chain-id" else eip712.Domain(31337, disputes.address)
    with reverts_with("InvalidReceiptSignature"):
        market.redeem(*market.receipt(client, node, TOKEN, domain=domain), node)
    assert escrow.balanceOf(client) == 10 * TOKEN


def test_high_s_malleated_signature_is_rejected(market, escrow, client, node, reverts_with):
    market.deposit(client, 10 * TOKEN)
    receipt, signature = market.receipt(client, node, TOKEN)
    with reverts_with("InvalidReceiptSignature"):
        market.redeem(receipt, high_s(signature), node)
    assert escrow.balanceOf(client) == 10 * TOKEN


@pytest.mark.parametrize("signature", [b"", b"\x01" * 64, b"\x01" * 65], ids=["empty", "64-bytes", "garbage"])
def test_malformed_signature_is_rejected(market, client, node, signature, reverts_with):
    market.deposit(client, TOKEN)
    receipt, _ = market.receipt(client, node, TOKEN)
    with reverts_with("InvalidReceiptSignature"):
        market.redeem(receipt, signature, node)


def test_receipt_signed_by_someone_else_is_rejected(market, escrow, client, node, clients, reverts_with):
    market.deposit(client, 10 * TOKEN)
    with reverts_with("InvalidReceiptSignature"):  # the node forging its own receipt
        market.redeem(*market.receipt(client, node, TOKEN, signer=node), node)
    with reverts_with("InvalidReceiptSignature"):  # another client
        market.redeem(*market.receipt(client, node, TOKEN, signer=clients[1]), node)
    assert escrow.balanceOf(client) == 10 * TOKEN


def test_receipt_for_another_node_does_not_pay_this_one(market, escrow, client, node, nodes, reverts_with):
    market.deposit(client, 10 * TOKEN)
    receipt, signature = market.receipt(client, nodes[1], TOKEN)
    with reverts_with("InvalidReceiptSignature"):
        escrow.redeem(client, node, TOKEN, receipt.usage_hash, 1, signature, {"from": node})


def test_amount_beyond_uint128_is_rejected(market, escrow, client, node, reverts_with):
    with reverts_with("AmountTooLarge"):
        market.redeem(*market.receipt(client, node, 2**128), node)


# ---- batches


def batch(market, pairs):
    return [market.batch_item(receipt, signature) for receipt, signature in pairs]


def test_batch_pays_many_clients_at_once(market, escrow, clients, node):
    for i, client in enumerate(clients):
        market.deposit(client, 10 * TOKEN)
    items = batch(market, [market.receipt(c, node, (i + 1) * TOKEN) for i, c in enumerate(clients)])
    tx = escrow.redeemBatch(node, items, {"from": node})
    assert tx.return_value == 6 * TOKEN
    assert tx.events["BatchRedeemed"]["redeemed"] == 3 and tx.events["BatchRedeemed"]["rejected"] == 0
    assert len(tx.events["ReceiptRedeemed"]) == 3
    assert escrow.earningsOf(node) == 6 * TOKEN
    assert [escrow.balanceOf(c) for c in clients] == [9 * TOKEN, 8 * TOKEN, 7 * TOKEN]


def test_batch_skips_bad_receipts_and_pays_the_rest(market, escrow, clients, node, nodes):
    a, b, c = clients
    for client in clients:
        market.deposit(client, 10 * TOKEN)
    market.redeem(*market.receipt(c, node, 4 * TOKEN), node)
    good = market.receipt(a, node, 2 * TOKEN)
    forged = market.receipt(b, node, 5 * TOKEN, signer=nodes[1])
    malleated_receipt, signature = market.receipt(b, node, 3 * TOKEN)
    stale = market.receipt(c, node, 4 * TOKEN)
    too_large = market.receipt(b, node, 2**130)
    items = batch(market, [good, forged, (malleated_receipt, high_s(signature)), stale, too_large])
    tx = escrow.redeemBatch(node, items, {"from": node})
    assert tx.return_value == 2 * TOKEN
    rejected = [(e["index"], e["client"], e["reason"]) for e in tx.events["ReceiptRejected"]]
    assert rejected == [(1, b, REJECT_BAD_SIGNATURE), (2, b, REJECT_BAD_SIGNATURE), (3, c, REJECT_NOT_NEWER),
                        (4, b, REJECT_TOO_LARGE)]
    assert tx.events["BatchRedeemed"]["redeemed"] == 1 and tx.events["BatchRedeemed"]["rejected"] == 4
    assert escrow.balanceOf(b) == 10 * TOKEN
    assert escrow.earningsOf(node) == 6 * TOKEN


def test_same_receipt_twice_in_one_batch_pays_once(market, escrow, client, node):
    market.deposit(client, 10 * TOKEN)
    pair = market.receipt(client, node, 3 * TOKEN)
    older = market.receipt(client, node, 2 * TOKEN, nonce=0)
    tx = escrow.redeemBatch(node, batch(market, [pair, pair, older, pair]), {"from": node})
    assert tx.return_value == 3 * TOKEN
    assert [e["reason"] for e in tx.events["ReceiptRejected"]] == [REJECT_NOT_NEWER] * 3
    assert escrow.balanceOf(client) == 7 * TOKEN


def test_batch_with_a_newer_receipt_after_an_older_one_pays_the_newest_total(market, escrow, client, node):
    market.deposit(client, 10 * TOKEN)
    items = batch(market, [market.receipt(client, node, 2 * TOKEN), market.receipt(client, node, 5 * TOKEN, nonce=2)])
    assert escrow.redeemBatch(node, items, {"from": node}).return_value == 5 * TOKEN
    assert escrow.channelOf(client, node) == (5 * TOKEN, 5 * TOKEN)


def test_batch_records_shortfalls(market, escrow, clients, node):
    market.deposit(clients[0], TOKEN)
    items = batch(market, [market.receipt(clients[0], node, 3 * TOKEN), market.receipt(clients[1], node, TOKEN)])
    tx = escrow.redeemBatch(node, items, {"from": node})
    assert tx.return_value == TOKEN
    owed = {e["client"]: e["owed"] for e in tx.events["Shortfall"]}
    assert owed == {clients[0]: 2 * TOKEN, clients[1]: TOKEN}
    assert escrow.channelOf(clients[1], node) == (0, TOKEN)


def test_empty_batch_pays_nothing(escrow, node):
    tx = escrow.redeemBatch(node, [], {"from": node})
    assert tx.return_value == 0 and tx.events["BatchRedeemed"]["redeemed"] == 0


def test_batch_for_another_node_rejects_every_receipt(market, escrow, client, node, nodes):
    market.deposit(client, 10 * TOKEN)
    items = batch(market, [market.receipt(client, node, TOKEN)])
    tx = escrow.redeemBatch(nodes[1], items, {"from": nodes[1]})
    assert tx.return_value == 0
    assert tx.events["ReceiptRejected"]["reason"] == REJECT_BAD_SIGNATURE


def test_unknown_key_signature_never_pays(market, escrow, client, node):
    market.deposit(client, 10 * TOKEN)
    stranger = Account.create()
    receipt = eip712.Receipt(client.address, node.address, TOKEN, b"\x00" * 32, 1)
    signature = eip712.sign_receipt(stranger.key, receipt, market.escrow_domain)
    tx = escrow.redeemBatch(node, [market.batch_item(receipt, signature)], {"from": node})
    assert tx.return_value == 0
