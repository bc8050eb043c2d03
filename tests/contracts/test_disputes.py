"""DisputeManager: equivocation binds everything an output depends on; wrong-output challenges go to a vote."""

import brownie
import pytest

from scripts.deploy import DISPUTE_PARAMS, UNBONDING_DELAY
from shardmarket.chain import eip712
from shardmarket.chain.contracts import DisputeStatus

from conftest import TOKEN

BOND = DISPUTE_PARAMS["challengeBond"]
PENALTY = DISPUTE_PARAMS["absentVerifierPenalty"]
COMMIT, REVEAL = DISPUTE_PARAMS["commitPeriod"], DISPUTE_PARAMS["revealPeriod"]
STAKE = 100 * TOKEN


def high_s(signature: bytes) -> bytes:
    s = int.from_bytes(signature[32:64], "big")
    return signature[:32] + (eip712.SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - signature[64]])


@pytest.fixture
def accused(nodes):
    return nodes[0]


# ---- equivocation


def test_equivocation_slashes_all_stake_and_splits_it(market, disputes, stake_manager, token, accused, clients, treasury):
    market.stake_for(accused, STAKE)
    a, sig_a = market.commitment(accused, output=b"\x01" * 32)
    b, sig_b = market.commitment(accused, output=b"\x02" * 32, issued_at=brownie.chain.time() + 5)  # signed again later
    reporter = clients[0]
    before = token.balanceOf(treasury)
    tx = disputes.slashEquivocation(a, sig_a, b, sig_b, {"from": reporter})
    event = tx.events["EquivocationSlashed"]
    assert (event["node"], event["reporter"], event["slashed"], event["reward"]) == (accused, reporter, STAKE, STAKE // 2)
    assert event["context"] == disputes.contextHash(a[0])
    assert stake_manager.totalStakeOf(accused) == 0
    assert token.balanceOf(reporter) == STAKE // 2
    assert token.balanceOf(treasury) - before == STAKE // 2
    assert token.balanceOf(disputes) == 0


def test_equivocation_reaches_unbonding_stake(market, disputes, stake_manager, accused, clients, reverts_with):
    market.stake_for(accused, STAKE)
    stake_manager.unbond(STAKE, {"from": accused})  # trying to run away with it
    a, sig_a = market.commitment(accused, output=b"\x01" * 32)
    b, sig_b = market.commitment(accused, output=b"\x02" * 32)
    disputes.slashEquivocation(a, sig_a, b, sig_b, {"from": clients[0]})
    assert stake_manager.totalStakeOf(accused) == 0
    brownie.chain.sleep(UNBONDING_DELAY + 1)
    with reverts_with("NothingUnbonding"):
        stake_manager.withdraw({"from": accused})


def test_commitment_digest_and_context_hash_match_the_python_module(market, disputes, accused):
    commitment, _ = market.commitment(accused, step=3, position=9, history=b"\x07" * 32, layers=(2, 6))
    (context, output, issued_at) = commitment
    parsed = eip712.Commitment(eip712.StepContext(*context), output, issued_at)
    assert disputes.commitmentDigest(commitment) == "0x" + eip712.commitment_digest(parsed, market.dispute_domain).hex()
    assert disputes.contextHash(context) == "0x" + eip712.context_hash(parsed.context).hex()


def test_same_evidence_cannot_slash_twice(market, disputes, accused, clients, reverts_with):
    market.stake_for(accused, STAKE)
    a, sig_a = market.commitment(accused, output=b"\x01" * 32)
    b, sig_b = market.commitment(accused, output=b"\x02" * 32)
    disputes.slashEquivocation(a, sig_a, b, sig_b, {"from": clients[0]})
    market.stake_for(accused, STAKE)
    with reverts_with("AlreadySlashed"):
        disputes.slashEquivocation(b, sig_b, a, sig_a, {"from": clients[1]})


@pytest.mark.parametrize(
    "second",
    [
        {"output": b"\x01" * 32},
        {"step": 1},
        {"request": b"\x09" * 32},
        {"inp": b"\x34" * 32},
        {"nonce": b"\x56" * 32},
        {"history": b"\x67" * 32},
        {"position": 4},
        {"layers": (0, 5)},
        {"model_id": b"\x0a" * 32},
    ],
    ids=["same-output", "step", "request", "input", "session", "history", "position", "layers", "model"],
)
def test_not_an_equivocation(market, disputes, stake_manager, accused, clients, second, reverts_with):
    market.stake_for(accused, STAKE)
    a, sig_a = market.commitment(accused, output=b"\x01" * 32)
    b, sig_b = market.commitment(accused, **{"output": b"\x02" * 32, **second})
    with reverts_with("NotEquivocation"):
        disputes.slashEquivocation(a, sig_a, b, sig_b, {"from": clients[0]})
    assert stake_manager.totalStakeOf(accused) == STAKE


def test_two_honest_sessions_of_one_request_id_are_no_equivocation(
    market, disputes, stake_manager, accused, clients, reverts_with
):
    """The attack of issue 18: a client reuses a request id after the node restarted (or after flooding CLOSE frames)
    and sends another step 0, then the same input at step 1. The node answers step 1 differently, honestly (its KV
    cache differs); its commitments name different session nonces and histories, so they frame nobody."""
    market.stake_for(accused, STAKE)
    request, same_input = b"\x22" * 32, b"\x33" * 32
    sessions = []
    for nonce, first_input, output in ((b"\x51" * 32, b"\x71" * 32, b"\x01" * 32), (b"\x52" * 32, b"\x72" * 32, b"\x02" * 32)):
        history = eip712.chain_history(eip712.EMPTY_HISTORY, first_input)
        sessions.append(market.commitment(accused, request, 1, output, same_input, nonce=nonce, position=3, history=history))
    (a, sig_a), (b, sig_b) = sessions
    with reverts_with("NotEquivocation"):
        disputes.slashEquivocation(a, sig_a, b, sig_b, {"from": clients[0]})
    assert stake_manager.totalStakeOf(accused) == STAKE


def test_equivocation_needs_both_signatures_from_the_node(market, disputes, stake_manager, accused, nodes, clients, reverts_with):
    market.stake_for(accused, STAKE)
    a, sig_a = market.commitment(accused, output=b"\x01" * 32)
    b, sig_other = market.commitment(nodes[1], output=b"\x02" * 32)
    _, sig_b = market.commitment(accused, output=b"\x02" * 32, issued_at=b[2])
    cases = [
        (a, sig_a, b, sig_other),  # framed with someone else's signature
        (a, sig_a, b, high_s(sig_b)),  # malleated
        (a, b"\x00" * 65, b, b"\x00" * 65),  # garbage: recovers no one
        (a, sig_a, b, b"\x01" * 64),  # malformed length
    ]
    for case in cases:
        with reverts_with("CommitmentNotSignedByNode"):
            disputes.slashEquivocation(*case, {"from": clients[0]})
    other_domain = eip712.Domain(31337, market.escrow.address)
    parsed = eip712.Commitment(eip712.StepContext(*b[0]), b[1], b[2])
    forged = eip712.sign_commitment(accused.private_key, parsed, other_domain)
    with reverts_with("CommitmentNotSignedByNode"):
        disputes.slashEquivocation(a, sig_a, b, forged, {"from": clients[0]})
    assert stake_manager.totalStakeOf(accused) == STAKE


# ---- wrong-output challenges


@pytest.fixture
def slice_nodes(market, nodes):
    """The accused and three verifiers on layers [0, 4), one node on [4, 8)."""
    for node in nodes[:4]:
        market.register(node, 0, 4)
    market.register(nodes[4], 4, 8)
    return nodes[0], list(nodes[1:4]), nodes[4]


@pytest.fixture
def challenger(market, clients, disputes, token):
    challenger = clients[0]
    market.fund(challenger, BOND)
    token.approve(disputes, BOND, {"from": challenger})
    return challenger


def open_dispute(market, disputes, accused, challenger, output=b"\x44" * 32):
    commitment, signature = market.commitment(accused, output=output)
    tx = disputes.challenge(accused, commitment, signature, "ipfs://bafyinput", {"from": challenger})
    return tx.return_value, tx


def vote(disputes, dispute_id, verifier, node_wrong, salt=b"\x05" * 32):
    disputes.commitVote(dispute_id, disputes.voteHash(dispute_id, verifier, node_wrong, salt), {"from": verifier})
    return lambda: disputes.revealVote(dispute_id, node_wrong, salt, {"from": verifier})


def test_challenge_takes_the_bond_picks_slice_verifiers_and_locks_the_node(
    market, disputes, token, stake_manager, slice_nodes, challenger, reverts_with
):
    accused, verifiers, outsider = slice_nodes
    dispute_id, tx = open_dispute(market, disputes, accused, challenger)
    event = tx.events["DisputeOpened"]
    assert sorted(event["verifiers"]) == sorted(v.address for v in verifiers)
    assert outsider not in event["verifiers"] and accused not in event["verifiers"]
    assert event["evidence"] == "ipfs://bafyinput"
    assert token.balanceOf(disputes) == BOND and token.balanceOf(challenger) == 0
    dispute = disputes.getDispute(dispute_id)
    assert (dispute["node"], dispute["challenger"], dispute["status"], dispute["verifierCount"]) == (
        accused,
        challenger,
        DisputeStatus.OPEN,
        3,
    )
    assert all(disputes.ballotOf(dispute_id, v)["selected"] for v in verifiers)
    # the node cannot leave with its stake while the dispute is open
    stake_manager.unbond(STAKE, {"from": accused})
    brownie.chain.sleep(UNBONDING_DELAY + 1)
    with reverts_with("StakeLocked"):
        stake_manager.withdraw({"from": accused})


def test_challenger_who_serves_the_slice_is_not_its_own_verifier(market, disputes, token, slice_nodes):
    accused, verifiers, _ = slice_nodes
    challenger = verifiers[0]
    market.fund(challenger, BOND)
    token.approve(disputes, BOND, {"from": challenger})
    _, tx = open_dispute(market, disputes, accused, challenger)
    assert sorted(tx.events["DisputeOpened"]["verifiers"]) == sorted(v.address for v in verifiers[1:])


def test_paused_nodes_are_not_chosen(market, disputes, registry, slice_nodes, challenger):
    accused, verifiers, _ = slice_nodes
    registry.pause({"from": verifiers[0]})
    _, tx = open_dispute(market, disputes, accused, challenger)
    assert sorted(tx.events["DisputeOpened"]["verifiers"]) == sorted(v.address for v in verifiers[1:])


def test_challenge_errors(market, disputes, registry, slice_nodes, challenger, nodes, reverts_with):
    accused, verifiers, outsider = slice_nodes
    commitment, signature = market.commitment(accused)
    with reverts_with("CommitmentNotSignedByNode"):
        disputes.challenge(verifiers[0], commitment, signature, "", {"from": challenger})
    with reverts_with("CommitmentNotSignedByNode"):
        disputes.challenge(accused, commitment, high_s(signature), "", {"from": challenger})
    lone, lone_sig = market.commitment(outsider)
    with reverts_with("NoVerifiersAvailable"):  # nobody else serves [4, 8)
        disputes.challenge(outsider, lone, lone_sig, "", {"from": challenger})
    stranger, stranger_sig = market.commitment(nodes[6])
    with reverts_with("NotListed"):
        disputes.challenge(nodes[6], stranger, stranger_sig, "", {"from": challenger})
    disputes.challenge(accused, commitment, signature, "", {"from": challenger})
    with reverts_with("AlreadyChallenged"):
        disputes.challenge(accused, commitment, signature, "", {"from": challenger})


def test_challenge_without_bond_allowance_reverts(market, disputes, slice_nodes, clients, reverts_with):
    accused, _, _ = slice_nodes
    commitment, signature = market.commitment(accused)
    with reverts_with("ERC20InsufficientAllowance"):
        disputes.challenge(accused, commitment, signature, "", {"from": clients[1]})


def test_majority_wrong_slashes_the_node_and_rewards_the_challenger(
    market, disputes, token, stake_manager, slice_nodes, challenger, treasury
):
    accused, verifiers, _ = slice_nodes
    dispute_id, _ = open_dispute(market, disputes, accused, challenger)
    reveals = [vote(disputes, dispute_id, v, wrong) for v, wrong in zip(verifiers, (True, True, False), strict=True)]
    for reveal in reveals:  # every verifier committed: the reveal phase opens early
        assert reveal().events["VoteRevealed"]["verifier"] in verifiers
    before = token.balanceOf(treasury)
    tx = disputes.resolve(dispute_id, {"from": challenger})  # everyone revealed: no need to wait
    assert tx.return_value == DisputeStatus.NODE_SLASHED
    slashed = STAKE // 2
    assert tx.events["DisputeResolved"]["slashed"] == slashed
    assert stake_manager.totalStakeOf(accused) == STAKE - slashed
    assert token.balanceOf(challenger) == BOND + slashed // 2
    assert token.balanceOf(treasury) - before == slashed - slashed // 2
    assert token.balanceOf(disputes) == 0
    assert stake_manager.stakeOf(accused)["locks"] == 0
    assert disputes.getDispute(dispute_id)["status"] == DisputeStatus.NODE_SLASHED


def test_majority_right_gives_the_bond_to_the_node(market, disputes, token, stake_manager, slice_nodes, challenger):
    accused, verifiers, _ = slice_nodes
    dispute_id, _ = open_dispute(market, disputes, accused, challenger)
    reveals = [vote(disputes, dispute_id, v, wrong) for v, wrong in zip(verifiers, (False, True, False), strict=True)]
    for reveal in reveals:
        reveal()
    assert disputes.resolve(dispute_id, {"from": accused}).return_value == DisputeStatus.CHALLENGER_LOST
    assert token.balanceOf(accused) == BOND
    assert token.balanceOf(challenger) == 0
    assert stake_manager.totalStakeOf(accused) == STAKE


def test_timeout_without_votes_returns_the_bond_and_penalizes_absent_verifiers(
    market, disputes, token, stake_manager, slice_nodes, challenger, treasury, reverts_with
):
    accused, verifiers, _ = slice_nodes
    dispute_id, _ = open_dispute(market, disputes, accused, challenger)
    with reverts_with("TooEarlyToResolve"):
        disputes.resolve(dispute_id, {"from": challenger})
    brownie.chain.sleep(COMMIT + REVEAL + 1)
    before = token.balanceOf(treasury)
    tx = disputes.resolve(dispute_id, {"from": challenger})
    assert tx.return_value == DisputeStatus.VOID
    assert len(tx.events["VerifierPenalized"]) == 3
    assert token.balanceOf(challenger) == BOND
    assert token.balanceOf(treasury) - before == 3 * PENALTY
    assert [stake_manager.totalStakeOf(v) for v in verifiers] == [STAKE - PENALTY] * 3
    assert stake_manager.totalStakeOf(accused) == STAKE
    with reverts_with("DisputeClosed"):
        disputes.resolve(dispute_id, {"from": challenger})


def test_tie_is_void_and_only_the_silent_verifier_pays(market, disputes, token, stake_manager, slice_nodes, challenger):
    accused, verifiers, _ = slice_nodes
    dispute_id, _ = open_dispute(market, disputes, accused, challenger)
    reveals = [vote(disputes, dispute_id, v, wrong) for v, wrong in zip(verifiers[:2], (True, False), strict=True)]
    brownie.chain.sleep(COMMIT + 1)
    for reveal in reveals:
        reveal()
    brownie.chain.sleep(REVEAL)
    tx = disputes.resolve(dispute_id, {"from": challenger})
    assert tx.return_value == DisputeStatus.VOID
    assert tx.events["VerifierPenalized"]["verifier"] == verifiers[2]
    assert [stake_manager.totalStakeOf(v) for v in verifiers] == [STAKE, STAKE, STAKE - PENALTY]
    assert token.balanceOf(challenger) == BOND


def test_verifier_cannot_vote_twice_or_reveal_another_vote(market, disputes, slice_nodes, challenger, reverts_with):
    accused, verifiers, _ = slice_nodes
    dispute_id, _ = open_dispute(market, disputes, accused, challenger)
    first, second, third = verifiers
    salt = b"\x05" * 32
    disputes.commitVote(dispute_id, disputes.voteHash(dispute_id, first, True, salt), {"from": first})
    with reverts_with("AlreadyCommitted"):
        disputes.commitVote(dispute_id, disputes.voteHash(dispute_id, first, False, salt), {"from": first})
    with reverts_with("RevealPhaseNotStarted"):
        disputes.revealVote(dispute_id, True, salt, {"from": first})
    brownie.chain.sleep(COMMIT + 1)
    with reverts_with("CommitPhaseOver"):
        disputes.commitVote(dispute_id, disputes.voteHash(dispute_id, second, True, salt), {"from": second})
    with reverts_with("RevealMismatch"):  # changing its mind after seeing others
        disputes.revealVote(dispute_id, False, salt, {"from": first})
    with reverts_with("RevealMismatch"):  # another salt
        disputes.revealVote(dispute_id, True, b"\x06" * 32, {"from": first})
    with reverts_with("NotCommitted"):
        disputes.revealVote(dispute_id, True, salt, {"from": third})
    disputes.revealVote(dispute_id, True, salt, {"from": first})
    with reverts_with("AlreadyRevealed"):
        disputes.revealVote(dispute_id, True, salt, {"from": first})
    brownie.chain.sleep(REVEAL)
    with reverts_with("RevealPhaseOver"):
        disputes.revealVote(dispute_id, True, salt, {"from": first})
    dispute = disputes.getDispute(dispute_id)
    assert (dispute["guiltyVotes"], dispute["innocentVotes"]) == (1, 0)
    assert disputes.resolve(dispute_id, {"from": challenger}).return_value == DisputeStatus.NODE_SLASHED


def test_a_commit_hash_copied_from_another_verifier_cannot_be_revealed(market, disputes, slice_nodes, challenger, reverts_with):
    accused, (first, second, _), _ = slice_nodes
    dispute_id, _ = open_dispute(market, disputes, accused, challenger)
    copied = disputes.voteHash(dispute_id, first, True, b"\x05" * 32)
    disputes.commitVote(dispute_id, copied, {"from": first})
    disputes.commitVote(dispute_id, copied, {"from": second})
    brownie.chain.sleep(COMMIT + 1)
    with reverts_with("RevealMismatch"):
        disputes.revealVote(dispute_id, True, b"\x05" * 32, {"from": second})


def test_only_chosen_verifiers_vote(market, disputes, slice_nodes, challenger, reverts_with):
    accused, _, outsider = slice_nodes
    dispute_id, _ = open_dispute(market, disputes, accused, challenger)
    for intruder in (outsider, accused, challenger):
        with reverts_with("NotVerifier"):
            disputes.commitVote(dispute_id, b"\x01" * 32, {"from": intruder})
        with reverts_with("NotVerifier"):
            disputes.revealVote(dispute_id, True, b"\x01" * 32, {"from": intruder})


def test_unknown_dispute(disputes, accounts, reverts_with):
    for call in (
        lambda: disputes.getDispute(7),
        lambda: disputes.resolve(7, {"from": accounts[0]}),
        lambda: disputes.commitVote(7, b"\x01" * 32, {"from": accounts[0]}),
    ):
        with reverts_with("UnknownDispute"):
            call()


@pytest.mark.parametrize(
    "change",
    [
        {"verifierCount": 0},
        {"verifierCount": 8},
        {"commitPeriod": 0},
        {"revealPeriod": 0},
        {"equivocationSlashBps": 10_001},
        {"wrongOutputSlashBps": 10_001},
        {"challengerRewardBps": 10_001},
    ],
)
def test_constructor_rejects_bad_params(DisputeManager, stake_manager, registry, accounts, change, reverts_with):
    params = {**DISPUTE_PARAMS, **change}
    with reverts_with("InvalidParams"):
        DisputeManager.deploy(stake_manager, registry, accounts[9], tuple(params.values()), {"from": accounts[0]})


def test_constructor_rejects_a_zero_treasury(DisputeManager, stake_manager, registry, accounts, reverts_with):
    with reverts_with("InvalidParams"):
        DisputeManager.deploy(stake_manager, registry, "0x" + "00" * 20, tuple(DISPUTE_PARAMS.values()), {"from": accounts[0]})


def test_a_large_slice_gives_exactly_verifier_count_distinct_verifiers(market, disputes, nodes, challenger):
    for node in nodes[:7]:
        market.register(node, 0, 4)
    _, tx = open_dispute(market, disputes, nodes[0], challenger)
    chosen = tx.events["DisputeOpened"]["verifiers"]
    assert len(chosen) == len(set(chosen)) == DISPUTE_PARAMS["verifierCount"]
    assert set(chosen) <= {n.address for n in nodes[1:7]}
