"""DisputeManager: equivocation binds everything an output depends on, panels are drawn from a block hash nobody knew
when the challenge was sent, a node cannot escape a challenge by leaving, a junk challenge blocks no real one, and
every payout is a credit pulled later."""

import brownie
import pytest
from eth_abi import encode
from eth_utils import keccak

from scripts.deploy import DISPUTE_PARAMS, UNBONDING_DELAY
from shardmarket.chain import eip712
from shardmarket.chain.contracts import DisputeStatus

from conftest import TOKEN

BOND = DISPUTE_PARAMS["challengeBond"]
PENALTY = DISPUTE_PARAMS["absentVerifierPenalty"]
COMMIT, REVEAL = DISPUTE_PARAMS["commitPeriod"], DISPUTE_PARAMS["revealPeriod"]
WINDOW = DISPUTE_PARAMS["challengeWindow"]
PANEL = DISPUTE_PARAMS["verifierCount"]
REWARD_BPS = DISPUTE_PARAMS["rewardBps"]
MAX_DRAWS = 64
STAKE = 100 * TOKEN


def high_s(signature: bytes) -> bytes:
    s = int.from_bytes(signature[32:64], "big")
    return signature[:32] + (eip712.SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - signature[64]])


@pytest.fixture
def accused(nodes):
    return nodes[0]


# ---- equivocation


