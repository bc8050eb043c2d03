// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {AccessControl} from "@openzeppelin/contracts/access/AccessControl.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";

/// @title StakeManager
/// @notice Nodes stake the market's ERC-20 here, unbond with a delay and withdraw after it.
/// Only holders of SLASHER_ROLE (the DisputeManager) can slash, and slashing reaches unbonding
/// stake too, so a node cannot unbond to escape a dispute. A slasher can also lock a node's
/// withdrawal while a dispute against it is open. The block of a node's last stake is kept: the DisputeManager
/// seats as verifiers only nodes whose stake did not grow after a challenge was sent (see NodeRegistry.verifierAt).
contract StakeManager is AccessControl, ReentrancyGuardTransient {
    using SafeERC20 for IERC20;

    bytes32 public constant SLASHER_ROLE = keccak256("SLASHER_ROLE");

    struct StakeInfo {
        uint128 bonded;
        uint128 unbonding;
        uint64 unbondReadyAt;
        uint32 locks;
        uint64 stakedAt; // block of the last `stake`
    }

    /// @notice The staked ERC-20.
    IERC20 public immutable token;
    /// @notice Seconds between an unbond request and the withdrawal it allows.
    uint256 public immutable unbondingDelay;

    mapping(address node => StakeInfo) private _stakes;

    event Staked(address indexed node, uint256 amount, uint256 bonded);
    event UnbondRequested(address indexed node, uint256 amount, uint256 unbonding, uint256 readyAt);
    event Withdrawn(address indexed node, uint256 amount);
    event Slashed(address indexed node, uint256 amount, address indexed slasher);
    event Locked(address indexed node, uint256 locks);
    event Unlocked(address indexed node, uint256 locks);

    error ZeroAmount();
    error AmountTooLarge(uint256 amount);
    error InsufficientBondedStake(uint256 bonded, uint256 requested);
    error NothingUnbonding();
    error UnbondingNotReady(uint256 readyAt);
    error StakeLocked(address node);
    error NotLocked(address node);

    /// @param token_ The ERC-20 staked.
    /// @param unbondingDelay_ Seconds an unbonding stake waits before withdrawal (and stays slashable).
    /// @param admin Holder of DEFAULT_ADMIN_ROLE, who grants SLASHER_ROLE to the DisputeManager.
    constructor(IERC20 token_, uint256 unbondingDelay_, address admin) {
        token = token_;
        unbondingDelay = unbondingDelay_;
        _grantRole(DEFAULT_ADMIN_ROLE, admin);
    }

    /// @notice Stake `amount` tokens for the caller (needs an allowance).
    /// @param amount Tokens added to the caller's bonded stake.
    function stake(uint256 amount) external nonReentrant {
        if (amount == 0) revert ZeroAmount();
        StakeInfo storage info = _stakes[msg.sender];
        uint256 bonded = uint256(info.bonded) + amount;
        if (bonded > type(uint128).max) revert AmountTooLarge(amount);
        info.bonded = uint128(bonded);
        info.stakedAt = uint64(block.number);
        emit Staked(msg.sender, amount, bonded);
        token.safeTransferFrom(msg.sender, address(this), amount);
    }

    /// @notice Move `amount` of the caller's bonded stake to unbonding; restarts the delay for all unbonding stake.
    /// @param amount Tokens to unbond.
    function unbond(uint256 amount) external {
        if (amount == 0) revert ZeroAmount();
        StakeInfo storage info = _stakes[msg.sender];
        if (amount > info.bonded) revert InsufficientBondedStake(info.bonded, amount);
        info.bonded -= uint128(amount);
        info.unbonding += uint128(amount);
        uint256 readyAt = block.timestamp + unbondingDelay;
        info.unbondReadyAt = uint64(readyAt);
        emit UnbondRequested(msg.sender, amount, info.unbonding, readyAt);
    }

    /// @notice Withdraw all of the caller's unbonding stake once the delay has passed and no dispute locks it.
    function withdraw() external nonReentrant {
        StakeInfo storage info = _stakes[msg.sender];
        uint256 amount = info.unbonding;
        if (amount == 0) revert NothingUnbonding();
        if (block.timestamp < info.unbondReadyAt) revert UnbondingNotReady(info.unbondReadyAt);
        if (info.locks != 0) revert StakeLocked(msg.sender);
        info.unbonding = 0;
        emit Withdrawn(msg.sender, amount);
        token.safeTransfer(msg.sender, amount);
    }

    /// @notice Take up to `amount` of `node`'s stake (bonded first, then unbonding) and send it to the caller.
    /// @param node The slashed node.
    /// @param amount Tokens to take; capped at the node's total stake.
    /// @return slashed Tokens actually taken and sent to the caller.
    function slash(address node, uint256 amount) external onlyRole(SLASHER_ROLE) nonReentrant returns (uint256 slashed) {
        StakeInfo storage info = _stakes[node];
        uint256 fromBonded = amount < info.bonded ? amount : info.bonded;
        uint256 rest = amount - fromBonded;
        uint256 fromUnbonding = rest < info.unbonding ? rest : info.unbonding;
        info.bonded -= uint128(fromBonded);
        info.unbonding -= uint128(fromUnbonding);
        slashed = fromBonded + fromUnbonding;
        emit Slashed(node, slashed, msg.sender);
        if (slashed != 0) token.safeTransfer(msg.sender, slashed);
    }

    /// @notice Block `node`'s withdrawals until a matching `unlock` (one lock per open dispute).
    /// @param node The node under dispute.
    function lock(address node) external onlyRole(SLASHER_ROLE) {
        uint32 locks = ++_stakes[node].locks;
        emit Locked(node, locks);
    }

    /// @notice Release one lock taken by `lock`.
    /// @param node The node whose dispute ended.
    function unlock(address node) external onlyRole(SLASHER_ROLE) {
        StakeInfo storage info = _stakes[node];
        if (info.locks == 0) revert NotLocked(node);
        uint32 locks = --info.locks;
        emit Unlocked(node, locks);
    }

    /// @notice Bonded (not unbonding) stake of `node`: what counts for listing.
    function bondedOf(address node) external view returns (uint256) {
        return _stakes[node].bonded;
    }

    /// @notice Bonded plus unbonding stake of `node`: what a slash can reach.
    function totalStakeOf(address node) external view returns (uint256) {
        StakeInfo storage info = _stakes[node];
        return uint256(info.bonded) + info.unbonding;
    }

    /// @notice Full stake record of `node`.
    function stakeOf(address node) external view returns (StakeInfo memory) {
        return _stakes[node];
    }
}
