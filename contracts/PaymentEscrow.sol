// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {IERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/IERC20Permit.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {ECDSA} from "@openzeppelin/contracts/utils/cryptography/ECDSA.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {MessageHashUtils} from "@openzeppelin/contracts/utils/cryptography/MessageHashUtils.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";
import {ENTRY_AMOUNT, ENTRY_BYTES, MAX_ENTRIES, PAID_BYTES, PackedTab} from "./PackedTab.sol";

/// @title PaymentEscrow
/// @notice Clients deposit; anyone settles client-signed EIP-712 tabs `Tab(client, seq, Entry(node, amount)[],
/// usageHash)`. A tab is one cumulative promise per client covering every node it pays (entries sorted by node,
/// amounts cumulative per node, seq one higher per tab). Settling pays each node `max(0, amount - alreadyPaid)` in
/// entry order, capped by the client's balance (a shortfall stays owed: a later settlement, even of the same tab, pays
/// the rest). The escrow keeps one storage slot per client: balance, the highest seq settled and a hash of the paid
/// vector (what it has paid each node of the client); the settler passes the paid amounts in calldata and nodes
/// rebuild the vector from TabSettled and Claimed. Payments are credited to nodes inside the escrow and leave it in
/// one transfer (`withdrawEarnings`). A client's withdrawal waits `withdrawalTimelock` after its request, so nodes
/// can settle first.
///
/// Every tab a client signs is a debt: `claim` pays a node what any one tab promised it beyond what it was paid, from
/// the client's balance and then from the reserve the client set aside for that node. The balance is shared by every
/// payee, so a client can drain it by signing a newer tab that pays an alias first; a reserve is the part of a
/// client's money that only one node can draw on, and that the client gets back only `withdrawalTimelock` after
/// asking. A node that serves a client no further than that client's reserve for it (plus the credit it chooses to
/// risk) is paid in full whatever the client signs or settles later.
contract PaymentEscrow is EIP712, ReentrancyGuardTransient {
    using SafeERC20 for IERC20;

    bytes32 public constant ENTRY_TYPEHASH = keccak256("Entry(address node,uint128 amount)");
    bytes32 public constant TAB_TYPEHASH = keccak256(
        "Tab(address client,uint32 seq,Entry[] entries,bytes32 usageHash)Entry(address node,uint128 amount)"
    );

    /// @notice What a client owes one node, cumulatively (the EIP-712 type; `tabDigest` takes it ABI-encoded).
    struct Entry {
        address node;
        uint128 amount;
    }

    /// @notice A client's cumulative promise to every node it pays (the EIP-712 type).
    struct Tab {
        address client;
        uint32 seq;
        Entry[] entries;
        bytes32 usageHash;
    }

    /// @notice Why `settleTabs` skipped an item (reported in TabRejected).
    enum Rejection {
        None,
        BadSignature,
        StaleSeq,
        WrongPrevious,
        Malformed
    }

    /// @notice One slot per client. The 128-bit paid hash: passing a forged paid vector needs a second preimage
    /// of the stored value (2^128 work); a client choosing both vectors of a collision (birthday) needs 2^64.
    /// 88 bits would leave that birthday attack at 2^44, within reach of a few GPUs, which is why the withdrawal
    /// time lives in the (rarely written) withdrawal slot instead.
    struct ClientAccount {
        uint96 balance;
        uint32 seq;
        uint128 paidHash;
    }

    /// @notice A pending withdrawal request.
    struct Withdrawal {
        uint96 amount;
        uint40 readyAt;
    }

    /// @notice Money a client set aside for one node; `releaseAt` is when the client may take it back (0: not asked).
    struct Reserve {
        uint96 amount;
        uint40 releaseAt;
    }

    /// @notice The payment ERC-20.
    IERC20 public immutable token;
    /// @notice Seconds between a withdrawal (or reserve release) request and the withdrawal (or release).
    uint256 public immutable withdrawalTimelock;

    // slither 0.11 reports these uninitialized only because it cannot build IR for ReentrancyGuardTransient's
    // tload/tstore (with the storage-slot guard the finding disappears).
    // slither-disable-next-line uninitialized-state
    mapping(address client => ClientAccount) private _accounts;
    mapping(address client => Withdrawal) private _withdrawals;
    mapping(address node => uint256) private _earnings;
    // slither-disable-next-line uninitialized-state
    mapping(address client => mapping(address node => Reserve)) private _reserves;

    event Deposited(address indexed client, address indexed from, uint256 amount);
    event WithdrawalRequested(address indexed client, uint256 amount, uint256 readyAt);
    event WithdrawalCancelled(address indexed client);
    event Withdrawn(address indexed client, uint256 amount);
    /// @notice A tab was settled; `paid` is the client's new paid vector, packed entries sorted by node (what the escrow
    /// has paid each node of the client in all, the nodes paid nothing left out).
    event TabSettled(address indexed client, uint32 seq, bytes paid);
    event TabRejected(address indexed client, uint256 index, Rejection reason);
    event EarningsWithdrawn(address indexed node, address indexed to, uint256 amount);
    /// @notice `node` was paid what `client`'s tab `tabSeq` promised it beyond what it had been paid: `fromBalance` out
    /// of the client's balance, `fromReserve` out of its reserve for `node`. `seq` is the client's settled seq (unchanged)
    /// and `paid` its new paid vector, packed like TabSettled's (nodes rebuild the paid vector from both, in log order).
    event Claimed(
        address indexed client,
        address indexed node,
        uint32 seq,
        uint32 tabSeq,
        uint256 fromBalance,
        uint256 fromReserve,
        bytes paid
    );
    /// @notice `client` moved `amount` from its balance into its reserve for `node`, which now holds `reserve`.
    event ReserveFunded(address indexed client, address indexed node, uint256 amount, uint256 reserve);
    event ReserveReleaseRequested(address indexed client, address indexed node, uint256 amount, uint256 readyAt);
    event ReserveReleaseCancelled(address indexed client, address indexed node);
    /// @notice `client`'s reserve for `node` went back into its balance.
    event ReserveReleased(address indexed client, address indexed node, uint256 amount);

    error ZeroAmount();
    error PermitFailed(uint256 allowance, uint256 amount);
    error ZeroAddress();
    error AmountTooLarge(uint256 amount);
    error InsufficientBalance(uint256 balance, uint256 requested);
    error NoWithdrawalRequested();
    error WithdrawalLocked(uint256 readyAt);
    error NothingToWithdraw();
    error TruncatedTab(uint256 index);
    /// @notice `nodes` and `amounts` differ in length, or name more than MAX_ENTRIES nodes.
    error BadReserveList();
    error NoReserve(address node);
    error NoReleaseRequested(address node);
    error ReserveLocked(address node, uint256 readyAt);
    /// @notice A claim's `tab` is not one packed signed tab (1..MAX_ENTRIES sorted entries, no paid amounts).
    error MalformedClaim();
    error BadTabSignature(uint32 seq);
    /// @notice The paid vector passed is not the client's current one (rebuild it from TabSettled and Claimed).
    error WrongPaidVector();
    error NothingOwed(address node, uint256 promised, uint256 paid, uint256 available);

    /// @param token_ The payment ERC-20.
    /// @param withdrawalTimelock_ Seconds a client's withdrawal or reserve release waits after its request.
    constructor(IERC20 token_, uint256 withdrawalTimelock_) EIP712("shardmarket", "1") {
        token = token_;
        withdrawalTimelock = withdrawalTimelock_;
    }

    // ---- clients: deposits, reserves, withdrawals

    /// @notice Add `amount` to `client`'s balance, paid by the caller (needs an allowance).
    /// @param client The account whose tabs this balance pays.
    /// @param amount Tokens deposited.
    function deposit(address client, uint256 amount) external nonReentrant {
        _deposit(client, amount);
    }

    /// @notice Add `amount` to `client`'s balance, paid by the caller, who approves it with an EIP-2612 permit signature
    /// in the same transaction (no separate approve). A permit someone front-ran (its nonce used) still lets the deposit
    /// through when the allowance it granted is there, as OpenZeppelin's IERC20Permit advises.
    /// @param client The account whose tabs this balance pays.
    /// @param amount Tokens deposited (and the permit's value).
    /// @param deadline The permit's deadline (unix seconds).
    /// @param v The permit signature's recovery byte.
    /// @param r The permit signature's r.
    /// @param s The permit signature's s.
    function depositWithPermit(address client, uint256 amount, uint256 deadline, uint8 v, bytes32 r, bytes32 s)
        external
        nonReentrant
    {
        try IERC20Permit(address(token)).permit(msg.sender, address(this), amount, deadline, v, r, s) {}
        catch {
            uint256 allowance = token.allowance(msg.sender, address(this));
            if (allowance < amount) revert PermitFailed(allowance, amount);
        }
        _deposit(client, amount);
    }

    function _deposit(address client, uint256 amount) private {
        if (amount == 0) revert ZeroAmount();
        if (client == address(0)) revert ZeroAddress();
        ClientAccount storage account = _accounts[client];
        uint256 balance = uint256(account.balance) + amount;
        if (balance > type(uint96).max) revert AmountTooLarge(amount);
        account.balance = uint96(balance);
        emit Deposited(client, msg.sender, amount);
        token.safeTransferFrom(msg.sender, address(this), amount);
    }

    /// @notice Move `amounts[k]` of the caller's balance into its reserve for `nodes[k]`, which only that node's
    /// claims can draw on, and which comes back to the balance only `withdrawalTimelock` after `requestReserveRelease`.
    /// @param nodes The nodes to set money aside for (at most MAX_ENTRIES).
    /// @param amounts Tokens added to each node's reserve.
    function fundReserves(address[] calldata nodes, uint256[] calldata amounts) external {
        if (nodes.length != amounts.length || nodes.length > MAX_ENTRIES) revert BadReserveList();
        ClientAccount storage account = _accounts[msg.sender];
        uint256 balance = account.balance;
        for (uint256 k = 0; k < nodes.length; ++k) {
            (address node, uint256 amount) = (nodes[k], amounts[k]);
            if (node == address(0)) revert ZeroAddress();
            if (amount == 0) revert ZeroAmount();
            if (amount > balance) revert InsufficientBalance(balance, amount);
            balance -= amount;
            Reserve storage reserve = _reserves[msg.sender][node];
            uint256 total = reserve.amount + amount;
            if (total > type(uint96).max) revert AmountTooLarge(amount);
            reserve.amount = uint96(total);
            emit ReserveFunded(msg.sender, node, amount, total);
        }
        account.balance = uint96(balance);
    }

    /// @notice Ask to take back the caller's reserve for `node`; `releaseReserve` moves it to the balance after the
    /// timelock (meanwhile the node can still claim from it). A new request restarts the timelock.
    /// @param node The node whose reserve is released.
    function requestReserveRelease(address node) external {
        Reserve storage reserve = _reserves[msg.sender][node];
        if (reserve.amount == 0) revert NoReserve(node);
        uint256 readyAt = block.timestamp + withdrawalTimelock;
        reserve.releaseAt = uint40(readyAt);
        emit ReserveReleaseRequested(msg.sender, node, reserve.amount, readyAt);
    }

    /// @notice Keep the caller's reserve for `node` after all.
    /// @param node The node whose reserve release is cancelled.
    function cancelReserveRelease(address node) external {
        Reserve storage reserve = _reserves[msg.sender][node];
        if (reserve.releaseAt == 0) revert NoReleaseRequested(node);
        reserve.releaseAt = 0;
        emit ReserveReleaseCancelled(msg.sender, node);
    }

    /// @notice Move the caller's reserve for `node` (what its claims left) back into its balance, once the timelock of
    /// its release request passed.
    /// @param node The node whose reserve is released.
    function releaseReserve(address node) external {
        Reserve memory reserve = _reserves[msg.sender][node];
        if (reserve.releaseAt == 0) revert NoReleaseRequested(node);
        if (block.timestamp < reserve.releaseAt) revert ReserveLocked(node, reserve.releaseAt);
        delete _reserves[msg.sender][node];
        _accounts[msg.sender].balance += reserve.amount; // checked: a balance refilled to near 2^96 must be spent first
        emit ReserveReleased(msg.sender, node, reserve.amount);
    }

    /// @notice Ask to withdraw `amount`; `withdraw` pays it (or what is left) after the timelock.
    /// A new request replaces the pending one and restarts the timelock.
    /// @param amount Tokens to withdraw, at most the current balance.
    function requestWithdrawal(uint256 amount) external {
        if (amount == 0) revert ZeroAmount();
        uint256 balance = _accounts[msg.sender].balance;
        if (amount > balance) revert InsufficientBalance(balance, amount);
        uint256 readyAt = block.timestamp + withdrawalTimelock;
        _withdrawals[msg.sender] = Withdrawal(uint96(amount), uint40(readyAt));
        emit WithdrawalRequested(msg.sender, amount, readyAt);
    }

    /// @notice Drop the caller's pending withdrawal request.
    function cancelWithdrawal() external {
        if (_withdrawals[msg.sender].readyAt == 0) revert NoWithdrawalRequested();
        delete _withdrawals[msg.sender];
        emit WithdrawalCancelled(msg.sender);
    }

    /// @notice Withdraw the requested amount (or the smaller balance left after settlements) once the timelock passed.
    function withdraw() external nonReentrant {
        Withdrawal memory request = _withdrawals[msg.sender];
        if (request.readyAt == 0) revert NoWithdrawalRequested();
        if (block.timestamp < request.readyAt) revert WithdrawalLocked(request.readyAt);
        ClientAccount storage account = _accounts[msg.sender];
        uint256 amount = request.amount < account.balance ? request.amount : account.balance;
        account.balance -= uint96(amount);
        delete _withdrawals[msg.sender];
        emit Withdrawn(msg.sender, amount);
        if (amount != 0) token.safeTransfer(msg.sender, amount);
    }

    // ---- nodes: settlements, claims, earnings

    /// @notice Settle many clients' tabs in one transaction; any caller may (a tab names its payees). A bad item (bad
    /// signature, seq below the settled one, paid amounts that are not the client's current paid vector, malformed
    /// entries) is skipped and reported in TabRejected; the rest pay.
    /// @param tabs Packed tabs (see PackedTab), one after another, each with the client's current paid amounts
    /// appended (none at first; from its last TabSettled or Claimed). shardmarket/chain/eip712.py `pack_tab` writes
    /// them. A truncated tab reverts.
    /// @return paid Total tokens credited to nodes.
    function settleTabs(bytes calldata tabs) external returns (uint256 paid) {
        bytes32 domain = _domainSeparatorV4();
        uint256 at = 0;
        for (uint256 i = 0; at < tabs.length; ++i) {
            PackedTab.Location memory tab = PackedTab.locate(tabs, at);
            if (!tab.fits) revert TruncatedTab(i);
            (Rejection reason, uint256 total) = _settle(tab, domain);
            if (reason != Rejection.None) emit TabRejected(tab.client, i, reason);
            // no overflow: `fits` keeps `at` within the calldata, and `paid` counts tokens the escrow holds
            unchecked {
                at += tab.size;
                paid += total;
            }
        }
    }

    /// @notice Pay `node` what one tab its client signed promised it beyond what the escrow has paid it: out of the
    /// client's balance, then out of the client's reserve for `node`. Any tab counts, older or newer than the settled
    /// one, so a node holding a tab it acknowledged is paid even after the client signed and settled tabs promising it
    /// less or paying others first. Any caller may send it; it pays `node` only.
    /// @param node The payee.
    /// @param tab One signed tab with no paid amounts (shardmarket/chain/eip712.py `pack_tab(tab, signature)`, the form
    /// a node stores).
    /// @param paid The client's current paid vector, packed (its last TabSettled or Claimed `paid`).
    /// @return amount Tokens credited to `node`.
    function claim(address node, bytes calldata tab, bytes calldata paid) external returns (uint256 amount) {
        PackedTab.Location memory location = PackedTab.locate(tab, 0);
        if (!location.fits || location.size != tab.length || location.paidCount != 0) revert MalformedClaim();
        uint256 promised = _promised(location, node);
        ClientAccount memory account = _accounts[location.client];
        if (paid.length % ENTRY_BYTES != 0 || _hash(paid) != account.paidHash) revert WrongPaidVector();
        (uint256 fromBalance, uint256 fromReserve, bytes memory vector) =
            _drawOwed(location.client, node, promised, account.balance, paid);
        amount = fromBalance + fromReserve;
        _accounts[location.client] = ClientAccount(uint96(account.balance - fromBalance), account.seq, _hash(vector));
        _earnings[node] += amount;
        emit Claimed(location.client, node, account.seq, location.seq, fromBalance, fromReserve, vector);
    }

    /// @notice Send all of the caller's (a node's) earnings to `to`.
    /// @param to Receiver of the tokens.
    function withdrawEarnings(address to) external nonReentrant {
        if (to == address(0)) revert ZeroAddress();
        uint256 amount = _earnings[msg.sender];
        if (amount == 0) revert NothingToWithdraw();
        _earnings[msg.sender] = 0;
        emit EarningsWithdrawn(msg.sender, to, amount);
        token.safeTransfer(to, amount);
    }

    // ---- views

    /// @notice `client`'s balance in the escrow (its reserves not included).
    function balanceOf(address client) external view returns (uint256) {
        return _accounts[client].balance;
    }

    /// @notice What a node can still count on from `client`'s balance: balance minus a pending withdrawal request.
    function spendableOf(address client) public view returns (uint256) {
        uint256 balance = _accounts[client].balance;
        Withdrawal memory request = _withdrawals[client];
        if (request.readyAt == 0) return balance;
        return request.amount < balance ? balance - request.amount : 0;
    }

    /// @notice `client`'s pending withdrawal: amount and the time it can be executed (0 if none).
    function pendingWithdrawalOf(address client) external view returns (uint256 amount, uint256 readyAt) {
        Withdrawal memory request = _withdrawals[client];
        return (request.amount, request.readyAt);
    }

    /// @notice `client`'s reserve for `node` and when the client may take it back (0: no release asked).
    function reserveOf(address client, address node) external view returns (uint256 amount, uint256 releaseAt) {
        Reserve memory reserve = _reserves[client][node];
        return (reserve.amount, reserve.releaseAt);
    }

    /// @notice What `node` can count on from `client`: its spendable balance (shared with every payee) and its reserve
    /// for `node` (0 while the client is taking it back).
    function creditOf(address client, address node) external view returns (uint256 spendable, uint256 reserve) {
        Reserve memory held = _reserves[client][node];
        return (spendableOf(client), held.releaseAt == 0 ? held.amount : 0);
    }

    /// @notice The highest tab seq settled for `client` and the hash of its paid vector (0: nothing paid yet).
    function tabOf(address client) external view returns (uint32 seq, uint128 paidHash) {
        ClientAccount memory account = _accounts[client];
        return (account.seq, account.paidHash);
    }

    /// @notice Earnings `node` can withdraw.
    function earningsOf(address node) external view returns (uint256) {
        return _earnings[node];
    }

    /// @notice The EIP-712 digest a client signs for `tab` (matches shardmarket/chain/eip712.py).
    function tabDigest(Tab calldata tab) external view returns (bytes32) {
        bytes32[] memory hashes = new bytes32[](tab.entries.length);
        for (uint256 k = 0; k < tab.entries.length; ++k) {
            hashes[k] = keccak256(abi.encode(ENTRY_TYPEHASH, tab.entries[k].node, tab.entries[k].amount));
        }
        bytes32 entriesHash = keccak256(abi.encodePacked(hashes));
        return _hashTypedDataV4(keccak256(abi.encode(TAB_TYPEHASH, tab.client, tab.seq, entriesHash, tab.usageHash)));
    }

    /// @notice The hash `tabOf` reports for a packed paid vector (matches shardmarket/chain/eip712.py): the low 128 bits
    /// of its keccak256, 0 for the empty vector.
    function paidVectorHash(bytes calldata paid) external pure returns (uint128) {
        return _hash(paid);
    }

    /// @notice The EIP-712 domain separator of this escrow.
    function domainSeparator() external view returns (bytes32) {
        return _domainSeparatorV4();
    }

    // ---- internals

    /// @dev Checks one item (cheap checks first, the signature last; a rejected item changes nothing), then pays its
    /// tab in entry order up to the client's balance, stores the new paid vector's hash and logs TabSettled.
    function _settle(PackedTab.Location memory tab, bytes32 domain) private returns (Rejection, uint256 total) {
        if (tab.client == address(0) || tab.count == 0 || tab.count > MAX_ENTRIES) return (Rejection.Malformed, 0);
        if (tab.paidCount != 0 && tab.paidCount != tab.count) return (Rejection.WrongPrevious, 0);
        ClientAccount memory account = _accounts[tab.client];
        if (tab.seq < account.seq) return (Rejection.StaleSeq, 0);
        (uint256 vector, bytes32 entriesHash, uint128 previousHash) = _scan(tab);
        if (vector == 0) return (Rejection.Malformed, 0);
        if (previousHash != account.paidHash) return (Rejection.WrongPrevious, 0);
        if (!_signedByClient(tab, entriesHash, domain)) return (Rejection.BadSignature, 0);
        uint256 remaining;
        (remaining, total) = _pay(tab.count, vector, account.balance);
        bytes memory paid = _pack(tab.count, vector);
        _accounts[tab.client] = ClientAccount(uint96(remaining), tab.seq, _hash(paid));
        emit TabSettled(tab.client, tab.seq, paid);
        return (Rejection.None, total);
    }

    /// @dev Whether the tab's client signed it (EIP-712 under `domain`, a low s as OpenZeppelin's ECDSA requires).
    function _signedByClient(PackedTab.Location memory tab, bytes32 entriesHash, bytes32 domain) private pure returns (bool) {
        (bytes32 usageHash, uint8 v, bytes32 r, bytes32 s) = PackedTab.signature(tab);
        bytes32 structHash = keccak256(abi.encode(TAB_TYPEHASH, tab.client, tab.seq, entriesHash, usageHash));
        // the third value only details the error, which a rejected tab does not report
        // slither-disable-next-line unused-return
        (address signer, ECDSA.RecoverError error,) =
            ECDSA.tryRecover(MessageHashUtils.toTypedDataHash(domain, structHash), v, r, s);
        return error == ECDSA.RecoverError.NoError && signer == tab.client;
    }

    /// @dev What a claim's tab promises `node`, after checking its entries and that its client signed it.
    function _promised(PackedTab.Location memory tab, address node) private view returns (uint256 promised) {
        if (tab.client == address(0) || tab.count == 0 || tab.count > MAX_ENTRIES) revert MalformedClaim();
        (uint256 vector, bytes32 entriesHash,) = _scan(tab);
        if (vector == 0) revert MalformedClaim();
        if (!_signedByClient(tab, entriesHash, _domainSeparatorV4())) revert BadTabSignature(tab.seq);
        for (uint256 k = 0; k < tab.count; ++k) {
            (address named, uint256 amount) = PackedTab.entry(tab, k);
            if (named == node) return amount;
        }
    }

    // The settlement's hot loops (`_scan`, `_pay`, `_pack`) are assembly: written with Solidity memory arrays and
    // checked arithmetic, a warm one-client settlement of 3 entries cost 10,000 gas more (69,088 against 59,043 gas,
    // bench/gas.py), a settlement in a batch of 100 clients 11,000 more per client. They share one memory layout, the
    // scanned vector: for entry k of the tab, three words at `vector + 0x60 * k`: its node, its amount, and what the
    // escrow has paid that node (before `_pay`: the paid amount appended to the tab; after: raised by what `_pay` paid).
    // Each reads only a tab that `PackedTab.locate` found whole (`fits`) and whose entry count is at most MAX_ENTRIES.

    /// @dev One pass over a tab's entries: the scanned vector (see above; 0 when the entries are not sorted by node,
    /// have duplicates or a zero address), the entries' EIP-712 hash, and the paid-vector hash of the paid amounts.
    function _scan(PackedTab.Location memory tab)
        private
        pure
        returns (uint256 vector, bytes32 entriesHash, uint128 previousHash)
    {
        bytes32 entryTypehash = ENTRY_TYPEHASH;
        (uint256 count, uint256 entries, uint256 paid) = (tab.count, tab.entries, tab.paidCount == 0 ? 0 : tab.paid);
        assembly ("memory-safe") {
            vector := mload(0x40)
            // scratch past the vector, left unallocated: one entry to hash (3 words), the entry hashes (a word each),
            // then the paid amounts packed as a paid vector (36 bytes per node paid something, and 16 of overrun)
            let scratch := add(vector, mul(count, 0x60))
            mstore(0x40, scratch)
            mstore(scratch, entryTypehash)
            let size := 0
            let last := 0
            for { let k := 0 } lt(k, count) { k := add(k, 1) } {
                let node := shr(96, calldataload(add(entries, mul(k, ENTRY_BYTES))))
                if iszero(gt(node, last)) {
                    vector := 0
                    break
                }
                last := node
                let p := add(vector, mul(k, 0x60))
                mstore(p, node)
                mstore(add(p, 0x20), shr(128, calldataload(add(add(entries, mul(k, ENTRY_BYTES)), ENTRY_AMOUNT))))
                mstore(add(p, 0x40), 0)
                if paid { mstore(add(p, 0x40), shr(128, calldataload(add(paid, mul(k, PAID_BYTES))))) }
                mstore(add(scratch, 0x20), node)
                mstore(add(scratch, 0x40), mload(add(p, 0x20)))
                mstore(add(add(scratch, 0x60), shl(5, k)), keccak256(scratch, 0x60))
                if mload(add(p, 0x40)) {
                    let out := add(add(add(scratch, 0x60), shl(5, count)), size)
                    mstore(out, shl(96, node))
                    mstore(add(out, ENTRY_AMOUNT), shl(128, mload(add(p, 0x40))))
                    size := add(size, ENTRY_BYTES)
                }
            }
            entriesHash := keccak256(add(scratch, 0x60), shl(5, count))
            if size {
                previousHash := and(keccak256(add(add(scratch, 0x60), shl(5, count)), size), 0xffffffffffffffffffffffffffffffff)
            }
        }
    }

    /// @dev Pays each entry of the scanned `vector` `max(0, amount - paid)` in order while `balance` lasts, raising its
    /// paid word; returns the balance left and the total paid.
    function _pay(uint256 count, uint256 vector, uint256 balance) private returns (uint256 remaining, uint256 total) {
        remaining = balance;
        uint256 earningsSlot;
        assembly ("memory-safe") {
            earningsSlot := _earnings.slot
            for { let k := 0 } and(lt(k, count), gt(remaining, 0)) { k := add(k, 1) } {
                let p := add(vector, mul(k, 0x60))
                let amount := mload(add(p, 0x20))
                let before := mload(add(p, 0x40))
                if gt(amount, before) {
                    let pay := sub(amount, before)
                    if lt(remaining, pay) { pay := remaining }
                    remaining := sub(remaining, pay)
                    total := add(total, pay)
                    mstore(add(p, 0x40), add(before, pay))
                    // _earnings[node] += pay; no overflow: every token credited is one the escrow holds
                    mstore(0x00, mload(p))
                    mstore(0x20, earningsSlot)
                    let slot := keccak256(0x00, 0x40)
                    sstore(slot, add(sload(slot), pay))
                }
            }
        }
    }

    /// @dev The packed paid vector of the scanned `vector`: node then paid amount for every node paid something.
    function _pack(uint256 count, uint256 vector) private pure returns (bytes memory paid) {
        assembly ("memory-safe") {
            paid := mload(0x40)
            let out := add(paid, 0x20)
            for { let k := 0 } lt(k, count) { k := add(k, 1) } {
                let p := add(vector, mul(k, 0x60))
                let amount := mload(add(p, 0x40))
                if amount {
                    mstore(out, shl(96, mload(p)))
                    mstore(add(out, ENTRY_AMOUNT), shl(128, amount))
                    out := add(out, ENTRY_BYTES)
                }
            }
            mstore(out, 0) // clear the 16 bytes the last amount's store wrote past the entry, and the padding word
            mstore(paid, sub(out, add(paid, 0x20)))
            mstore(0x40, and(add(out, 0x3f), not(0x1f)))
        }
    }

    /// @dev Takes what `promised` leaves owed to `node` beyond its entry in `paid` out of `balance` (the caller debits
    /// it) and then out of `client`'s reserve for `node` (debited here); returns both parts and the raised paid vector.
    function _drawOwed(address client, address node, uint256 promised, uint256 balance, bytes calldata paid)
        private
        returns (uint256 fromBalance, uint256 fromReserve, bytes memory vector)
    {
        (uint256 index, bool found, uint256 before) = _findPaid(paid, node);
        Reserve storage reserve = _reserves[client][node];
        uint256 owed = promised > before ? promised - before : 0;
        fromBalance = owed < balance ? owed : balance;
        fromReserve = owed - fromBalance < reserve.amount ? owed - fromBalance : reserve.amount;
        if (fromBalance + fromReserve == 0) revert NothingOwed(node, promised, before, balance + reserve.amount);
        reserve.amount -= uint96(fromReserve);
        uint128 raised = uint128(before + fromBalance + fromReserve);
        vector = found
            ? bytes.concat(paid[:index + ENTRY_AMOUNT], bytes16(raised), paid[index + ENTRY_BYTES:])
            : bytes.concat(paid[:index], bytes20(node), bytes16(raised), paid[index:]);
    }

    /// @dev The byte offset of `node`'s entry in the sorted packed `paid` (or where it would go), whether it is there,
    /// and what it was paid.
    function _findPaid(bytes calldata paid, address node) private pure returns (uint256 index, bool found, uint256 amount) {
        for (; index < paid.length; index += ENTRY_BYTES) {
            address named = address(bytes20(paid[index:index + ENTRY_AMOUNT]));
            if (named == node) {
                return (index, true, uint128(bytes16(paid[index + ENTRY_AMOUNT:index + ENTRY_BYTES])));
            }
            if (uint160(named) > uint160(node)) break;
        }
    }

    /// @dev The paid-vector hash: the low 128 bits of the keccak256 of the packed vector; 0 for the empty vector.
    function _hash(bytes memory vector) private pure returns (uint128) {
        return vector.length == 0 ? 0 : uint128(uint256(keccak256(vector)));
    }
}
