// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";
import {NodeRegistry} from "./NodeRegistry.sol";
import {StakeManager} from "./StakeManager.sol";

/// @title DisputeManager
/// @notice Slashes nodes on evidence, the only holder of the StakeManager's SLASHER_ROLE.
///
/// A node signs an EIP-712 `Commitment` for every step it answers: the step's `StepContext` (everything the
/// output depends on: model and layer range, request id, a session nonce the node chose, step, position, a running
/// hash of every earlier input of the session, the input's hash), the output's hash and when it signed.
///
/// (1) Equivocation: two commitments signed by one node for the same context with different outputs slash it at
/// once. An honest node computes each context once (a new session gets a new nonce), so it never signs two.
/// (2) Wrong output: within `challengeWindow` of its signing, a challenger posts a bond against any commitment a node
/// signed, whatever the node did since (paused, unbonding, deregistered, moved). Once the challenge's block is
/// sealed, anyone draws the panel (`drawPanel`) from that block's hash: `verifierCount` distinct verifiers,
/// sampled across the whole append-only member list of the slice the commitment names, among nodes that were
/// eligible before the challenge. They commit, then reveal a verdict; the majority wins. Several challenges of one
/// commitment may run at once (a junk challenge cannot block a real one), but a node is slashed at most once for
/// its answer to one context.
///
/// Every payout is credited and pulled with `withdrawCredit`: a token that reverts on a transfer to one party
/// (a blacklist, a receiver hook) can never block a dispute or keep a node's stake locked. Slashed stake and lost
/// bonds go `rewardBps` to the party proven right and the rest to `treasury` (not burned: the stake token may be a
/// stablecoin without a burn).
contract DisputeManager is EIP712, ReentrancyGuardTransient {
    using SafeERC20 for IERC20;

    bytes32 public constant STEP_CONTEXT_TYPEHASH = keccak256(
        "StepContext(bytes32 modelId,uint16 layerStart,uint16 layerEnd,bytes32 requestId,bytes32 sessionNonce,uint64 step,"
        "uint64 position,bytes32 historyHash,bytes32 inputHash)"
    );
    bytes32 public constant COMMITMENT_TYPEHASH = keccak256(
        "Commitment(StepContext context,bytes32 outputHash,uint64 issuedAt)StepContext(bytes32 modelId,uint16 layerStart,"
        "uint16 layerEnd,bytes32 requestId,bytes32 sessionNonce,uint64 step,uint64 position,bytes32 historyHash,"
        "bytes32 inputHash)"
    );
    uint256 public constant BPS = 10_000;
    uint256 public constant MAX_VERIFIERS = 7;
    /// @notice Most slice entries a draw looks at (bounds `drawPanel`'s gas).
    uint256 public constant MAX_DRAWS = 64;

    /// @notice Everything the output of one step depends on.
    struct StepContext {
        bytes32 modelId;
        uint16 layerStart;
        uint16 layerEnd;
        bytes32 requestId;
        bytes32 sessionNonce; // chosen by the node when the session opened
        uint64 step;
        uint64 position; // of the step's first token
        bytes32 historyHash; // the session's earlier inputs: h0 = 0, h(k+1) = keccak256(h(k) || inputHash(k))
        bytes32 inputHash; // sha256 of the input tensor's bytes
    }

    /// @notice A node's signed statement that it answered `context` with the output hashed `outputHash` at `issuedAt`.
    struct Commitment {
        StepContext context;
        bytes32 outputHash;
        uint64 issuedAt; // unix seconds; the challenge window runs from here
    }

    enum Status {
        None,
        Drawing, // waiting for its panel
        Open, // voting
        NodeSlashed,
        ChallengerLost,
        Void
    }

    struct Dispute {
        address node;
        uint64 commitDeadline;
        Status status;
        address challenger;
        uint64 revealDeadline;
        uint8 verifierCount; // verifiers seated
        uint8 committed;
        uint8 guiltyVotes;
        uint8 innocentVotes;
        uint96 bond;
        uint64 openedBlock; // verifiers must have been eligible before it
        uint64 drawBlock; // the block whose hash draws the panel
        uint32 sliceSize; // slice entries at the challenge: later ones are never drawn
        bytes32 offence; // keccak256(node, context hash): what a guilty verdict slashes, once
        bytes32 sliceKey;
        address[MAX_VERIFIERS] verifiers;
    }

    struct Ballot {
        bool selected;
        bool revealed;
        bytes32 commitHash;
    }

    /// @notice Deployment parameters, fixed for the contract's life.
    struct Params {
        uint256 challengeBond;
        uint256 verifierCount;
        uint256 commitPeriod;
        uint256 revealPeriod;
        uint256 challengeWindow;
        uint256 equivocationSlashBps;
        uint256 wrongOutputSlashBps;
        uint256 rewardBps;
        uint256 absentVerifierPenalty;
    }

    StakeManager public immutable stakeManager;
    NodeRegistry public immutable nodeRegistry;
    /// @notice The stake token (bonds are paid in it too).
    IERC20 public immutable token;
    /// @notice Credited the non-reward part of every slash and lost bond, and absent verifiers' penalties.
    address public immutable treasury;
    uint256 public immutable challengeBond;
    /// @notice Verifiers on every panel: a challenge never goes to a smaller one.
    uint256 public immutable verifierCount;
    uint256 public immutable commitPeriod;
    uint256 public immutable revealPeriod;
    /// @notice Seconds after a commitment's `issuedAt` during which it can be challenged; shorter than the
    /// StakeManager's unbonding delay, so stake bonded when a commitment was signed is still there for its challenge.
    uint256 public immutable challengeWindow;
    uint256 public immutable equivocationSlashBps;
    uint256 public immutable wrongOutputSlashBps;
    /// @notice Share of what the losing side forfeits that goes to the side proven right (reporter, challenger or node).
    uint256 public immutable rewardBps;
    uint256 public immutable absentVerifierPenalty;

    uint256 public disputeCount;
    // Written through storage pointers; see PaymentEscrow._accounts for why slither calls it uninitialized.
    // slither-disable-next-line uninitialized-state
    mapping(uint256 disputeId => Dispute) private _disputes;
    mapping(uint256 disputeId => mapping(address verifier => Ballot)) private _ballots;
    /// @notice Equivocations already slashed, by keccak256(node, hash of the StepContext).
    mapping(bytes32 key => bool) public equivocationSlashed;
    /// @notice Wrong outputs already slashed, by keccak256(node, hash of the StepContext): a node answers a context
    /// once, so however many commitments (or challenges) name it, it is slashed for it once.
    mapping(bytes32 offence => bool) public wrongOutputSlashed;
    /// @notice Tokens each account may take with `withdrawCredit`.
    mapping(address account => uint256) public creditOf;

    event EquivocationSlashed(
        address indexed node, bytes32 indexed context, address indexed reporter, uint256 slashed, uint256 reward
    );
    event DisputeOpened(
        uint256 indexed disputeId,
        address indexed node,
        address indexed challenger,
        bytes32 commitmentDigest,
        Commitment commitment,
        uint256 drawBlock,
        string evidence
    );
    event DrawRescheduled(uint256 indexed disputeId, uint256 drawBlock);
    event PanelDrawn(uint256 indexed disputeId, address[] verifiers, uint256 commitDeadline, uint256 revealDeadline);
    event VoteCommitted(uint256 indexed disputeId, address indexed verifier);
    event VoteRevealed(uint256 indexed disputeId, address indexed verifier, bool nodeWrong);
    event DisputeResolved(uint256 indexed disputeId, Status outcome, uint256 slashed, uint256 reward);
    event VerifierPenalized(uint256 indexed disputeId, address indexed verifier, uint256 slashed);
    event Credited(address indexed account, uint256 amount, uint256 credit);
    event CreditWithdrawn(address indexed account, address indexed to, uint256 amount);

    error InvalidParams();
    error NotEquivocation();
    error CommitmentNotSignedByNode();
    error AlreadySlashed(bytes32 key);
    error ChallengeWindowClosed(uint256 closedAt);
    error NoStake(address node);
    error SliceTooSmall(bytes32 sliceKey, uint256 members, uint256 needed);
    error UnknownDispute(uint256 disputeId);
    error DisputeClosed(uint256 disputeId);
    error NotDrawing(uint256 disputeId);
    error PanelNotSeated(uint256 disputeId);
    error DrawTooEarly(uint256 disputeId, uint256 fromBlock);
    error NotVerifier(uint256 disputeId, address caller);
    error CommitPhaseOver(uint256 disputeId);
    error AlreadyCommitted(uint256 disputeId, address verifier);
    error RevealPhaseNotStarted(uint256 disputeId);
    error RevealPhaseOver(uint256 disputeId);
    error NotCommitted(uint256 disputeId, address verifier);
    error AlreadyRevealed(uint256 disputeId, address verifier);
    error RevealMismatch(uint256 disputeId, address verifier);
    error TooEarlyToResolve(uint256 disputeId);
    error NoCredit(address account);
    error ZeroAddress();

    /// @param stakeManager_ Stake contract; this contract must hold its SLASHER_ROLE.
    /// @param nodeRegistry_ Registry whose slices verifiers are drawn from.
    /// @param treasury_ Credited slashed stake and lost bonds beyond the rewards.
    /// @param params Bond (fits 96 bits), verifier count (1-7), phase lengths, challenge window (shorter than the
    /// unbonding delay), slash fractions, reward share and the absent-verifier penalty.
    constructor(StakeManager stakeManager_, NodeRegistry nodeRegistry_, address treasury_, Params memory params)
        EIP712("shardmarket", "1")
    {
        if (
            treasury_ == address(0) || params.challengeBond > type(uint96).max || params.verifierCount == 0
                || params.verifierCount > MAX_VERIFIERS || params.commitPeriod == 0 || params.revealPeriod == 0
                || params.challengeWindow == 0 || params.challengeWindow >= stakeManager_.unbondingDelay()
                || params.equivocationSlashBps > BPS || params.wrongOutputSlashBps > BPS || params.rewardBps > BPS
        ) revert InvalidParams();
        stakeManager = stakeManager_;
        nodeRegistry = nodeRegistry_;
        token = stakeManager_.token();
        treasury = treasury_;
        challengeBond = params.challengeBond;
        verifierCount = params.verifierCount;
        commitPeriod = params.commitPeriod;
        revealPeriod = params.revealPeriod;
        challengeWindow = params.challengeWindow;
        equivocationSlashBps = params.equivocationSlashBps;
        wrongOutputSlashBps = params.wrongOutputSlashBps;
        rewardBps = params.rewardBps;
        absentVerifierPenalty = params.absentVerifierPenalty;
    }

    /// @notice Slash the node that signed both `a` and `b`: the same step context, different outputs. Commitments
    /// that differ in anything the output depends on (another session, position, history or input) are no
    /// equivocation, so a client cannot frame an honest node with two honest answers.
    /// The caller (reporter) is credited `rewardBps` of the slash, the treasury the rest.
    /// @param a First commitment.
    /// @param signatureA Its 65-byte signature.
    /// @param b Second commitment, same context as `a`, another outputHash.
    /// @param signatureB Its 65-byte signature.
    /// @return slashed Stake taken from the node.
    function slashEquivocation(
        Commitment calldata a,
        bytes calldata signatureA,
        Commitment calldata b,
        bytes calldata signatureB
    ) external nonReentrant returns (uint256 slashed) {
        bytes32 context = _contextHash(a.context);
        if (context != _contextHash(b.context) || a.outputHash == b.outputHash) revert NotEquivocation();
        address node = _signer(_commitmentDigest(context, a), signatureA);
        if (node == address(0) || _signer(_commitmentDigest(context, b), signatureB) != node) {
            revert CommitmentNotSignedByNode();
        }
        bytes32 key = keccak256(abi.encode(node, context));
        if (equivocationSlashed[key]) revert AlreadySlashed(key);
        equivocationSlashed[key] = true;
        slashed = stakeManager.slash(node, stakeManager.totalStakeOf(node) * equivocationSlashBps / BPS);
        uint256 reward = slashed * rewardBps / BPS;
        emit EquivocationSlashed(node, context, msg.sender, slashed, reward);
        _credit(msg.sender, reward);
        _credit(treasury, slashed - reward);
    }

    /// @notice Challenge `commitment`, signed by `node`, as a wrong output. Accepted within `challengeWindow` of its
    /// `issuedAt` while the node has stake (bonded or unbonding), whatever its registration, unless its context was
    /// already slashed (other challenges of it may be open: the first guilty verdict slashes); locks the node's
    /// withdrawals and takes `challengeBond` from the caller (needs an allowance). The panel is drawn by `drawPanel`
    /// from the hash of this transaction's block, among the slice the commitment names.
    /// @param node The accused node.
    /// @param commitment The challenged commitment.
    /// @param signature The node's signature over it.
    /// @param evidence Where verifiers find the session's inputs and the node's output (e.g. an IPFS CID).
    /// @return disputeId The new dispute's id.
    function challenge(address node, Commitment calldata commitment, bytes calldata signature, string calldata evidence)
        external
        nonReentrant
        returns (uint256 disputeId)
    {
        bytes32 context = _contextHash(commitment.context);
        bytes32 digest = _commitmentDigest(context, commitment);
        if (node == address(0) || _signer(digest, signature) != node) revert CommitmentNotSignedByNode();
        uint256 closesAt = uint256(commitment.issuedAt) + challengeWindow;
        if (block.timestamp > closesAt) revert ChallengeWindowClosed(closesAt);
        bytes32 offence = keccak256(abi.encode(node, context));
        if (wrongOutputSlashed[offence]) revert AlreadySlashed(offence);
        if (stakeManager.totalStakeOf(node) == 0) revert NoStake(node);
        disputeId = _open(node, offence, commitment.context);
        emit DisputeOpened(disputeId, node, msg.sender, digest, commitment, block.number, evidence);
        stakeManager.lock(node);
        token.safeTransferFrom(msg.sender, address(this), challengeBond);
    }

    /// @notice Seat the panel of a dispute waiting for it; anyone may call, from the block after its draw block.
    /// If that block's hash is no longer available (256 blocks later), the draw moves to the current block. If
    /// the slice has too few eligible verifiers for a full panel, the dispute is void: the bond is credited back
    /// and the node unlocked (the commitment can be challenged again while its window lasts).
    /// @param disputeId The dispute.
    /// @return seated Whether a panel now sits.
    function drawPanel(uint256 disputeId) external nonReentrant returns (bool seated) {
        Dispute storage dispute = _disputes[disputeId];
        if (dispute.status == Status.None) revert UnknownDispute(disputeId);
        if (dispute.status != Status.Drawing) revert NotDrawing(disputeId);
        uint256 drawBlock = dispute.drawBlock;
        if (block.number <= drawBlock) revert DrawTooEarly(disputeId, drawBlock + 1);
        bytes32 randomness = blockhash(drawBlock);
        if (randomness == bytes32(0)) {
            dispute.drawBlock = uint64(block.number);
            emit DrawRescheduled(disputeId, block.number);
            return false;
        }
        address[] memory chosen = _chooseVerifiers(dispute, keccak256(abi.encode(randomness, disputeId)));
        if (chosen.length < verifierCount) {
            dispute.status = Status.Void;
            emit DisputeResolved(disputeId, Status.Void, 0, 0);
            _credit(dispute.challenger, dispute.bond);
            stakeManager.unlock(dispute.node);
            return false;
        }
        for (uint256 i = 0; i < chosen.length; ++i) {
            dispute.verifiers[i] = chosen[i];
            _ballots[disputeId][chosen[i]].selected = true;
        }
        uint256 commitDeadline = block.timestamp + commitPeriod;
        dispute.status = Status.Open;
        dispute.verifierCount = uint8(chosen.length);
        dispute.commitDeadline = uint64(commitDeadline);
        dispute.revealDeadline = uint64(commitDeadline + revealPeriod);
        emit PanelDrawn(disputeId, chosen, commitDeadline, commitDeadline + revealPeriod);
        return true;
    }

    /// @notice As a seated verifier, commit to a verdict: keccak256(abi.encode(disputeId, verifier, nodeWrong, salt)).
    /// @param disputeId The dispute.
    /// @param commitHash The hash of the hidden vote (see `voteHash`).
    function commitVote(uint256 disputeId, bytes32 commitHash) external {
        Dispute storage dispute = _openDispute(disputeId);
        Ballot storage ballot = _ballots[disputeId][msg.sender];
        if (!ballot.selected) revert NotVerifier(disputeId, msg.sender);
        if (block.timestamp > dispute.commitDeadline) revert CommitPhaseOver(disputeId);
        if (ballot.commitHash != bytes32(0)) revert AlreadyCommitted(disputeId, msg.sender);
        ballot.commitHash = commitHash;
        ++dispute.committed;
        emit VoteCommitted(disputeId, msg.sender);
    }

    /// @notice Reveal the committed verdict; opens after the commit deadline or once every verifier committed.
    /// @param disputeId The dispute.
    /// @param nodeWrong True if re-running the step did not reproduce the node's output.
    /// @param salt The secret salt used in the commit.
    function revealVote(uint256 disputeId, bool nodeWrong, bytes32 salt) external {
        Dispute storage dispute = _openDispute(disputeId);
        Ballot storage ballot = _ballots[disputeId][msg.sender];
        if (!ballot.selected) revert NotVerifier(disputeId, msg.sender);
        if (block.timestamp <= dispute.commitDeadline && dispute.committed < dispute.verifierCount) {
            revert RevealPhaseNotStarted(disputeId);
        }
        if (block.timestamp > dispute.revealDeadline) revert RevealPhaseOver(disputeId);
        if (ballot.commitHash == bytes32(0)) revert NotCommitted(disputeId, msg.sender);
        if (ballot.revealed) revert AlreadyRevealed(disputeId, msg.sender);
        if (voteHash(disputeId, msg.sender, nodeWrong, salt) != ballot.commitHash) {
            revert RevealMismatch(disputeId, msg.sender);
        }
        ballot.revealed = true;
        if (nodeWrong) ++dispute.guiltyVotes;
        else ++dispute.innocentVotes;
        emit VoteRevealed(disputeId, msg.sender, nodeWrong);
    }

    /// @notice Close a dispute after the reveal deadline (or once every verifier revealed). Majority "wrong": the
    /// node is slashed (unless another dispute already slashed this context: then void) and the challenger is
    /// credited the bond plus the reward. Majority "right": the node is credited `rewardBps` of the bond, the
    /// treasury the rest. Tie or no reveal: the bond is credited back. Seated verifiers that did not reveal lose
    /// `absentVerifierPenalty` of stake to the treasury.
    /// @param disputeId The dispute.
    /// @return outcome NodeSlashed, ChallengerLost or Void.
    function resolve(uint256 disputeId) external nonReentrant returns (Status outcome) {
        Dispute storage dispute = _openDispute(disputeId);
        uint256 revealed = uint256(dispute.guiltyVotes) + dispute.innocentVotes;
        if (block.timestamp <= dispute.revealDeadline && revealed < dispute.verifierCount) {
            revert TooEarlyToResolve(disputeId);
        }
        address node = dispute.node;
        bytes32 offence = dispute.offence;
        if (dispute.innocentVotes > dispute.guiltyVotes) outcome = Status.ChallengerLost;
        else if (dispute.guiltyVotes > dispute.innocentVotes && !wrongOutputSlashed[offence]) outcome = Status.NodeSlashed;
        else outcome = Status.Void;
        dispute.status = outcome;
        if (outcome == Status.NodeSlashed) wrongOutputSlashed[offence] = true;
        stakeManager.unlock(node);
        uint256 penalties = _penalizeAbsentVerifiers(disputeId, dispute);
        uint256 bond = dispute.bond;
        uint256 slashed = 0;
        uint256 reward = 0;
        if (outcome == Status.NodeSlashed) {
            slashed = stakeManager.slash(node, stakeManager.totalStakeOf(node) * wrongOutputSlashBps / BPS);
            reward = slashed * rewardBps / BPS;
        } else if (outcome == Status.ChallengerLost) {
            reward = bond * rewardBps / BPS;
        }
        emit DisputeResolved(disputeId, outcome, slashed, reward);
        if (outcome == Status.ChallengerLost) {
            _credit(node, reward);
            _credit(treasury, bond - reward + penalties);
        } else {
            _credit(dispute.challenger, bond + reward);
            _credit(treasury, slashed - reward + penalties);
        }
    }

    /// @notice Send the caller's credit (dispute payouts) to `to`, e.g. another address when the caller's is blocked
    /// by the token.
    /// @param to Receiver of the tokens.
    /// @return amount Tokens sent.
    function withdrawCredit(address to) external nonReentrant returns (uint256 amount) {
        if (to == address(0)) revert ZeroAddress();
        amount = creditOf[msg.sender];
        if (amount == 0) revert NoCredit(msg.sender);
        creditOf[msg.sender] = 0;
        emit CreditWithdrawn(msg.sender, to, amount);
        token.safeTransfer(to, amount);
    }

    /// @notice The commit hash a verifier submits for `nodeWrong` with secret `salt`.
    function voteHash(uint256 disputeId, address verifier, bool nodeWrong, bytes32 salt) public pure returns (bytes32) {
        return keccak256(abi.encode(disputeId, verifier, nodeWrong, salt));
    }

    /// @notice The dispute `disputeId`; reverts with UnknownDispute if none.
    function getDispute(uint256 disputeId) external view returns (Dispute memory) {
        if (_disputes[disputeId].status == Status.None) revert UnknownDispute(disputeId);
        return _disputes[disputeId];
    }

    /// @notice `verifier`'s ballot in `disputeId`.
    function ballotOf(uint256 disputeId, address verifier) external view returns (Ballot memory) {
        return _ballots[disputeId][verifier];
    }

    /// @notice The EIP-712 digest a node signs for a commitment (matches shardmarket/chain/eip712.py).
    function commitmentDigest(Commitment calldata commitment) external view returns (bytes32) {
        return _commitmentDigest(_contextHash(commitment.context), commitment);
    }

    /// @notice The EIP-712 struct hash of a step context: two commitments with the same one answer the same question.
    function contextHash(StepContext calldata context) external pure returns (bytes32) {
        return _contextHash(context);
    }

    /// @notice The EIP-712 domain separator of this contract.
    function domainSeparator() external view returns (bytes32) {
        return _domainSeparatorV4();
    }

    /// @dev Record a dispute on `offence` waiting for its panel from the slice `context` names.
    function _open(address node, bytes32 offence, StepContext calldata context) private returns (uint256 disputeId) {
        bytes32 key = nodeRegistry.sliceKey(context.modelId, context.layerStart, context.layerEnd);
        uint256 size = nodeRegistry.sliceLength(key);
        if (size <= verifierCount) revert SliceTooSmall(key, size, verifierCount + 1);
        disputeId = ++disputeCount;
        Dispute storage dispute = _disputes[disputeId];
        dispute.node = node;
        dispute.challenger = msg.sender;
        dispute.status = Status.Drawing;
        dispute.bond = uint96(challengeBond);
        dispute.openedBlock = uint64(block.number);
        dispute.drawBlock = uint64(block.number);
        dispute.sliceSize = size < type(uint32).max ? uint32(size) : type(uint32).max;
        dispute.offence = offence;
        dispute.sliceKey = key;
    }

    /// @dev Up to `verifierCount` distinct verifiers from the slice entries a fixed pseudo-random sequence of
    /// indices (below the slice's size at the challenge) names, skipping the accused, the challenger and nodes not
    /// eligible since before the challenge (NodeRegistry.verifierAt). The sequence depends only on `seed`, so a node
    /// leaving after the draw's randomness is known only gives its seat to the next one in the sequence.
    function _chooseVerifiers(Dispute storage dispute, bytes32 seed) private view returns (address[] memory chosen) {
        chosen = new address[](verifierCount);
        uint256 found;
        (address node, address challenger, bytes32 key) = (dispute.node, dispute.challenger, dispute.sliceKey);
        (uint256 size, uint256 before) = (dispute.sliceSize, dispute.openedBlock);
        for (uint256 i = 0; i < MAX_DRAWS && found < chosen.length; ++i) {
            uint256 index = uint256(keccak256(abi.encode(seed, i))) % size;
            (address candidate, bool eligible) = nodeRegistry.verifierAt(key, index, before);
            if (!eligible || candidate == node || candidate == challenger || _contains(chosen, found, candidate)) continue;
            chosen[found++] = candidate;
        }
        assembly ("memory-safe") {
            mstore(chosen, found)
        }
    }

    function _contains(address[] memory list, uint256 length, address item) private pure returns (bool) {
        for (uint256 i = 0; i < length; ++i) {
            if (list[i] == item) return true;
        }
        return false;
    }

    function _penalizeAbsentVerifiers(uint256 disputeId, Dispute storage dispute) private returns (uint256 penalties) {
        if (absentVerifierPenalty == 0) return 0;
        for (uint256 i = 0; i < dispute.verifierCount; ++i) {
            address verifier = dispute.verifiers[i];
            if (_ballots[disputeId][verifier].revealed) continue;
            uint256 slashed = stakeManager.slash(verifier, absentVerifierPenalty);
            penalties += slashed;
            emit VerifierPenalized(disputeId, verifier, slashed);
        }
    }

    function _credit(address account, uint256 amount) private {
        if (amount == 0) return;
        uint256 credit = creditOf[account] + amount;
        creditOf[account] = credit;
        emit Credited(account, amount, credit);
    }

    function _openDispute(uint256 disputeId) private view returns (Dispute storage dispute) {
        dispute = _disputes[disputeId];
        if (dispute.status == Status.None) revert UnknownDispute(disputeId);
        if (dispute.status == Status.Drawing) revert PanelNotSeated(disputeId);
        if (dispute.status != Status.Open) revert DisputeClosed(disputeId);
    }

    /// @dev The signer of `digest`, or address(0) for a malformed or high-s signature.
    function _signer(bytes32 digest, bytes calldata signature) private pure returns (address) {
        // slither-disable-next-line unused-return
        (address signer, ECDSA.RecoverError error,) = ECDSA.tryRecover(digest, signature);
        return error == ECDSA.RecoverError.NoError ? signer : address(0);
    }

    function _contextHash(StepContext calldata context) private pure returns (bytes32) {
        return keccak256(
            abi.encode(
                STEP_CONTEXT_TYPEHASH,
                context.modelId,
                context.layerStart,
                context.layerEnd,
                context.requestId,
                context.sessionNonce,
                context.step,
                context.position,
                context.historyHash,
                context.inputHash
            )
        );
    }

    function _commitmentDigest(bytes32 context, Commitment calldata commitment) private view returns (bytes32) {
        return _hashTypedDataV4(keccak256(abi.encode(COMMITMENT_TYPEHASH, context, commitment.outputHash, commitment.issuedAt)));
    }
}
