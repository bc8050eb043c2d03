// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";

/// @title PaymentEscrow
/// @notice Clients deposit; nodes redeem client-signed EIP-712 receipts
/// `Receipt(client, node, cumulativeAmount, usageHash, nonce)`. Receipts are cumulative: a redeem pays
/// `cumulativeAmount - alreadyPaid` (capped by the client's balance; the rest is recorded as a shortfall
/// the node may collect later with the same receipt). Redeemed amounts are credited to the node inside the
/// escrow and leave it in one transfer (`withdrawEarnings`), so a batch of N receipts moves tokens zero times.
/// A client's withdrawal waits `withdrawalTimelock` after its request, so nodes can redeem first.
contract PaymentEscrow is EIP712, ReentrancyGuardTransient {
    using SafeERC20 for IERC20;

    bytes32 public constant RECEIPT_TYPEHASH =
        keccak256("Receipt(address client,address node,uint256 cumulativeAmount,bytes32 usageHash,uint256 nonce)");

    /// @notice One receipt of a batch; the node is the batch's. (v, r, s) is the client's signature.
    struct SignedReceipt {
        address client;
        uint256 cumulativeAmount;
        bytes32 usageHash;
        uint256 nonce;
        uint8 v;
        bytes32 r;
        bytes32 s;
    }

    /// @notice Why a batch skipped a receipt (reported in ReceiptRejected).
    enum Rejection {
        None,
        BadSignature,
        NotNewer,
        AmountTooLarge
    }

    struct ClientAccount {
        uint128 balance;
        uint64 withdrawalReadyAt;
    }

    /// @notice What a (client, node) channel has paid and the highest receipt amount redeemed; one storage slot.
    struct Channel {
        uint128 paid;
        uint128 claimed;
    }

    /// @notice The payment ERC-20.
    IERC20 public immutable token;
    /// @notice Seconds between a withdrawal request and the withdrawal.
    uint256 public immutable withdrawalTimelock;

    // Written through storage pointers; slither 0.11 reports it uninitialized only because it cannot build IR
    // for ReentrancyGuardTransient's tload/tstore (with the storage-slot guard the finding disappears).
    // slither-disable-next-line uninitialized-state
    mapping(address client => ClientAccount) private _accounts;
    mapping(address client => uint256) private _pendingWithdrawal;
    mapping(address client => mapping(address node => Channel)) private _channels;
    mapping(address node => uint256) private _earnings;

    event Deposited(address indexed client, address indexed from, uint256 amount);
    event WithdrawalRequested(address indexed client, uint256 amount, uint256 readyAt);
    event WithdrawalCancelled(address indexed client);
    event Withdrawn(address indexed client, uint256 amount);
    event ReceiptRedeemed(address indexed client, address indexed node, uint256 paid, uint256 cumulativeAmount);
    event Shortfall(address indexed client, address indexed node, uint256 owed);
    event ReceiptRejected(address indexed client, address indexed node, uint256 index, Rejection reason);
    event BatchRedeemed(address indexed node, uint256 paid, uint256 redeemed, uint256 rejected);
    event EarningsWithdrawn(address indexed node, address indexed to, uint256 amount);

    error ZeroAmount();
    error ZeroAddress();
    error AmountTooLarge(uint256 amount);
    error InsufficientBalance(uint256 balance, uint256 requested);
    error NoWithdrawalRequested();
    error WithdrawalLocked(uint256 readyAt);
    error InvalidReceiptSignature();
    error ReceiptNotNewer(uint256 cumulativeAmount, uint256 alreadyPaid);
    error NothingToWithdraw();

    /// @param token_ The payment ERC-20.
    /// @param withdrawalTimelock_ Seconds a client's withdrawal waits after its request.
    constructor(IERC20 token_, uint256 withdrawalTimelock_) EIP712("shardmarket", "1") {
        token = token_;
        withdrawalTimelock = withdrawalTimelock_;
    }

    /// @notice Add `amount` to `client`'s balance, paid by the caller (needs an allowance).
    /// @param client The account whose receipts this balance pays.
    /// @param amount Tokens deposited.
    function deposit(address client, uint256 amount) external nonReentrant {
        if (amount == 0) revert ZeroAmount();
        if (client == address(0)) revert ZeroAddress();
        ClientAccount storage account = _accounts[client];
        uint256 balance = uint256(account.balance) + amount;
        if (balance > type(uint128).max) revert AmountTooLarge(amount);
        account.balance = uint128(balance);
        emit Deposited(client, msg.sender, amount);
        token.safeTransferFrom(msg.sender, address(this), amount);
    }

    /// @notice Ask to withdraw `amount`; `withdraw` pays it (or what is left) after the timelock.
    /// A new request replaces the pending one and restarts the timelock.
    /// @param amount Tokens to withdraw, at most the current balance.
    function requestWithdrawal(uint256 amount) external {
        if (amount == 0) revert ZeroAmount();
        ClientAccount storage account = _accounts[msg.sender];
        if (amount > account.balance) revert InsufficientBalance(account.balance, amount);
        uint256 readyAt = block.timestamp + withdrawalTimelock;
        account.withdrawalReadyAt = uint64(readyAt);
        _pendingWithdrawal[msg.sender] = amount;
        emit WithdrawalRequested(msg.sender, amount, readyAt);
    }

    /// @notice Drop the caller's pending withdrawal request.
    function cancelWithdrawal() external {
        ClientAccount storage account = _accounts[msg.sender];
        if (account.withdrawalReadyAt == 0) revert NoWithdrawalRequested();
        account.withdrawalReadyAt = 0;
        delete _pendingWithdrawal[msg.sender];
        emit WithdrawalCancelled(msg.sender);
    }

    /// @notice Withdraw the requested amount (or the smaller balance left after redeems) once the timelock passed.
    function withdraw() external nonReentrant {
        ClientAccount storage account = _accounts[msg.sender];
        uint256 readyAt = account.withdrawalReadyAt;
        if (readyAt == 0) revert NoWithdrawalRequested();
        if (block.timestamp < readyAt) revert WithdrawalLocked(readyAt);
        uint256 requested = _pendingWithdrawal[msg.sender];
        uint256 amount = requested < account.balance ? requested : account.balance;
        account.balance -= uint128(amount);
        account.withdrawalReadyAt = 0;
        delete _pendingWithdrawal[msg.sender];
        emit Withdrawn(msg.sender, amount);
        if (amount != 0) token.safeTransfer(msg.sender, amount);
    }

    /// @notice Redeem one receipt signed by `client` for `node`; pays `node` (inside the escrow) what is new.
    /// @param client The paying client (the signer).
    /// @param node The paid node.
    /// @param cumulativeAmount Total the client owes the node so far.
    /// @param usageHash Hash chain of the usage records the receipt covers.
    /// @param nonce The client's receipt counter for this node.
    /// @param signature The client's 65-byte r||s||v signature (low s).
    /// @return paid Tokens credited to the node now.
    function redeem(
        address client,
        address node,
        uint256 cumulativeAmount,
        bytes32 usageHash,
        uint256 nonce,
        bytes calldata signature
    ) external returns (uint256 paid) {
        if (cumulativeAmount > type(uint128).max) revert AmountTooLarge(cumulativeAmount);
        // The third return value only details the error, which is rejected whatever it is.
        // slither-disable-next-line unused-return
        (address signer, ECDSA.RecoverError error,) =
            ECDSA.tryRecover(_digest(client, node, cumulativeAmount, usageHash, nonce), signature);
        if (error != ECDSA.RecoverError.NoError || signer != client) revert InvalidReceiptSignature();
        Channel memory channel = _channels[client][node];
        if (cumulativeAmount <= channel.paid) revert ReceiptNotNewer(cumulativeAmount, channel.paid);
        paid = _settle(client, node, cumulativeAmount, channel);
        _earnings[node] += paid;
    }

    /// @notice Redeem many clients' receipts for `node` in one transaction. A bad receipt (bad signature,
    /// not newer than what was paid, amount too large) is skipped and reported in ReceiptRejected; the rest pay.
    /// @param node The paid node.
    /// @param receipts The receipts, each signed by its client (a client twice: the second pays only if newer).
    /// @return paid Total tokens credited to the node.
    function redeemBatch(address node, SignedReceipt[] calldata receipts) external returns (uint256 paid) {
        uint256 rejected = 0;
        for (uint256 i = 0; i < receipts.length; ++i) {
            SignedReceipt calldata receipt = receipts[i];
            Rejection reason = _check(node, receipt);
            if (reason != Rejection.None) {
                emit ReceiptRejected(receipt.client, node, i, reason);
                ++rejected;
                continue;
            }
            paid += _settle(receipt.client, node, receipt.cumulativeAmount, _channels[receipt.client][node]);
        }
        _earnings[node] += paid;
        emit BatchRedeemed(node, paid, receipts.length - rejected, rejected);
    }

    /// @notice Send all of the caller's (a node's) redeemed earnings to `to`.
    /// @param to Receiver of the tokens.
    function withdrawEarnings(address to) external nonReentrant {
        if (to == address(0)) revert ZeroAddress();
        uint256 amount = _earnings[msg.sender];
        if (amount == 0) revert NothingToWithdraw();
        _earnings[msg.sender] = 0;
        emit EarningsWithdrawn(msg.sender, to, amount);
        token.safeTransfer(to, amount);
    }

    /// @notice `client`'s balance in the escrow.
    function balanceOf(address client) external view returns (uint256) {
        return _accounts[client].balance;
    }

    /// @notice What a node can still count on from `client`: balance minus a pending withdrawal request.
    function spendableOf(address client) external view returns (uint256) {
        ClientAccount storage account = _accounts[client];
        if (account.withdrawalReadyAt == 0) return account.balance;
        uint256 pending = _pendingWithdrawal[client];
        return pending < account.balance ? account.balance - pending : 0;
    }

    /// @notice `client`'s pending withdrawal: amount and the time it can be executed (0 if none).
    function pendingWithdrawalOf(address client) external view returns (uint256 amount, uint256 readyAt) {
        return (_pendingWithdrawal[client], _accounts[client].withdrawalReadyAt);
    }

    /// @notice What `client` has paid `node` and the highest receipt amount redeemed (claimed - paid is owed).
    function channelOf(address client, address node) external view returns (uint256 paid, uint256 claimed) {
        Channel memory channel = _channels[client][node];
        return (channel.paid, channel.claimed);
    }

    /// @notice Redeemed tokens `node` can withdraw.
    function earningsOf(address node) external view returns (uint256) {
        return _earnings[node];
    }

    /// @notice The EIP-712 digest a client signs for a receipt (matches node/chain/eip712.py).
    function receiptDigest(address client, address node, uint256 cumulativeAmount, bytes32 usageHash, uint256 nonce)
        external
        view
        returns (bytes32)
    {
        return _digest(client, node, cumulativeAmount, usageHash, nonce);
    }

    /// @notice The EIP-712 domain separator of this escrow.
    function domainSeparator() external view returns (bytes32) {
        return _domainSeparatorV4();
    }

    function _check(address node, SignedReceipt calldata receipt) private view returns (Rejection) {
        if (receipt.cumulativeAmount > type(uint128).max) return Rejection.AmountTooLarge;
        if (receipt.cumulativeAmount <= _channels[receipt.client][node].paid) return Rejection.NotNewer;
        bytes32 digest = _digest(receipt.client, node, receipt.cumulativeAmount, receipt.usageHash, receipt.nonce);
        // slither-disable-next-line unused-return
        (address signer, ECDSA.RecoverError error,) = ECDSA.tryRecover(digest, receipt.v, receipt.r, receipt.s);
        if (error != ECDSA.RecoverError.NoError || signer != receipt.client) return Rejection.BadSignature;
        return Rejection.None;
    }

    /// @dev Pays what is new on a checked receipt, up to the client's balance; records any shortfall.
    function _settle(address client, address node, uint256 cumulativeAmount, Channel memory channel)
        private
        returns (uint256 paid)
    {
        uint256 due = cumulativeAmount - channel.paid;
        ClientAccount storage account = _accounts[client];
        uint256 balance = account.balance;
        paid = due < balance ? due : balance;
        account.balance = uint128(balance - paid);
        channel.paid += uint128(paid);
        if (cumulativeAmount > channel.claimed) channel.claimed = uint128(cumulativeAmount);
        _channels[client][node] = channel;
        emit ReceiptRedeemed(client, node, paid, cumulativeAmount);
        if (paid < due) emit Shortfall(client, node, due - paid);
    }

    function _digest(address client, address node, uint256 cumulativeAmount, bytes32 usageHash, uint256 nonce)
        private
        view
        returns (bytes32)
    {
        return _hashTypedDataV4(keccak256(abi.encode(RECEIPT_TYPEHASH, client, node, cumulativeAmount, usageHash, nonce)));
    }
}
