"""A client deposits with one EIP-2612 permit signature (TestToken is an ERC20Permit) instead of approve + deposit; the
permit is signed through shardmarket.chain.eip712, as the client software signs it."""

import brownie
import pytest
from eth_account import Account
from eth_account.messages import encode_typed_data

from shardmarket.chain import eip712

from conftest import TOKEN

DEADLINE = 2**40


def key_of(client) -> bytes:
    """The test-held private key of a keyed account (conftest's `keyed`)."""
    for i in range(8):
        account = Account.from_key((0x5EED0000 + i).to_bytes(32, "big"))
        if account.address == client.address:
            return account.key
    raise AssertionError(f"{client} is not a keyed account")


def signed_permit(token, escrow, client, amount, deadline=DEADLINE, nonce=None, key=None):
    permit = eip712.Permit(client.address, escrow.address, amount, token.nonces(client) if nonce is None else nonce, deadline)
    return eip712.sign_permit(key or key_of(client), permit, token.name(), eip712.Domain(31337, token.address))


@pytest.fixture
def client(clients):
    return clients[0]


def test_the_permit_signed_in_python_is_eip712_as_wallets_encode_it(token, escrow, client):
    """eth-account's typed-data encoding of permit_typed_data recovers the signer of sign_permit's signature, and the
    token's DOMAIN_SEPARATOR is the domain those typed data name."""
    permit = eip712.Permit(client.address, escrow.address, 5 * TOKEN, 0, DEADLINE)
    domain = eip712.Domain(31337, token.address)
    typed = eip712.permit_typed_data(permit, token.name(), domain)
    v, r, s = eip712.sign_permit(key_of(client), permit, token.name(), domain)
    message = encode_typed_data(full_message=typed)
    assert Account.recover_message(message, vrs=(v, r, s)) == client.address
    assert bytes(message.header)[:32] == bytes(token.DOMAIN_SEPARATOR())


def test_one_permit_signature_deposits_without_an_approve(market, token, escrow, client):
    market.fund(client, 5 * TOKEN)
    v, r, s = signed_permit(token, escrow, client, 5 * TOKEN)
    tx = escrow.depositWithPermit(client, 5 * TOKEN, DEADLINE, v, r, s, {"from": client})
    assert tx.events["Deposited"]["amount"] == 5 * TOKEN and tx.events["Approval"]["value"] == 5 * TOKEN
    assert escrow.balanceOf(client) == 5 * TOKEN and token.balanceOf(escrow) == 5 * TOKEN
    assert token.allowance(client, escrow) == 0 and token.nonces(client) == 1


def test_a_permit_for_less_or_by_someone_else_or_expired_deposits_nothing(market, token, escrow, client, clients):
    market.fund(client, 5 * TOKEN)
    v, r, s = signed_permit(token, escrow, client, TOKEN)
    with brownie.reverts():  # typed error PermitFailed(0, 5e18): the permit covered 1e18, not 5e18
        escrow.depositWithPermit(client, 5 * TOKEN, DEADLINE, v, r, s, {"from": client})
    v, r, s = signed_permit(token, escrow, client, 5 * TOKEN, key=key_of(clients[1]))
    with brownie.reverts():
        escrow.depositWithPermit(client, 5 * TOKEN, DEADLINE, v, r, s, {"from": client})
    past = brownie.chain.time() - 1
    v, r, s = signed_permit(token, escrow, client, 5 * TOKEN, deadline=past)
    with brownie.reverts():
        escrow.depositWithPermit(client, 5 * TOKEN, past, v, r, s, {"from": client})
    assert escrow.balanceOf(client) == 0 and token.nonces(client) == 0


def test_a_front_run_permit_still_lets_the_deposit_through(market, token, escrow, client, accounts):
    """Anyone may submit a permit seen in the mempool first; the deposit then uses the allowance it granted."""
    market.fund(client, 5 * TOKEN)
    v, r, s = signed_permit(token, escrow, client, 5 * TOKEN)
    token.permit(client, escrow, 5 * TOKEN, DEADLINE, v, r, s, {"from": accounts[0]})
    escrow.depositWithPermit(client, 5 * TOKEN, DEADLINE, v, r, s, {"from": client})
    assert escrow.balanceOf(client) == 5 * TOKEN


def test_permit_deposit_costs_less_gas_than_approve_then_deposit(market, token, escrow, clients):
    first, second = clients[1], clients[2]
    for c in (first, second):
        market.fund(c, 10 * TOKEN)
    approve = token.approve(escrow, TOKEN, {"from": first})
    deposit = escrow.deposit(first, TOKEN, {"from": first})
    v, r, s = signed_permit(token, escrow, second, TOKEN)
    permitted = escrow.depositWithPermit(second, TOKEN, DEADLINE, v, r, s, {"from": second})
    both = approve.gas_used + deposit.gas_used
    print(f"gas: approve {approve.gas_used} + deposit {deposit.gas_used} = {both}; depositWithPermit {permitted.gas_used}")
    assert permitted.gas_used < both
