import brownie
import pytest

from scripts.deploy import UNBONDING_DELAY

from conftest import TOKEN


@pytest.fixture
def node(nodes):
    return nodes[0]


def test_stake_moves_tokens_and_bonds_them(market, stake_manager, token, node):
    tx = market.stake_for(node, 150 * TOKEN)
    assert stake_manager.bondedOf(node) == 150 * TOKEN
    assert token.balanceOf(stake_manager) == 150 * TOKEN
    assert token.balanceOf(node) == 0
    assert tx.events["Staked"]["bonded"] == 150 * TOKEN
    assert stake_manager.stakeOf(node)["stakedAt"] == tx.block_number  # a later verifier draw asks since when


def test_stake_zero_reverts(stake_manager, node, reverts_with):
    with reverts_with("ZeroAmount"):
        stake_manager.stake(0, {"from": node})


def test_stake_without_allowance_reverts(market, stake_manager, node, reverts_with):
    market.fund(node, TOKEN)
    with reverts_with("ERC20InsufficientAllowance"):
        stake_manager.stake(TOKEN, {"from": node})


def test_unbond_then_withdraw_after_the_delay(market, stake_manager, token, node, reverts_with):
    market.stake_for(node, 100 * TOKEN)
    tx = stake_manager.unbond(40 * TOKEN, {"from": node})
    ready_at = tx.events["UnbondRequested"]["readyAt"]
    assert ready_at == tx.timestamp + UNBONDING_DELAY
    assert stake_manager.bondedOf(node) == 60 * TOKEN
    assert stake_manager.totalStakeOf(node) == 100 * TOKEN
    with reverts_with("UnbondingNotReady"):
        stake_manager.withdraw({"from": node})
    brownie.chain.sleep(UNBONDING_DELAY + 1)
    tx = stake_manager.withdraw({"from": node})
    assert tx.events["Withdrawn"]["amount"] == 40 * TOKEN
    assert token.balanceOf(node) == 40 * TOKEN
    assert stake_manager.totalStakeOf(node) == 60 * TOKEN


def test_second_unbond_restarts_the_delay(market, stake_manager, node, reverts_with):
    market.stake_for(node, 100 * TOKEN)
    stake_manager.unbond(10 * TOKEN, {"from": node})
    brownie.chain.sleep(UNBONDING_DELAY - 100)
    stake_manager.unbond(10 * TOKEN, {"from": node})
    brownie.chain.sleep(200)
    with reverts_with("UnbondingNotReady"):
        stake_manager.withdraw({"from": node})
    assert stake_manager.stakeOf(node)["unbonding"] == 20 * TOKEN


def test_unbond_errors(market, stake_manager, node, reverts_with):
    market.stake_for(node, 10 * TOKEN)
    with reverts_with("ZeroAmount"):
        stake_manager.unbond(0, {"from": node})
    with reverts_with("InsufficientBondedStake"):
        stake_manager.unbond(11 * TOKEN, {"from": node})
    with reverts_with("NothingUnbonding"):
        stake_manager.withdraw({"from": node})


@pytest.mark.parametrize("call", ["slash", "lock", "unlock"])
def test_no_one_but_the_dispute_manager_can_slash_or_lock(market, stake_manager, node, nodes, accounts, call, reverts_with):
    market.stake_for(node, 100 * TOKEN)
    args = (node, 50 * TOKEN) if call == "slash" else (node,)
    for attacker in (nodes[1], node, accounts[0]):  # another node, the node itself, the deployer
        with reverts_with("AccessControlUnauthorizedAccount"):
            getattr(stake_manager, call)(*args, {"from": attacker})
    assert stake_manager.totalStakeOf(node) == 100 * TOKEN


def test_deployer_cannot_grant_itself_the_slasher_role(stake_manager, accounts, reverts_with):
    with reverts_with("AccessControlUnauthorizedAccount"):
        stake_manager.grantRole(stake_manager.SLASHER_ROLE(), accounts[0], {"from": accounts[0]})
