// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {SafeERC20} from "@openzeppelin/contracts/token/ERC20/utils/SafeERC20.sol";
import {EIP712} from "@openzeppelin/contracts/utils/cryptography/EIP712.sol";
import {ReentrancyGuardTransient} from "@openzeppelin/contracts/utils/ReentrancyGuardTransient.sol";

/// @title PaymentEscrow
/// @notice Clients deposit; anyone settles client-signed EIP-712 tabs
/// `Tab(client, seq, Entry(node, amount)[], usageHash)`. A tab is one cumulative promise per client covering
/// every node it pays (entries sorted by node, amounts cumulative per node, seq one higher per tab). Settling
/// pays each node `amount - alreadyPaid` in entry order, capped by the client's balance (a shortfall stays
/// owed: a later settlement, even of the same tab, pays the rest). The escrow keeps one storage slot per client:
/// balance, the highest seq settled and a hash of the paid vector (what it has paid each node of the client);
/// the settler passes the paid vector in calldata and nodes rebuild it from TabSettled and LoweringClaimed.
/// Payments are credited to nodes inside the escrow and leave it in one transfer (`withdrawEarnings`). A client's
/// withdrawal waits `withdrawalTimelock` after its request, so nodes can settle first.
///
/// A client that signs a newer tab promising a node less than an older tab did has broken its promise:
/// `claimLowered` takes both signed tabs and pays the node what the older one promised (the fraud proof).
///
/// Tabs and paid vectors travel packed (the TAB_* and ENTRY_* constants), not ABI-encoded: ABI words are mostly
/// zero padding, and at ~1,000 gas per paid request the padding, its decoder and a 64-byte event entry were a fifth
/// of a settlement.
contract PaymentEscrow is EIP712, ReentrancyGuardTransient {
    using SafeERC20 for IERC20;

    bytes32 public constant ENTRY_TYPEHASH = keccak256("Entry(address node,uint128 amount)");
    bytes32 public constant TAB_TYPEHASH = keccak256(
        "Tab(address client,uint32 seq,Entry[] entries,bytes32 usageHash)Entry(address node,uint128 amount)"
    );
    /// @notice Most nodes one tab may name (bounds every loop of a settlement).
    uint256 public constant MAX_ENTRIES = 32;

    // A packed tab (what settleTabs and claimLowered read; shardmarket/chain/eip712.py has the same constants):
    //   client (20 bytes) || seq (uint32, 4) || usageHash (32) || r (32) || s (32) || v (1) || n, the entry count (1)
    //   || m, the paid count (1) || n entries || m entries of the client's current paid vector
    // (m is 0 in the form a node stores and claimLowered takes); a packed entry is node (20 bytes) || amount
    // (uint128, 16).
    // Each constant is the byte offset where a field starts (the client's is 0); a field ends where the next one
    // starts. A field narrower than a word is read from the word at its offset with a shift (shr(96, ...) for 20 bytes,
    // shr(224, ...) for 4, shr(128, ...) for 16, byte(0, ...) for 1).
    uint256 private constant TAB_SEQ = 20;
    uint256 private constant TAB_USAGE_HASH = 24;
    uint256 private constant TAB_R = 56;
    uint256 private constant TAB_S = 88;
    uint256 private constant TAB_V = 120;
    uint256 private constant TAB_COUNT = 121;
    uint256 private constant TAB_PAID_COUNT = 122;
    /// @notice Bytes of a packed tab before its entries.
    uint256 public constant TAB_HEADER_BYTES = 123;
    uint256 private constant ENTRY_AMOUNT = 20;
    /// @notice Bytes of one packed entry.
    uint256 public constant ENTRY_BYTES = 36;

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

    /// @dev One packed tab's fields (see `settleTabs`); offsets are calldata offsets.
    struct Item {
        address client;
        uint32 seq;
        uint256 at; // the packed tab's first byte
        uint256 entries; // the first packed entry
        uint256 count;
        uint256 previous; // the first packed entry of the previous paid vector
        uint256 previousCount;
    }

    /// @notice A pending withdrawal request.
    struct Withdrawal {
        uint96 amount;
        uint40 readyAt;
    }

    /// @notice The payment ERC-20.
    IERC20 public immutable token;
    /// @notice Seconds between a withdrawal request and the withdrawal.
    uint256 public immutable withdrawalTimelock;

    // Written through storage pointers; slither 0.11 reports it uninitialized only because it cannot build IR
    // for ReentrancyGuardTransient's tload/tstore (with the storage-slot guard the finding disappears).
    // slither-disable-next-line uninitialized-state
    mapping(address client => ClientAccount) private _accounts;
    mapping(address client => Withdrawal) private _withdrawals;
    mapping(address node => uint256) private _earnings;

    event Deposited(address indexed client, address indexed from, uint256 amount);
    event WithdrawalRequested(address indexed client, uint256 amount, uint256 readyAt);
    event WithdrawalCancelled(address indexed client);
    event Withdrawn(address indexed client, uint256 amount);
    /// @notice A tab was settled; `paid` is the client's new paid vector, packed entries in the tab's order
    /// (what the escrow has paid each node of the client in all, a shortfall included).
    event TabSettled(address indexed client, uint32 seq, bytes paid);
    event TabRejected(address indexed client, uint256 index, Rejection reason);
    event EarningsWithdrawn(address indexed node, address indexed to, uint256 amount);
    /// @notice `client` signed tab `loweredSeq` promising `node` less than its tab `promisedSeq`; the escrow paid
    /// `node` `amount` more. `seq` is the client's settled seq (unchanged) and `paid` its new paid vector, packed
    /// and sorted by node like TabSettled's (nodes rebuild the paid vector from both events, in log order).
    event LoweringClaimed(address indexed client, address indexed node, uint32 seq, uint32 promisedSeq,
        uint32 loweredSeq, uint256 amount, bytes paid);

    error ZeroAmount();
    error ZeroAddress();
    error AmountTooLarge(uint256 amount);
    error InsufficientBalance(uint256 balance, uint256 requested);
    error NoWithdrawalRequested();
    error WithdrawalLocked(uint256 readyAt);
    error NothingToWithdraw();
    error TruncatedTab(uint256 index);
    /// @notice A claim's `tabs` are not two packed signed tabs (each 1..MAX_ENTRIES sorted entries, no previous vector).
    error MalformedClaim();
    error DifferentClients(address promised, address lowered);
    error NotNewer(uint32 promisedSeq, uint32 loweredSeq);
    error NotLowered(address node, uint256 promised, uint256 lowered);
    error BadTabSignature(uint32 seq);
    /// @notice The paid vector passed is not the client's current one (rebuild it from TabSettled and LoweringClaimed).
    error WrongPaidVector();
    error NothingOwed(address node, uint256 promised, uint256 paid, uint256 balance);

    /// @param token_ The payment ERC-20.
    /// @param withdrawalTimelock_ Seconds a client's withdrawal waits after its request.
    constructor(IERC20 token_, uint256 withdrawalTimelock_) EIP712("shardmarket", "1") {
        token = token_;
        withdrawalTimelock = withdrawalTimelock_;
    }

    /// @notice Add `amount` to `client`'s balance, paid by the caller (needs an allowance).
    /// @param client The account whose tabs this balance pays.
    /// @param amount Tokens deposited.
    function deposit(address client, uint256 amount) external nonReentrant {
        if (amount == 0) revert ZeroAmount();
        if (client == address(0)) revert ZeroAddress();
        ClientAccount storage account = _accounts[client];
        uint256 balance = uint256(account.balance) + amount;
        if (balance > type(uint96).max) revert AmountTooLarge(amount);
        account.balance = uint96(balance);
        emit Deposited(client, msg.sender, amount);
        token.safeTransferFrom(msg.sender, address(this), amount);
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

    /// @notice Settle many clients' tabs in one transaction; any caller may (a tab names its payees). A bad item
    /// (bad signature, seq below the settled one, a previous vector that is not the stored one, malformed entries)
    /// is skipped and reported in TabRejected; the rest pay.
    /// @param tabs Packed tabs (see TAB_HEADER_BYTES), one after another, each with the client's current paid
    /// vector (empty at first; rebuilt from its last TabSettled or LoweringClaimed). shardmarket/chain/eip712.py
    /// `pack_tab` writes them. A truncated tab reverts.
    /// @return paid Total tokens credited to nodes.
    function settleTabs(bytes calldata tabs) external returns (uint256 paid) {
        bytes32 domain = _domainSeparatorV4();
        uint256 at;
        uint256 end;
        assembly ("memory-safe") {
            at := tabs.offset
            end := add(tabs.offset, tabs.length)
        }
        for (uint256 i = 0; at < end; ++i) {
            Item memory item = _locate(at);
            at = item.previous + item.previousCount * ENTRY_BYTES;
            if (at > end) revert TruncatedTab(i);
            (Rejection reason, uint256 total) = _settle(item, domain);
            if (reason != Rejection.None) emit TabRejected(item.client, i, reason);
            else paid += total;
        }
    }

    /// @notice The fraud proof against a client that lowered a node's entry: `tabs` holds two tabs the client signed,
    /// an older one promising `node` amount a and a newer one (higher seq, settled or not) promising it less. Pays
    /// `node` min(balance, a - paid) and raises its paid entry, so the client's later tabs must promise it at least
    /// that. Any caller may send it; a second claim of the same pair reverts with NothingOwed.
    /// @param node The node whose entry was lowered (the payee).
    /// @param tabs The older then the newer signed tab, each packed as a settleTabs item with no previous vector
    /// (shardmarket/chain/eip712.py `pack_tab(tab, signature)`, the form a node stores).
    /// @param paid The client's current paid vector, packed (its last TabSettled or LoweringClaimed `paid`).
    /// @return amount Tokens credited to `node`.
    function claimLowered(address node, bytes calldata tabs, bytes calldata paid) external returns (uint256 amount) {
        (address client, uint32 promisedSeq, uint32 loweredSeq, uint256 promised) = _provenLowering(node, tabs);
        ClientAccount memory account = _accounts[client];
        uint256 at;
        assembly ("memory-safe") {
            at := paid.offset
        }
        if (paid.length % ENTRY_BYTES != 0 || _vectorHash(at, paid.length / ENTRY_BYTES) != account.paidHash) {
            revert WrongPaidVector();
        }
        bytes memory vector;
        (amount, vector) = _raisePaid(paid, node, promised, account.balance);
        _accounts[client] = ClientAccount(uint96(account.balance - amount), account.seq, uint128(uint256(keccak256(vector))));
        _earnings[node] += amount;
        emit LoweringClaimed(client, node, account.seq, promisedSeq, loweredSeq, amount, vector);
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

    /// @notice `client`'s balance in the escrow.
    function balanceOf(address client) external view returns (uint256) {
        return _accounts[client].balance;
    }

    /// @notice What a node can still count on from `client`: balance minus a pending withdrawal request.
    function spendableOf(address client) external view returns (uint256) {
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
        uint256 at;
        assembly ("memory-safe") {
            at := paid.offset
        }
        return _vectorHash(at, paid.length / ENTRY_BYTES);
    }

    /// @notice The EIP-712 domain separator of this escrow.
    function domainSeparator() external view returns (bytes32) {
        return _domainSeparatorV4();
    }

    /// @dev The fields of the packed tab at calldata offset `at`.
    function _locate(uint256 at) private pure returns (Item memory item) {
        assembly ("memory-safe") {
            mstore(item, shr(96, calldataload(at)))
            mstore(add(item, 0x20), shr(224, calldataload(add(at, TAB_SEQ))))
            mstore(add(item, 0x40), at)
            let count := byte(0, calldataload(add(at, TAB_COUNT)))
            mstore(add(item, 0x60), add(at, TAB_HEADER_BYTES))
            mstore(add(item, 0x80), count)
            mstore(add(item, 0xa0), add(add(at, TAB_HEADER_BYTES), mul(count, ENTRY_BYTES)))
            mstore(add(item, 0xc0), byte(0, calldataload(add(at, TAB_PAID_COUNT))))
        }
    }

    /// @dev Checks that `tabs` are two tabs of one client, both signed by it, the second newer and promising `node`
    /// less than the first; returns the client, both seqs and the first tab's amount for `node`.
    function _provenLowering(address node, bytes calldata tabs)
        private
        view
        returns (address client, uint32 promisedSeq, uint32 loweredSeq, uint256 promised)
    {
        (Item memory first, Item memory second) = _locatePair(tabs);
        if (first.client != second.client) revert DifferentClients(first.client, second.client);
        if (second.seq <= first.seq) revert NotNewer(first.seq, second.seq);
        promised = _checkedAmount(first, node);
        uint256 lowered = _checkedAmount(second, node);
        if (lowered >= promised) revert NotLowered(node, promised, lowered);
        return (first.client, first.seq, second.seq, promised);
    }

    /// @dev Pays `node` up to `promised` out of `balance`: the amount and the new packed paid vector (`node`'s entry
    /// raised, or inserted in node order).
    function _raisePaid(bytes calldata paid, address node, uint256 promised, uint256 balance)
        private
        pure
        returns (uint256 amount, bytes memory vector)
    {
        (uint256 index, bool found, uint256 before) = _findPaid(paid, node);
        amount = promised > before ? promised - before : 0;
        if (amount > balance) amount = balance;
        if (amount == 0) revert NothingOwed(node, promised, before, balance);
        vector = found
            ? abi.encodePacked(paid[:index + ENTRY_AMOUNT], bytes16(uint128(before + amount)), paid[index + ENTRY_BYTES:])
            : abi.encodePacked(paid[:index], bytes20(node), bytes16(uint128(amount)), paid[index:]);
    }

    /// @dev The two packed tabs of a claim, each with no previous vector, filling `tabs` exactly.
    function _locatePair(bytes calldata tabs) private pure returns (Item memory first, Item memory second) {
        uint256 at;
        uint256 end;
        assembly ("memory-safe") {
            at := tabs.offset
            end := add(tabs.offset, tabs.length)
        }
        if (tabs.length < 2 * TAB_HEADER_BYTES) revert MalformedClaim();
        first = _locate(at);
        at = first.previous;
        if (first.previousCount != 0 || at + TAB_HEADER_BYTES > end) revert MalformedClaim();
        second = _locate(at);
        if (second.previousCount != 0 || second.previous != end) revert MalformedClaim();
    }

    /// @dev What `item`'s tab promises `node` (0 if it names no such node), after checking its entries and that its
    /// client signed it.
    function _checkedAmount(Item memory item, address node) private view returns (uint256 amount) {
        if (item.client == address(0) || item.count == 0 || item.count > MAX_ENTRIES) revert MalformedClaim();
        (Rejection reason, bytes32 entriesHash, uint256 vector) = _scan(item);
        if (reason != Rejection.None) revert MalformedClaim();
        if (_signer(item, _domainSeparatorV4(), entriesHash) != item.client) revert BadTabSignature(item.seq);
        assembly ("memory-safe") {
            for { let k := 0 } lt(k, mload(add(item, 0x80))) { k := add(k, 1) } {
                let p := add(vector, mul(k, 0x60))
                if eq(mload(p), node) {
                    amount := mload(add(p, 0x20))
                    break
                }
            }
        }
    }

    /// @dev The byte offset of `node`'s entry in the sorted packed `paid` (or where it would go), whether it is
    /// there, and what it was paid.
    function _findPaid(bytes calldata paid, address node) private pure returns (uint256 index, bool found, uint256 amount) {
        for (; index < paid.length; index += ENTRY_BYTES) {
            address named = address(bytes20(paid[index:index + ENTRY_AMOUNT]));
            if (named == node) return (index, true, uint128(bytes16(paid[index + ENTRY_AMOUNT:index + ENTRY_BYTES])));
            if (uint160(named) > uint160(node)) break;
        }
    }

    /// @dev Checks one item (cheap checks first, the signature last; a rejected item changes nothing), then pays
    /// its tab in entry order up to the client's balance, stores the new paid vector's hash and logs TabSettled.
    function _settle(Item memory item, bytes32 domain) private returns (Rejection reason, uint256 total) {
        if (item.client == address(0) || item.count == 0 || item.count > MAX_ENTRIES) return (Rejection.Malformed, 0);
        if (item.previousCount > item.count) return (Rejection.WrongPrevious, 0);
        ClientAccount memory account = _accounts[item.client];
        if (item.seq < account.seq) return (Rejection.StaleSeq, 0);
        if (_vectorHash(item.previous, item.previousCount) != account.paidHash) return (Rejection.WrongPrevious, 0);
        bytes32 entriesHash;
        uint256 vector;
        (reason, entriesHash, vector) = _scan(item);
        if (reason != Rejection.None) return (reason, 0);
        if (_signer(item, domain, entriesHash) != item.client) return (Rejection.BadSignature, 0);
        uint256 remaining;
        (remaining, total) = _pay(item.count, vector, account.balance);
        _record(item.client, item.seq, vector, item.count, remaining);
    }

    /// @dev The address that signed the item's tab (EIP-712 under `domain`), or 0 for a bad or high-s signature.
    function _signer(Item memory item, bytes32 domain, bytes32 entriesHash) private view returns (address signer) {
        bytes32 typehash = TAB_TYPEHASH;
        assembly ("memory-safe") {
            let at := mload(add(item, 0x40))
            let s := calldataload(add(at, TAB_S))
            // a high s is the malleated twin of a valid signature (what OpenZeppelin's ECDSA refuses too)
            if iszero(gt(s, 0x7FFFFFFFFFFFFFFFFFFFFFFFFFFFFFFF5D576E7357A4501DDFE92F46681B20A0)) {
                let m := mload(0x40) // scratch past the free pointer
                mstore(m, typehash)
                mstore(add(m, 0x20), mload(item)) // client
                mstore(add(m, 0x40), mload(add(item, 0x20))) // seq
                mstore(add(m, 0x60), entriesHash)
                mstore(add(m, 0x80), calldataload(add(at, TAB_USAGE_HASH)))
                let structHash := keccak256(m, 0xa0)
                mstore(m, 0x1901)
                mstore(add(m, 0x20), domain)
                mstore(add(m, 0x40), structHash)
                mstore(m, keccak256(add(m, 0x1e), 0x42))
                mstore(add(m, 0x20), byte(0, calldataload(add(at, TAB_V))))
                mstore(add(m, 0x40), calldataload(add(at, TAB_R)))
                mstore(add(m, 0x60), s)
                mstore(0x00, 0)
                if staticcall(gas(), 0x01, m, 0x80, 0x00, 0x20) { signer := mload(0x00) }
            }
        }
    }

    /// @dev Pays each entry `amount - paid before` in order while `balance` lasts. `vector` holds, per entry, the
    /// node, its tab amount and what it was paid before (3 words, from _scan); the last becomes what it was paid after.
    function _pay(uint256 count, uint256 vector, uint256 balance) private returns (uint256 remaining, uint256 total) {
        remaining = balance;
        uint256 earningsSlot;
        assembly ("memory-safe") {
            earningsSlot := _earnings.slot
        }
        assembly ("memory-safe") {
            for { let k := 0 } lt(k, count) { k := add(k, 1) } {
                let at := add(vector, mul(k, 0x60))
                let before := mload(add(at, 0x40))
                let due := sub(mload(add(at, 0x20)), before)
                let pay := due
                if lt(remaining, due) { pay := remaining }
                if pay {
                    remaining := sub(remaining, pay)
                    total := add(total, pay)
                    mstore(add(at, 0x40), add(before, pay))
                    // _earnings[node] += pay (a slot written again in this transaction costs 100 gas)
                    mstore(0x00, mload(at))
                    mstore(0x20, earningsSlot)
                    let slot := keccak256(0x00, 0x40)
                    sstore(slot, add(sload(slot), pay))
                }
            }
        }
    }

    /// @dev Stores the client's new balance, seq and paid-vector hash, and logs TabSettled with the packed vector.
    function _record(address client, uint32 seq, uint256 vector, uint256 count, uint256 remaining) private {
        bytes32 topic = TabSettled.selector;
        uint128 paidHash;
        assembly ("memory-safe") {
            // event data: seq, offset of paid (0x40), length, packed entries zero-padded to whole words
            let data := mload(0x40) // scratch past the free pointer
            let size := mul(count, ENTRY_BYTES)
            mstore(data, seq)
            mstore(add(data, 0x20), 0x40)
            mstore(add(data, 0x40), size)
            let packed := add(data, 0x60)
            mstore(add(packed, and(add(size, 31), not(31))), 0) // the padding word
            for { let k := 0 } lt(k, count) { k := add(k, 1) } {
                let at := add(vector, mul(k, 0x60))
                let out := add(packed, mul(k, ENTRY_BYTES))
                mstore(out, shl(96, mload(at)))
                mstore(add(out, ENTRY_AMOUNT), shl(128, mload(add(at, 0x40))))
            }
            mstore(add(packed, add(size, 16)), 0) // clear past the last amount (it wrote 16 zero bytes too)
            paidHash := and(keccak256(packed, size), 0xffffffffffffffffffffffffffffffff)
            log2(data, add(0x60, and(add(size, 31), not(31))), topic, client)
        }
        _accounts[client] = ClientAccount(uint96(remaining), seq, paidHash);
    }

    /// @dev One pass over a tab's packed entries: sorted by node (no duplicates, no zero address) and covering the
    /// previous vector (every node it paid still named, with at least that amount). Returns the EIP-712 hash of the
    /// entries and a memory vector of (node, amount, paid before) per entry.
    function _scan(Item memory item) private pure returns (Rejection reason, bytes32 entriesHash, uint256 vector) {
        bytes32 entryTypehash = ENTRY_TYPEHASH;
        assembly ("memory-safe") {
            let count := mload(add(item, 0x80))
            vector := mload(0x40)
            mstore(0x40, add(vector, mul(count, 0x60))) // allocate the vector
            let scratch := mload(0x40) // past the free pointer: one entry to hash (3 words), then the entry hashes
            mstore(scratch, entryTypehash)
            let last := 0
            let j := 0
            for { let k := 0 } lt(k, count) { k := add(k, 1) } {
                let node := shr(96, calldataload(add(mload(add(item, 0x60)), mul(k, ENTRY_BYTES))))
                let amount := shr(128, calldataload(add(add(mload(add(item, 0x60)), mul(k, ENTRY_BYTES)), ENTRY_AMOUNT)))
                if iszero(gt(node, last)) {
                    reason := 4 // Rejection.Malformed: unsorted, duplicate or zero node
                    break
                }
                last := node
                let before := 0
                let p := add(mload(add(item, 0xa0)), mul(j, ENTRY_BYTES))
                if and(lt(j, mload(add(item, 0xc0))), eq(shr(96, calldataload(p)), node)) {
                    before := shr(128, calldataload(add(p, ENTRY_AMOUNT)))
                    if gt(before, amount) {
                        reason := 3 // Rejection.WrongPrevious: the tab lowers a node below what it was paid
                        break
                    }
                    j := add(j, 1)
                }
                mstore(add(scratch, 0x20), node)
                mstore(add(scratch, 0x40), amount)
                mstore(add(scratch, add(0x60, shl(5, k))), keccak256(scratch, 0x60))
                p := add(vector, mul(k, 0x60))
                mstore(p, node)
                mstore(add(p, 0x20), amount)
                mstore(add(p, 0x40), before)
            }
            if and(iszero(reason), iszero(eq(j, mload(add(item, 0xc0))))) { reason := 3 } // a paid node is missing
            entriesHash := keccak256(add(scratch, 0x60), shl(5, count))
        }
    }

    /// @dev The paid-vector hash of `count` packed entries at calldata `at`: the low 128 bits of their keccak256;
    /// 0 for the empty vector.
    function _vectorHash(uint256 at, uint256 count) private pure returns (uint128 hash) {
        if (count == 0) return 0;
        assembly ("memory-safe") {
            let buffer := mload(0x40) // scratch past the free pointer
            calldatacopy(buffer, at, mul(count, ENTRY_BYTES))
            hash := and(keccak256(buffer, mul(count, ENTRY_BYTES)), 0xffffffffffffffffffffffffffffffff)
        }
    }
}
