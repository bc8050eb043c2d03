"""Reentrancy through a token with transfer hooks: the guarded calls refuse to be entered twice."""

import brownie
import pytest
from eth_utils import keccak

from shardmarket.chain import eip712

from conftest import TOKEN

GUARD_ERROR = "0x" + keccak(text="ReentrancyGuardReentrantCall()")[:4].hex()
DELAY = 3600


@pytest.fixture(scope="module")
def hook_token(HookToken, accounts):
    return HookToken.deploy(10**9 * TOKEN, {"from": accounts[0]})


@pytest.fixture(scope="module")
def hook_escrow(PaymentEscrow, hook_token, accounts):
    return PaymentEscrow.deploy(hook_token, DELAY, {"from": accounts[0]})


@pytest.fixture(scope="module")
def hook_stake(StakeManager, hook_token, accounts):
    return StakeManager.deploy(hook_token, DELAY, accounts[0], {"from": accounts[0]})


@pytest.fixture(scope="module")
def attacker(Reenterer, hook_token, accounts):
    contract = Reenterer.deploy({"from": accounts[0]})
    contract.execute(hook_token, hook_token.registerHook.encode_input(), {"from": accounts[0]})
    return contract


def as_attacker(attacker, contract, method, *args):
    return attacker.execute(contract, getattr(contract, method).encode_input(*args), {"from": brownie.accounts[0]})


def test_client_withdrawal_cannot_be_reentered(hook_token, hook_escrow, attacker, accounts):
    hook_token.transfer(attacker, 10 * TOKEN, {"from": accounts[0]})
    as_attacker(attacker, hook_token, "approve", hook_escrow, 10 * TOKEN)
    as_attacker(attacker, hook_escrow, "deposit", attacker, 10 * TOKEN)
    as_attacker(attacker, hook_escrow, "requestWithdrawal", 4 * TOKEN)
    brownie.chain.sleep(DELAY + 1)
    attacker.arm(hook_escrow, hook_escrow.withdraw.encode_input(), {"from": accounts[0]})
    as_attacker(attacker, hook_escrow, "withdraw")
    assert attacker.attempted() and not attacker.reentered()
    assert attacker.reentryError() == GUARD_ERROR
    assert hook_token.balanceOf(attacker) == 4 * TOKEN
    assert hook_escrow.balanceOf(attacker) == 6 * TOKEN
    assert hook_token.balanceOf(hook_escrow) == 6 * TOKEN


def test_node_earnings_cannot_be_withdrawn_twice_by_reentering(hook_token, hook_escrow, attacker, clients, accounts):
    client = clients[0]
    hook_token.approve(hook_escrow, 10 * TOKEN, {"from": accounts[0]})
    hook_escrow.deposit(client, 10 * TOKEN, {"from": accounts[0]})
    tab = eip712.Tab(client.address, 1, (eip712.Entry(attacker.address, 3 * TOKEN),), b"\x00" * 32)
    signature = eip712.sign_tab(client.private_key, tab, eip712.Domain(31337, hook_escrow.address))
    hook_escrow.settleTabs(eip712.pack_tab(tab, signature), {"from": accounts[0]})
    attacker.arm(hook_escrow, hook_escrow.withdrawEarnings.encode_input(attacker), {"from": accounts[0]})
    as_attacker(attacker, hook_escrow, "withdrawEarnings", attacker)
    assert attacker.attempted() and not attacker.reentered()
    assert attacker.reentryError() == GUARD_ERROR
    assert hook_token.balanceOf(attacker) == 3 * TOKEN
    assert hook_token.balanceOf(hook_escrow) == 7 * TOKEN


def test_stake_withdrawal_cannot_be_reentered(hook_token, hook_stake, attacker, accounts):
    hook_token.transfer(attacker, 10 * TOKEN, {"from": accounts[0]})
    as_attacker(attacker, hook_token, "approve", hook_stake, 10 * TOKEN)
    as_attacker(attacker, hook_stake, "stake", 10 * TOKEN)
    as_attacker(attacker, hook_stake, "unbond", 5 * TOKEN)
    brownie.chain.sleep(DELAY + 1)
    attacker.arm(hook_stake, hook_stake.withdraw.encode_input(), {"from": accounts[0]})
    as_attacker(attacker, hook_stake, "withdraw")
    assert attacker.attempted() and not attacker.reentered()
    assert attacker.reentryError() == GUARD_ERROR
    assert hook_token.balanceOf(attacker) == 5 * TOKEN
    assert hook_stake.totalStakeOf(attacker) == 5 * TOKEN


def test_dispute_credit_cannot_be_withdrawn_twice_by_reentering(
    hook_token, hook_stake, attacker, ModelRegistry, NodeRegistry, DisputeManager, nodes, accounts
):
    from scripts.deploy import DISPUTE_PARAMS

    owner = {"from": accounts[0]}
    registry = NodeRegistry.deploy(hook_stake, ModelRegistry.deploy(owner), TOKEN, owner)
    params = {**DISPUTE_PARAMS, "challengeWindow": DELAY // 2}  # shorter than hook_stake's unbonding delay
    disputes = DisputeManager.deploy(hook_stake, registry, accounts[9], tuple(params.values()), owner)
    hook_stake.grantRole(hook_stake.SLASHER_ROLE(), disputes, owner)
    node = nodes[0]
    hook_token.transfer(node, 10 * TOKEN, owner)
    hook_token.approve(hook_stake, 10 * TOKEN, {"from": node})
    hook_stake.stake(10 * TOKEN, {"from": node})
    domain = eip712.Domain(31337, disputes.address)
    context = eip712.StepContext(b"\x01" * 32, 0, 4, b"\x02" * 32, b"\x03" * 32, 0, 0, eip712.EMPTY_HISTORY, b"\x04" * 32)
    signed = [eip712.Commitment(context, bytes([output]) * 32, brownie.chain.time()) for output in (1, 2)]
    args = [arg for c in signed for arg in (c.as_tuple(), eip712.sign_commitment(node.private_key, c, domain))]
    as_attacker(attacker, disputes, "slashEquivocation", *args)  # the attacker reports: credited half the stake
    assert disputes.creditOf(attacker) == 5 * TOKEN
    attacker.arm(disputes, disputes.withdrawCredit.encode_input(attacker), owner)
    as_attacker(attacker, disputes, "withdrawCredit", attacker)
    assert attacker.attempted() and not attacker.reentered()
    assert attacker.reentryError() == GUARD_ERROR
    assert hook_token.balanceOf(attacker) == 5 * TOKEN
    assert hook_token.balanceOf(disputes) == 5 * TOKEN  # the treasury's credit