def test_equivocation_slashes_all_stake_and_credits_it(market, disputes, stake_manager, token, accused, clients, treasury):
    market.stake_for(accused, STAKE)
    a, sig_a = market.commitment(accused, output=b"\x01" * 32)
    b, sig_b = market.commitment(accused, output=b"\x02" * 32, issued_at=brownie.chain.time() + 5)  # signed again later
    reporter = clients[0]
    tx = disputes.slashEquivocation(a, sig_a, b, sig_b, {"from": reporter})
    event = tx.events["EquivocationSlashed"]
    assert (event["node"], event["reporter"], event["slashed"], event["reward"]) == (accused, reporter, STAKE, STAKE // 2)
    assert event["context"] == disputes.contextHash(a[0])
    assert stake_manager.totalStakeOf(accused) == 0
    assert (disputes.creditOf(reporter), disputes.creditOf(treasury)) == (STAKE // 2, STAKE // 2)
    assert token.balanceOf(disputes) == STAKE
    disputes.withdrawCredit(reporter, {"from": reporter})
    assert token.balanceOf(reporter) == STAKE // 2 and disputes.creditOf(reporter) == 0


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


def bonded(market, disputes, account, challenges=1):
    market.fund(account, challenges * BOND)
    market.token.approve(disputes, challenges * BOND, {"from": account})
    return account


@pytest.fixture
def challenger(market, clients, disputes):
    return bonded(market, disputes, clients[0], 2)


def challenge(market, disputes, accused, challenger, evidence="ipfs://bafyinput", **commitment):
    signed, signature = market.commitment(accused, **commitment)
    return disputes.challenge(accused, signed, signature, evidence, {"from": challenger})


def open_dispute(market, disputes, accused, challenger, **commitment):
    """Challenge, then draw the panel in the next block; returns the dispute id and the draw's transaction."""
    dispute_id = challenge(market, disputes, accused, challenger, **commitment).return_value
    return dispute_id, disputes.drawPanel(dispute_id, {"from": challenger})


def panel_of(draw):
    return list(draw.events["PanelDrawn"]["verifiers"])


def vote(disputes, dispute_id, verifier, node_wrong, salt=b"\x05" * 32):
    disputes.commitVote(dispute_id, disputes.voteHash(dispute_id, verifier, node_wrong, salt), {"from": verifier})
    return lambda: disputes.revealVote(dispute_id, node_wrong, salt, {"from": verifier})


def all_vote(disputes, dispute_id, verifiers, node_wrong):
    for reveal in [vote(disputes, dispute_id, v, node_wrong) for v in verifiers]:
        reveal()


def expected_panel(disputes, registry, dispute_id):
    """The panel as DisputeManager draws it: the first PANEL distinct eligible slice entries along the sequence of
    indices keccak256(seed, i) % sliceSize, seed = keccak256(blockhash(drawBlock), disputeId)."""
    dispute = disputes.getDispute(dispute_id)
    block_hash = bytes(brownie.web3.eth.get_block(dispute["drawBlock"])["hash"])
    seed = keccak(encode(["bytes32", "uint256"], [block_hash, dispute_id]))
    chosen = []
    for i in range(MAX_DRAWS):
        index = int.from_bytes(keccak(encode(["bytes32", "uint256"], [seed, i])), "big") % dispute["sliceSize"]
        candidate, eligible = registry.verifierAt(dispute["sliceKey"], index, dispute["openedBlock"])
        if eligible and candidate not in (dispute["node"], dispute["challenger"], *chosen):
            chosen.append(candidate)
        if len(chosen) == PANEL:
            break
    return chosen


def test_challenge_takes_the_bond_locks_the_node_and_waits_for_its_panel(
    market, disputes, token, stake_manager, slice_nodes, challenger, reverts_with
):
    accused, verifiers, outsider = slice_nodes
    tx = challenge(market, disputes, accused, challenger)
    dispute_id = tx.return_value
    event = tx.events["DisputeOpened"]
    assert (event["node"], event["challenger"], event["evidence"], event["drawBlock"]) == (
        accused,
        challenger,
        "ipfs://bafyinput",
        tx.block_number,
    )
    assert token.balanceOf(disputes) == BOND and token.balanceOf(challenger) == BOND
    dispute = disputes.getDispute(dispute_id)
    assert (dispute["status"], dispute["verifierCount"], dispute["sliceSize"]) == (DisputeStatus.DRAWING, 0, 4)
    with reverts_with("PanelNotSeated"):
        disputes.commitVote(dispute_id, b"\x01" * 32, {"from": verifiers[0]})
    draw = disputes.drawPanel(dispute_id, {"from": outsider})  # anyone may draw
    assert sorted(panel_of(draw)) == sorted(v.address for v in verifiers)
    assert draw.return_value is True
    dispute = disputes.getDispute(dispute_id)
    assert (dispute["status"], dispute["verifierCount"]) == (DisputeStatus.OPEN, 3)
    assert dispute["commitDeadline"] == draw.timestamp + COMMIT and dispute["revealDeadline"] == draw.timestamp + COMMIT + REVEAL
    assert all(disputes.ballotOf(dispute_id, v)["selected"] for v in verifiers)
    with reverts_with("NotDrawing"):
        disputes.drawPanel(dispute_id, {"from": outsider})
    # the node cannot leave with its stake while the dispute is open
    stake_manager.unbond(STAKE, {"from": accused})
    brownie.chain.sleep(UNBONDING_DELAY + 1)
    with reverts_with("StakeLocked"):
        stake_manager.withdraw({"from": accused})


# -- property 2: nobody can choose or predict the panel


def test_the_panel_cannot_be_learnt_in_the_challenging_transaction(
    InstantDrawer, market, disputes, slice_nodes, accounts, reverts_with
):
    """A contract that challenges only when its sybils make the panel needs the panel inside its own transaction; the
    panel comes from the hash of the challenge's block, which does not exist yet."""
    accused, _, _ = slice_nodes
    drawer = InstantDrawer.deploy({"from": accounts[0]})
    market.fund(drawer, BOND)
    commitment, signature = market.commitment(accused)
    with reverts_with("DrawTooEarly"):
        drawer.challengeAndDraw(disputes, accused, commitment, signature, {"from": accounts[0]})


def test_panels_are_drawn_by_hash_across_the_whole_slice(market, disputes, registry, nodes, accounts, clients):
    """Every panel is the first distinct eligible entries along keccak256(blockhash, id, i) % sliceSize, not a
    contiguous window: over several disputes the panels spread over the slice and differ from one another."""
    members = [*nodes[:7], *accounts[2:7]]  # 12 nodes serve [0, 4)
    for member in members:
        market.register(member, 0, 4)
    challenger = bonded(market, disputes, clients[0], 6)
    panels = []
    for step in range(6):
        dispute_id, draw = open_dispute(market, disputes, members[0], challenger, step=step)
        panel = panel_of(draw)
        assert panel == expected_panel(disputes, registry, dispute_id)
        assert len(set(panel)) == PANEL and members[0] not in panel
        panels.append(tuple(sorted(panel)))
    assert len(set(panels)) > 1
    assert len({v for panel in panels for v in panel}) > PANEL


def test_nodes_that_join_unpause_or_restake_after_the_challenge_are_never_drawn(
    market, disputes, registry, stake_manager, nodes, accounts, clients, token
):
    """Whoever sees the draw's block hash before the draw cannot add itself to the panel: only entries of the slice's
    list made before the challenge, active and staked since before it, are drawn; leaving only hands a seat on."""
    accused, honest = nodes[0], list(nodes[1:4])
    for node in [accused, *honest, nodes[4], nodes[5]]:
        market.register(node, 0, 4)
    registry.pause({"from": nodes[4]})
    stake_manager.unbond(STAKE, {"from": nodes[5]})  # below the minimum: not listed
    challenger = bonded(market, disputes, clients[0])
    dispute_id = challenge(market, disputes, accused, challenger).return_value
    late = [nodes[4], nodes[5], nodes[6], *accounts[2:8]]
    registry.unpause({"from": nodes[4]})
    market.stake_for(nodes[5], STAKE)
    for node in [nodes[6], *accounts[2:8]]:
        market.register(node, 0, 4)
    assert all(registry.isListed(node) for node in late)
    draw = disputes.drawPanel(dispute_id, {"from": challenger})
    assert sorted(panel_of(draw)) == sorted(v.address for v in honest)
    dispute = disputes.getDispute(dispute_id)
    for index in range(registry.sliceLength(dispute["sliceKey"])):
        member, eligible = registry.verifierAt(dispute["sliceKey"], index, dispute["openedBlock"])
        assert eligible == (member in [accused, *honest])  # the accused is eligible, then skipped


def test_a_draw_left_too_long_moves_to_a_new_block(market, disputes, registry, slice_nodes, challenger):
    accused, verifiers, _ = slice_nodes
    dispute_id = challenge(market, disputes, accused, challenger).return_value
    brownie.chain.mine(257)  # the challenge block's hash is gone
    tx = disputes.drawPanel(dispute_id, {"from": challenger})
    assert tx.return_value is False and tx.events["DrawRescheduled"]["drawBlock"] == tx.block_number
    assert disputes.getDispute(dispute_id)["status"] == DisputeStatus.DRAWING
    draw = disputes.drawPanel(dispute_id, {"from": challenger})
    assert sorted(panel_of(draw)) == sorted(v.address for v in verifiers)
    assert panel_of(draw) == expected_panel(disputes, registry, dispute_id)


def test_a_panel_is_never_smaller_than_the_configured_size(
    market, disputes, registry, stake_manager, token, nodes, challenger, reverts_with
):
    """A slice with too few entries refuses the challenge (the bond stays with the challenger); a draw that finds too
    few eligible verifiers voids the dispute, credits the bond back and unlocks the node."""
    accused = nodes[0]
    for node in nodes[:3]:
        market.register(node, 0, 4)
    with reverts_with("SliceTooSmall"):  # the accused and two others: a panel of 3 would need everyone else
        challenge(market, disputes, accused, challenger)
    market.register(nodes[3], 0, 4)
    registry.pause({"from": nodes[3]})
    dispute_id, draw = open_dispute(market, disputes, accused, challenger)
    assert draw.return_value is False and "PanelDrawn" not in draw.events
    assert draw.events["DisputeResolved"]["outcome"] == DisputeStatus.VOID
    assert disputes.getDispute(dispute_id)["status"] == DisputeStatus.VOID
    assert disputes.creditOf(challenger) == BOND
    assert stake_manager.stakeOf(accused)["locks"] == 0
    assert token.balanceOf(disputes) == BOND


def test_challenger_who_serves_the_slice_is_not_its_own_verifier(market, disputes, nodes):
    for node in nodes[:5]:
        market.register(node, 0, 4)
    challenger = bonded(market, disputes, nodes[1])
    _, draw = open_dispute(market, disputes, nodes[0], challenger)
    assert sorted(panel_of(draw)) == sorted(n.address for n in nodes[2:5])


# -- property 3: a node cannot escape a challenge


@pytest.mark.parametrize("escape", ["pause", "deregister", "unbond", "move"])
def test_a_node_cannot_escape_a_challenge_by_leaving(
    market, disputes, registry, stake_manager, slice_nodes, challenger, escape, reverts_with
):
    """Whatever the node does after signing, the challenge is accepted, its panel comes from the slice the commitment
    names, and the verdict slashes its stake (bonded or unbonding)."""
    accused, verifiers, _ = slice_nodes
    commitment, signature = market.commitment(accused)  # signed while serving [0, 4)
    if escape == "pause":
        registry.pause({"from": accused})
    elif escape == "deregister":
        registry.deregister({"from": accused})
    elif escape == "unbond":
        stake_manager.unbond(STAKE, {"from": accused})
    else:  # to [4, 8), where only the outsider serves
        registry.update(market.model_id, 4, 8, 10, b"\x01" * 32, ["http://moved.example"], {"from": accused})
    dispute_id = disputes.challenge(accused, commitment, signature, "ipfs://bafyinput", {"from": challenger}).return_value
    draw = disputes.drawPanel(dispute_id, {"from": challenger})
    assert sorted(panel_of(draw)) == sorted(v.address for v in verifiers)
    all_vote(disputes, dispute_id, verifiers, True)
    assert disputes.resolve(dispute_id, {"from": challenger}).return_value == DisputeStatus.NODE_SLASHED
    assert stake_manager.totalStakeOf(accused) == STAKE // 2
    if escape == "unbond":
        brownie.chain.sleep(UNBONDING_DELAY + 1)
        assert stake_manager.withdraw({"from": accused}).events["Withdrawn"]["amount"] == STAKE // 2


def test_a_commitment_stays_challengeable_for_the_window_and_the_stake_stays_with_it(
    market, disputes, stake_manager, slice_nodes, challenger, reverts_with
):
    """Stake the node starts unbonding right after signing is still there when the window closes (the window is
    shorter than the unbonding delay); a commitment older than the window is refused."""
    accused, _, _ = slice_nodes
    fresh, fresh_signature = market.commitment(accused)
    old, old_signature = market.commitment(accused, step=1, issued_at=brownie.chain.time() - WINDOW - 1)
    with reverts_with("ChallengeWindowClosed"):
        disputes.challenge(accused, old, old_signature, "", {"from": challenger})
    stake_manager.unbond(STAKE, {"from": accused})
    brownie.chain.sleep(WINDOW - 60)
    with reverts_with("UnbondingNotReady"):
        stake_manager.withdraw({"from": accused})
    disputes.challenge(accused, fresh, fresh_signature, "", {"from": challenger})
    brownie.chain.sleep(UNBONDING_DELAY)
    with reverts_with("StakeLocked"):
        stake_manager.withdraw({"from": accused})
    brownie.chain.sleep(60)
    with reverts_with("ChallengeWindowClosed"):  # the window has closed by now
        disputes.challenge(accused, fresh, fresh_signature, "", {"from": challenger})


def test_challenge_errors(market, disputes, slice_nodes, challenger, nodes, reverts_with):
    accused, verifiers, outsider = slice_nodes
    commitment, signature = market.commitment(accused)
    with reverts_with("CommitmentNotSignedByNode"):
        disputes.challenge(verifiers[0], commitment, signature, "", {"from": challenger})
    with reverts_with("CommitmentNotSignedByNode"):
        disputes.challenge(accused, commitment, high_s(signature), "", {"from": challenger})
    lone, lone_sig = market.commitment(outsider, layers=(4, 8))
    with reverts_with("SliceTooSmall"):  # nobody else serves [4, 8)
        disputes.challenge(outsider, lone, lone_sig, "", {"from": challenger})
    stranger, stranger_sig = market.commitment(nodes[6])
    with reverts_with("NoStake"):  # nothing to slash: a challenge would only lock the bond
        disputes.challenge(nodes[6], stranger, stranger_sig, "", {"from": challenger})


def test_challenge_without_bond_allowance_reverts(market, disputes, slice_nodes, clients, reverts_with):
    accused, _, _ = slice_nodes
    with reverts_with("ERC20InsufficientAllowance"):
        challenge(market, disputes, accused, clients[1])


# -- property 4: a challenge cannot be blocked


def test_a_junk_challenge_does_not_block_the_real_one(market, disputes, stake_manager, slice_nodes, clients, treasury):
    """The node's accomplice challenges the commitment first with junk evidence; the client's challenge of the same
    commitment goes through at once, and again after the junk one is acquitted."""
    accused, _, _ = slice_nodes
    accomplice, client = bonded(market, disputes, clients[1], 2), bonded(market, disputes, clients[0], 2)
    junk_id, junk_draw = open_dispute(market, disputes, accused, accomplice, evidence="ipfs://junk")
    real_id, real_draw = open_dispute(market, disputes, accused, client)
    all_vote(disputes, junk_id, panel_of(junk_draw), False)
    assert disputes.resolve(junk_id, {"from": accomplice}).return_value == DisputeStatus.CHALLENGER_LOST
    # the accomplice pays for its junk: the node gets only the reward share of the bond, the treasury the rest
    assert disputes.creditOf(accused) == BOND * REWARD_BPS // 10_000
    assert disputes.creditOf(treasury) == BOND - BOND * REWARD_BPS // 10_000
    again_id, again_draw = open_dispute(market, disputes, accused, client)
    all_vote(disputes, real_id, panel_of(real_draw), True)
    assert disputes.resolve(real_id, {"from": client}).return_value == DisputeStatus.NODE_SLASHED
    assert stake_manager.totalStakeOf(accused) == STAKE // 2
    # one wrong output is slashed once: a later guilty verdict on its context (here the same output, signed again at
    # another time: another commitment) is void, its bond returned
    all_vote(disputes, again_id, panel_of(again_draw), True)
    assert disputes.resolve(again_id, {"from": client}).return_value == DisputeStatus.VOID
    assert stake_manager.totalStakeOf(accused) == STAKE // 2
    assert disputes.creditOf(client) == 2 * BOND + (STAKE // 2) * REWARD_BPS // 10_000
    assert stake_manager.stakeOf(accused)["locks"] == 0


def test_a_slashed_commitment_cannot_be_challenged_again(market, disputes, slice_nodes, challenger, reverts_with):
    accused, _, _ = slice_nodes
    dispute_id, draw = open_dispute(market, disputes, accused, challenger)
    all_vote(disputes, dispute_id, panel_of(draw), True)
    disputes.resolve(dispute_id, {"from": challenger})
    with reverts_with("AlreadySlashed"):
        challenge(market, disputes, accused, challenger)


# -- votes and outcomes


def test_majority_wrong_slashes_the_node_and_credits_the_challenger(
    market, disputes, token, stake_manager, slice_nodes, challenger, treasury
):
    accused, _, _ = slice_nodes
    dispute_id, draw = open_dispute(market, disputes, accused, challenger)
    verifiers = panel_of(draw)
    reveals = [vote(disputes, dispute_id, v, wrong) for v, wrong in zip(verifiers, (True, True, False), strict=True)]
    for reveal in reveals:  # every verifier committed: the reveal phase opens early
        assert reveal().events["VoteRevealed"]["verifier"] in verifiers
    tx = disputes.resolve(dispute_id, {"from": challenger})  # everyone revealed: no need to wait
    assert tx.return_value == DisputeStatus.NODE_SLASHED
    slashed = STAKE // 2
    assert tx.events["DisputeResolved"]["slashed"] == slashed
    assert stake_manager.totalStakeOf(accused) == STAKE - slashed
    assert disputes.creditOf(challenger) == BOND + slashed // 2
    assert disputes.creditOf(treasury) == slashed - slashed // 2
    assert token.balanceOf(disputes) == BOND + slashed
    assert stake_manager.stakeOf(accused)["locks"] == 0
    assert disputes.getDispute(dispute_id)["status"] == DisputeStatus.NODE_SLASHED
    before = token.balanceOf(challenger)
    tx = disputes.withdrawCredit(challenger, {"from": challenger})
    assert tx.return_value == BOND + slashed // 2 and token.balanceOf(challenger) == before + BOND + slashed // 2


def test_majority_right_credits_the_node_a_share_of_the_bond(market, disputes, stake_manager, slice_nodes, challenger, treasury):
    accused, _, _ = slice_nodes
    dispute_id, draw = open_dispute(market, disputes, accused, challenger)
    reveals = [vote(disputes, dispute_id, v, wrong) for v, wrong in zip(panel_of(draw), (False, True, False), strict=True)]
    for reveal in reveals:
        reveal()
    assert disputes.resolve(dispute_id, {"from": accused}).return_value == DisputeStatus.CHALLENGER_LOST
    assert disputes.creditOf(accused) == BOND * REWARD_BPS // 10_000
    assert disputes.creditOf(treasury) == BOND - BOND * REWARD_BPS // 10_000
    assert disputes.creditOf(challenger) == 0
    assert stake_manager.totalStakeOf(accused) == STAKE


def test_timeout_without_votes_returns_the_bond_and_penalizes_absent_verifiers(
    market, disputes, stake_manager, slice_nodes, challenger, treasury, reverts_with
):
    accused, verifiers, _ = slice_nodes
    dispute_id, _ = open_dispute(market, disputes, accused, challenger)
    with reverts_with("TooEarlyToResolve"):
        disputes.resolve(dispute_id, {"from": challenger})
    brownie.chain.sleep(COMMIT + REVEAL + 1)
    tx = disputes.resolve(dispute_id, {"from": challenger})
    assert tx.return_value == DisputeStatus.VOID
    assert len(tx.events["VerifierPenalized"]) == 3
    assert disputes.creditOf(challenger) == BOND
    assert disputes.creditOf(treasury) == 3 * PENALTY
    assert [stake_manager.totalStakeOf(v) for v in verifiers] == [STAKE - PENALTY] * 3
    assert stake_manager.totalStakeOf(accused) == STAKE
    with reverts_with("DisputeClosed"):
        disputes.resolve(dispute_id, {"from": challenger})


def test_tie_is_void_and_only_the_silent_verifier_pays(market, disputes, stake_manager, slice_nodes, challenger):
    accused, _, _ = slice_nodes
    dispute_id, draw = open_dispute(market, disputes, accused, challenger)
    verifiers = panel_of(draw)
    reveals = [vote(disputes, dispute_id, v, wrong) for v, wrong in zip(verifiers[:2], (True, False), strict=True)]
    brownie.chain.sleep(COMMIT + 1)
    for reveal in reveals:
        reveal()
    brownie.chain.sleep(REVEAL)
    tx = disputes.resolve(dispute_id, {"from": challenger})
    assert tx.return_value == DisputeStatus.VOID
    assert tx.events["VerifierPenalized"]["verifier"] == verifiers[2]
    assert [stake_manager.totalStakeOf(v) for v in verifiers] == [STAKE, STAKE, STAKE - PENALTY]
    assert disputes.creditOf(challenger) == BOND


def test_verifier_cannot_vote_twice_or_reveal_another_vote(market, disputes, slice_nodes, challenger, reverts_with):
    accused, _, _ = slice_nodes
    dispute_id, draw = open_dispute(market, disputes, accused, challenger)
    first, second, third = panel_of(draw)
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
    accused, _, _ = slice_nodes
    dispute_id, draw = open_dispute(market, disputes, accused, challenger)
    first, second, _ = panel_of(draw)
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


def test_unknown_dispute_and_empty_credit(disputes, accounts, reverts_with):
    for call in (
        lambda: disputes.getDispute(7),
        lambda: disputes.resolve(7, {"from": accounts[0]}),
        lambda: disputes.commitVote(7, b"\x01" * 32, {"from": accounts[0]}),
        lambda: disputes.drawPanel(7, {"from": accounts[0]}),
    ):
        with reverts_with("UnknownDispute"):
            call()
    with reverts_with("NoCredit"):
        disputes.withdrawCredit(accounts[0], {"from": accounts[0]})


@pytest.mark.parametrize(
    "change",
    [
        {"challengeBond": 2**96},
        {"verifierCount": 0},
        {"verifierCount": 8},
        {"commitPeriod": 0},
        {"revealPeriod": 0},
        {"challengeWindow": 0},
        {"challengeWindow": UNBONDING_DELAY},  # stake could leave before the window closes
        {"equivocationSlashBps": 10_001},
        {"wrongOutputSlashBps": 10_001},
        {"rewardBps": 10_001},
    ],
)
def test_constructor_rejects_bad_params(DisputeManager, stake_manager, registry, accounts, change, reverts_with):
    params = {**DISPUTE_PARAMS, **change}
    with reverts_with("InvalidParams"):
        DisputeManager.deploy(stake_manager, registry, accounts[9], tuple(params.values()), {"from": accounts[0]})


def test_constructor_rejects_a_zero_treasury(DisputeManager, stake_manager, registry, accounts, reverts_with):
    with reverts_with("InvalidParams"):
        DisputeManager.deploy(stake_manager, registry, "0x" + "00" * 20, tuple(DISPUTE_PARAMS.values()), {"from": accounts[0]})
