"""Dispute payouts are credits pulled later: on a token that blocks transfers to some accounts (a stablecoin's
blacklist), a blocked challenger, node, reporter or treasury blocks no verdict and never keeps a node's stake
locked; a blocked account withdraws its credit to another address."""

import pytest

from scripts.deploy import DISPUTE_PARAMS, MIN_STAKE, UNBONDING_DELAY, WITHDRAWAL_TIMELOCK
from shardmarket.chain.contracts import DisputeStatus

from conftest import TOKEN, Market

BOND = DISPUTE_PARAMS["challengeBond"]
REWARD_BPS = DISPUTE_PARAMS["rewardBps"]
STAKE = 100 * TOKEN


@pytest.fixture(scope="module")
def blocking(BlacklistToken, StakeManager, ModelRegistry, NodeRegistry, PaymentEscrow, DisputeManager, accounts, treasury):
    """A whole market on BlacklistToken, its owner accounts[0]."""
    owner = {"from": accounts[0]}
    token = BlacklistToken.deploy(10**9 * TOKEN, owner)
    stake = StakeManager.deploy(token, UNBONDING_DELAY, accounts[0], owner)
    models = ModelRegistry.deploy(owner)
    registry = NodeRegistry.deploy(stake, models, MIN_STAKE, owner)
    escrow = PaymentEscrow.deploy(token, WITHDRAWAL_TIMELOCK, owner)
    disputes = DisputeManager.deploy(stake, registry, treasury, tuple(DISPUTE_PARAMS.values()), owner)
    stake.grantRole(stake.SLASHER_ROLE(), disputes, owner)
    return Market(token, stake, models, registry, escrow, disputes, accounts[0])


@pytest.fixture
def dispute(blocking, nodes, clients):
    """A dispute against nodes[0] by clients[0], its panel (nodes[1:4]) seated; returns (id, accused, challenger)."""
    for node in nodes[:4]:
        blocking.register(node, 0, 4)
    challenger = clients[0]
    blocking.fund(challenger, BOND)
    blocking.token.approve(blocking.disputes, BOND, {"from": challenger})
    commitment, signature = blocking.commitment(nodes[0])
    dispute_id = blocking.disputes.challenge(nodes[0], commitment, signature, "", {"from": challenger}).return_value
    blocking.disputes.drawPanel(dispute_id, {"from": challenger})
    salt = b"\x05" * 32
    return dispute_id, nodes[0], challenger, lambda wrong: _vote(blocking.disputes, dispute_id, nodes[1:4], wrong, salt)


def _vote(disputes, dispute_id, verifiers, node_wrong, salt):
    for verifier in verifiers:
        disputes.commitVote(dispute_id, disputes.voteHash(dispute_id, verifier, node_wrong, salt), {"from": verifier})
    for verifier in verifiers:
        disputes.revealVote(dispute_id, node_wrong, salt, {"from": verifier})


def test_a_blocked_challenger_blocks_no_slash_and_takes_its_credit_elsewhere(blocking, dispute, accounts, reverts_with):
    dispute_id, accused, challenger, vote = dispute
    disputes, token, stake = blocking.disputes, blocking.token, blocking.stake
    vote(True)
    token.setBlocked(challenger, True, {"from": accounts[0]})
    assert disputes.resolve(dispute_id, {"from": accounts[1]}).return_value == DisputeStatus.NODE_SLASHED
    assert stake.stakeOf(accused)["locks"] == 0 and stake.totalStakeOf(accused) == STAKE // 2
    credit = BOND + (STAKE // 2) * REWARD_BPS // 10_000
    assert disputes.creditOf(challenger) == credit
    with reverts_with("Blocked"):
        disputes.withdrawCredit(challenger, {"from": challenger})
    disputes.withdrawCredit(accounts[5], {"from": challenger})
    assert token.balanceOf(accounts[5]) == credit and disputes.creditOf(challenger) == 0


def test_a_blocked_node_and_treasury_block_no_acquittal(blocking, dispute, accounts, treasury):
    dispute_id, accused, challenger, vote = dispute
    disputes, token = blocking.disputes, blocking.token
    vote(False)
    for account in (accused, treasury):
        token.setBlocked(account, True, {"from": accounts[0]})
    assert disputes.resolve(dispute_id, {"from": challenger}).return_value == DisputeStatus.CHALLENGER_LOST
    assert blocking.stake.stakeOf(accused)["locks"] == 0
    assert disputes.creditOf(accused) == BOND * REWARD_BPS // 10_000
    assert disputes.creditOf(treasury) == BOND - BOND * REWARD_BPS // 10_000
    assert token.balanceOf(disputes) == BOND


def test_a_blocked_reporter_still_slashes_an_equivocation(blocking, nodes, clients, accounts, treasury):
    node, reporter = nodes[0], clients[0]
    blocking.stake_for(node, STAKE)
    blocking.token.setBlocked(reporter, True, {"from": accounts[0]})
    blocking.token.setBlocked(treasury, True, {"from": accounts[0]})
    a, sig_a = blocking.commitment(node, output=b"\x01" * 32)
    b, sig_b = blocking.commitment(node, output=b"\x02" * 32)
    assert blocking.disputes.slashEquivocation(a, sig_a, b, sig_b, {"from": reporter}).return_value == STAKE
    assert blocking.disputes.creditOf(reporter) == STAKE * REWARD_BPS // 10_000
