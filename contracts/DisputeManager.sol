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
/// A node signs an EIP-712 `Commitment` for every step it answers: the step's `StepContext` (everything the
/// output depends on: model and layer range, request id, a session nonce the node chose, step, position, a running
/// hash of every earlier input of the session, the input's hash), the output's hash and when it signed.
/// (1) Equivocation: two commitments signed by one node for the same context with different outputs slash it at
/// once; an honest node computes each context once (a new session gets a new nonce), so it never signs two.
/// (2) Wrong output: a challenger posts a bond against one signed
/// commitment; the contract picks verifiers among listed nodes serving the same model slice, who commit and
/// then reveal a verdict; the majority wins. Slashed stake goes `challengerRewardBps` to the challenger and
/// the rest to `treasury` (not burned: the stake token may be a stablecoin without a burn).
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
    /// @notice Most slice members looked at when choosing verifiers (bounds the challenge's gas).
    uint256 public constant MAX_PROBES = 32;

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
        uint64 issuedAt; // unix seconds
    }

    enum Status {
        None,
        Open,
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
        uint8 verifierCount;
        uint8 committed;
        uint8 guiltyVotes;
        uint8 innocentVotes;
        uint128 bond;
        bytes32 commitmentDigest;
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
        uint256 equivocationSlashBps;
        uint256 wrongOutputSlashBps;
        uint256 challengerRewardBps;
        uint256 absentVerifierPenalty;
    }

    StakeManager public immutable stakeManager;
    NodeRegistry public immutable nodeRegistry;
    /// @notice The stake token (bonds are paid in it too).
    IERC20 public immutable token;
    /// @notice Receives the non-challenger part of every slash and lost bonds' penalties.
    address public immutable treasury;
    uint256 public immutable challengeBond;
    uint256 public immutable verifierCount;
    uint256 public immutable commitPeriod;
    uint256 public immutable revealPeriod;
    uint256 public immutable equivocationSlashBps;
    uint256 public immutable wrongOutputSlashBps;
    uint256 public immutable challengerRewardBps;
    uint256 public immutable absentVerifierPenalty;

    uint256 public disputeCount;
    // Written through storage pointers; see PaymentEscrow._accounts for why slither calls it uninitialized.
    // slither-disable-next-line uninitialized-state
    mapping(uint256 disputeId => Dispute) private _disputes;
    mapping(uint256 disputeId => mapping(address verifier => Ballot)) private _ballots;
    /// @notice Equivocations already slashed, by keccak256(node, hash of the StepContext).
    mapping(bytes32 key => bool) public equivocationSlashed;
    /// @notice Commitments already challenged, by EIP-712 digest (each can be challenged once).
    mapping(bytes32 digest => bool) public challenged;

    event EquivocationSlashed(
        address indexed node, bytes32 indexed context, address indexed reporter, uint256 slashed, uint256 reward
    );
    event DisputeOpened(
        uint256 indexed disputeId,
        address indexed node,
        address indexed challenger,
        bytes32 commitmentDigest,
        Commitment commitment,
        address[] verifiers,
        uint256 commitDeadline,
        uint256 revealDeadline,
        string evidence
    );
    event VoteCommitted(uint256 indexed disputeId, address indexed verifier);
    event VoteRevealed(uint256 indexed disputeId, address indexed verifier, bool nodeWrong);
    event DisputeResolved(uint256 indexed disputeId, Status outcome, uint256 slashed, uint256 reward);
    event VerifierPenalized(uint256 indexed disputeId, address indexed verifier, uint256 slashed);

    error InvalidParams();
    error NotEquivocation();
    error CommitmentNotSignedByNode();
    error AlreadySlashed(bytes32 key);
    error AlreadyChallenged(bytes32 digest);
    error NotListed(address node);
    error NoVerifiersAvailable();
    error UnknownDispute(uint256 disputeId);
    error DisputeClosed(uint256 disputeId);
    error NotVerifier(uint256 disputeId, address caller);
    error CommitPhaseOver(uint256 disputeId);
    error AlreadyCommitted(uint256 disputeId, address verifier);
    error RevealPhaseNotStarted(uint256 disputeId);
    error RevealPhaseOver(uint256 disputeId);
    error NotCommitted(uint256 disputeId, address verifier);
    error AlreadyRevealed(uint256 disputeId, address verifier);
    error RevealMismatch(uint256 disputeId, address verifier);
    error TooEarlyToResolve(uint256 disputeId);

    /// @param stakeManager_ Stake contract; this contract must hold its SLASHER_ROLE.
    /// @param nodeRegistry_ Registry used to find the accused node's slice and its verifiers.
    /// @param treasury_ Receiver of slashed stake beyond the challenger's reward.
    /// @param params Bond, verifier count (1-7), phase lengths, slash fractions and the absent-verifier penalty.
    constructor(StakeManager stakeManager_, NodeRegistry nodeRegistry_, address treasury_, Params memory params)
        EIP712("shardmarket", "1")
    {
        if (
            treasury_ == address(0) || params.verifierCount == 0 || params.verifierCount > MAX_VERIFIERS
                || params.commitPeriod == 0 || params.revealPeriod == 0 || params.equivocationSlashBps > BPS
                || params.wrongOutputSlashBps > BPS || params.challengerRewardBps > BPS
        ) revert InvalidParams();
        stakeManager = stakeManager_;
        nodeRegistry = nodeRegistry_;
        token = stakeManager_.token();
        treasury = treasury_;
        challengeBond = params.challengeBond;
        verifierCount = params.verifierCount;
        commitPeriod = params.commitPeriod;
        revealPeriod = params.revealPeriod;
        equivocationSlashBps = params.equivocationSlashBps;
        wrongOutputSlashBps = params.wrongOutputSlashBps;
        challengerRewardBps = params.challengerRewardBps;
        absentVerifierPenalty = params.absentVerifierPenalty;
    }

    /// @notice Slash the node that signed both `a` and `b`: the same step context, different outputs. Commitments
    /// that differ in anything the output depends on (another session, position, history or input) are no
    /// equivocation, so a client cannot frame an honest node with two honest answers.
    /// The caller (reporter) gets `challengerRewardBps` of the slash, the treasury the rest.
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
        uint256 amount = stakeManager.totalStakeOf(node) * equivocationSlashBps / BPS;
        slashed = stakeManager.slash(node, amount);
        uint256 reward = slashed * challengerRewardBps / BPS;
        emit EquivocationSlashed(node, context, msg.sender, slashed, reward);
        _payOut(msg.sender, reward, slashed - reward);
    }

    /// @notice Challenge `commitment`, signed by the listed `node`, as a wrong output; takes `challengeBond`
    /// from the caller (needs an allowance) and picks up to `verifierCount` verifiers serving the same slice.
    /// @param node The accused node.
    /// @param commitment The challenged commitment.
    /// @param signature The node's signature over it.
    /// @param evidence Where verifiers find the committed input and the challenger's output (e.g. an IPFS CID).
    /// @return disputeId The new dispute's id.
    function challenge(address node, Commitment calldata commitment, bytes calldata signature, string calldata evidence)
        external
        nonReentrant
        returns (uint256 disputeId)
    {
        bytes32 digest = _commitmentDigest(_contextHash(commitment.context), commitment);
        if (_signer(digest, signature) != node || node == address(0)) revert CommitmentNotSignedByNode();
        if (challenged[digest]) revert AlreadyChallenged(digest);
        if (!nodeRegistry.isListed(node)) revert NotListed(node);
        challenged[digest] = true;
        disputeId = ++disputeCount;
        address[] memory chosen = _open(disputeId, node, digest);
        _emitOpened(disputeId, commitment, chosen, evidence);
        stakeManager.lock(node);
        token.safeTransferFrom(msg.sender, address(this), challengeBond);
    }

    /// @notice As a chosen verifier, commit to a verdict: keccak256(abi.encode(disputeId, verifier, nodeWrong, salt)).
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

    /// @notice Close a dispute after the reveal deadline (or once every verifier revealed). Majority "wrong":
    /// the node is slashed and the challenger gets the bond back plus the reward. Majority "right": the bond
    /// goes to the node. Tie or no reveal (timeout): the bond is returned. Chosen verifiers that did not
    /// reveal lose `absentVerifierPenalty` of stake to the treasury.
    /// @param disputeId The dispute.
    /// @return outcome NodeSlashed, ChallengerLost or Void.
    function resolve(uint256 disputeId) external nonReentrant returns (Status outcome) {
        Dispute storage dispute = _openDispute(disputeId);
        uint256 revealed = uint256(dispute.guiltyVotes) + dispute.innocentVotes;
        if (block.timestamp <= dispute.revealDeadline && revealed < dispute.verifierCount) {
            revert TooEarlyToResolve(disputeId);
        }
        address node = dispute.node;
        address challenger = dispute.challenger;
        uint256 bond = dispute.bond;
        if (dispute.guiltyVotes > dispute.innocentVotes) outcome = Status.NodeSlashed;
        else if (dispute.innocentVotes > dispute.guiltyVotes) outcome = Status.ChallengerLost;
        else outcome = Status.Void;
        dispute.status = outcome;
        stakeManager.unlock(node);
        uint256 penalties = _penalizeAbsentVerifiers(disputeId, dispute);
        uint256 slashed = 0;
        uint256 reward = 0;
        if (outcome == Status.NodeSlashed) {
            slashed = stakeManager.slash(node, stakeManager.totalStakeOf(node) * wrongOutputSlashBps / BPS);
            reward = slashed * challengerRewardBps / BPS;
        }
        emit DisputeResolved(disputeId, outcome, slashed, reward);
        _payOut(outcome == Status.ChallengerLost ? node : challenger, bond + reward, slashed - reward + penalties);
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

    /// @dev Up to `verifierCount` listed members of the accused's slice, from a pseudo-random start
    /// (prevrandao), skipping the accused and the challenger; at most MAX_PROBES members are looked at.
    function _chooseVerifiers(uint256 disputeId, address node) private view returns (address[] memory chosen) {
        NodeRegistry.Node memory accused = nodeRegistry.getNode(node);
        bytes32 key = nodeRegistry.sliceKey(accused.modelId, accused.layerStart, accused.layerEnd);
        uint256 size = nodeRegistry.sliceNodeCount(key);
        uint256 probes = size < MAX_PROBES ? size : MAX_PROBES;
        uint256 start = uint256(keccak256(abi.encode(block.prevrandao, disputeId, node, msg.sender)));
        chosen = new address[](verifierCount);
        uint256 found;
        for (uint256 i = 0; i < probes && found < chosen.length; ++i) {
            address candidate = nodeRegistry.sliceNodeAt(key, (start + i) % size);
            if (candidate == node || candidate == msg.sender || !nodeRegistry.isListed(candidate)) continue;
            chosen[found++] = candidate;
        }
        if (found == 0) revert NoVerifiersAvailable();
        assembly ("memory-safe") {
            mstore(chosen, found)
        }
    }

    function _open(uint256 disputeId, address node, bytes32 digest) private returns (address[] memory chosen) {
        chosen = _chooseVerifiers(disputeId, node);
        Dispute storage dispute = _disputes[disputeId];
        for (uint256 i = 0; i < chosen.length; ++i) {
            dispute.verifiers[i] = chosen[i];
            _ballots[disputeId][chosen[i]].selected = true;
        }
        uint256 commitDeadline = block.timestamp + commitPeriod;
        dispute.node = node;
        dispute.challenger = msg.sender;
        dispute.status = Status.Open;
        dispute.commitDeadline = uint64(commitDeadline);
        dispute.revealDeadline = uint64(commitDeadline + revealPeriod);
        dispute.verifierCount = uint8(chosen.length);
        dispute.bond = uint128(challengeBond);
        dispute.commitmentDigest = digest;
    }

    function _emitOpened(uint256 disputeId, Commitment calldata commitment, address[] memory chosen, string calldata evidence)
        private
    {
        Dispute storage dispute = _disputes[disputeId];
        emit DisputeOpened(
            disputeId,
            dispute.node,
            dispute.challenger,
            dispute.commitmentDigest,
            commitment,
            chosen,
            dispute.commitDeadline,
            dispute.revealDeadline,
            evidence
        );
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

    function _payOut(address beneficiary, uint256 toBeneficiary, uint256 toTreasury) private {
        if (toBeneficiary != 0) token.safeTransfer(beneficiary, toBeneficiary);
        if (toTreasury != 0) token.safeTransfer(treasury, toTreasury);
    }

    function _openDispute(uint256 disputeId) private view returns (Dispute storage dispute) {
        dispute = _disputes[disputeId];
        if (dispute.status == Status.None) revert UnknownDispute(disputeId);
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
