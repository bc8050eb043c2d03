// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

// The byte layout of a packed tab: how a client's signed tab travels with every step, how a node stores it
// and what PaymentEscrow reads (settleTabs, claim). shardmarket/chain/eip712.py has the same constants (a test
// compares them). ABI encoding would spend a 32-byte word on every field, mostly zero padding: at about 1,000 gas
// per paid request, the padding, its decoder and longer events were a fifth of a settlement.
//
// Layout (offsets in bytes from the tab's first byte; a field ends where the next one starts):
//
// | offset          | bytes  | field                                                               |
// |-----------------|--------|---------------------------------------------------------------------|
// | 0               | 20     | client                                                              |
// | TAB_SEQ         | 4      | seq (uint32)                                                        |
// | TAB_USAGE_HASH  | 32     | usageHash                                                           |
// | TAB_R           | 32     | r of the client's signature                                         |
// | TAB_S           | 32     | s                                                                   |
// | TAB_V           | 1      | v (27 or 28)                                                        |
// | TAB_COUNT       | 1      | n, the entry count                                                  |
// | TAB_PAID_COUNT  | 1      | m, the paid count: 0, or n when the paid amounts follow the entries  |
// | TAB_HEADER_BYTES| 36 n   | n entries: node (20 bytes) then its cumulative amount (uint128, 16) |
// | then            | 16 m   | what the escrow has paid each entry's node so far (uint128 each)    |
//
// A tab travels, and a node stores it, with m = 0; settleTabs takes it with the client's paid amounts appended
// (m = n), aligned with the entries so that the node addresses are not sent twice. A paid vector (the escrow's
// record of what a client's tabs have paid each node, in events and in `claim`) packs entries the same way as a tab,
// node then amount, sorted by node, with only the nodes paid something.
//
// The offsets and sizes are file-level constants, so that assembly can name them too.
uint256 constant TAB_SEQ = 20;
uint256 constant TAB_USAGE_HASH = 24;
uint256 constant TAB_R = 56;
uint256 constant TAB_S = 88;
uint256 constant TAB_V = 120;
uint256 constant TAB_COUNT = 121;
uint256 constant TAB_PAID_COUNT = 122;
// Bytes of a packed tab before its entries.
uint256 constant TAB_HEADER_BYTES = 123;
// Where the amount starts in a packed entry (after the node's 20 bytes).
uint256 constant ENTRY_AMOUNT = 20;
// Bytes of one packed entry.
uint256 constant ENTRY_BYTES = 36;
// Bytes of one paid amount appended to a tab for settleTabs.
uint256 constant PAID_BYTES = 16;
// Most nodes one tab may name (bounds every loop over a tab's entries).
uint256 constant MAX_ENTRIES = 32;

/// @title PackedTab
/// @notice Reads the fields of packed tabs in calldata (see the layout above).
library PackedTab {
    /// @notice Where one packed tab's parts lie in calldata (absolute offsets), its size, and its client and seq.
    struct Location {
        address client;
        uint32 seq;
        uint256 start;
        uint256 entries;
        uint256 count;
        uint256 paid;
        uint256 paidCount;
        uint256 size;
        bool fits;
    }

    /// @notice The packed tab starting `at` bytes into `data`. `fits` is false when `data` ends before the tab does
    /// (nothing past the header is read then); read its entries and paid amounts only when it is true.
    function locate(bytes calldata data, uint256 at) internal pure returns (Location memory location) {
        uint256 start;
        assembly ("memory-safe") {
            start := add(data.offset, at)
        }
        // no overflow below: `at` is below data.length, a calldata size, and the counts are single bytes
        unchecked {
            location.start = start;
            location.entries = start + TAB_HEADER_BYTES;
            if (at + TAB_HEADER_BYTES > data.length) return location;
            (address client, uint32 seq, uint256 count, uint256 paidCount) = header(start);
            (location.client, location.seq, location.count, location.paidCount) = (client, seq, count, paidCount);
            location.paid = location.entries + count * ENTRY_BYTES;
            location.size = TAB_HEADER_BYTES + count * ENTRY_BYTES + paidCount * PAID_BYTES;
            location.fits = at + location.size <= data.length;
        }
    }

    // The readers below load calldata words at the layout's offsets and shift the field into place (shr(96) for 20
    // bytes, shr(224) for 4, shr(128) for 16, byte(0) for 1), once `locate` has checked that the whole tab lies inside
    // its calldata. Solidity's calldata slices check bounds on every field: read that way, the header and signature
    // alone cost 2,250 gas more per tab (bench/gas.py: a warm one-client settlement 61,300 gas, 100 clients 25,391 each).

    /// @notice Client, seq, entry count and paid count of the tab starting at calldata offset `start`.
    function header(uint256 start) internal pure returns (address client, uint32 seq, uint256 count, uint256 paidCount) {
        assembly ("memory-safe") {
            client := shr(96, calldataload(start))
            seq := shr(224, calldataload(add(start, TAB_SEQ)))
            count := byte(0, calldataload(add(start, TAB_COUNT)))
            paidCount := byte(0, calldataload(add(start, TAB_PAID_COUNT)))
        }
    }

    /// @notice Node and amount of entry `k` of the tab at `location`.
    function entry(Location memory location, uint256 k) internal pure returns (address node, uint256 amount) {
        uint256 at = location.entries + k * ENTRY_BYTES;
        assembly ("memory-safe") {
            node := shr(96, calldataload(at))
            amount := shr(128, calldataload(add(at, ENTRY_AMOUNT)))
        }
    }

    /// @notice The tab's usage hash and its client's signature over it: v, r, s.
    function signature(Location memory location)
        internal
        pure
        returns (bytes32 usageHash, uint8 v, bytes32 r, bytes32 s)
    {
        uint256 start = location.start;
        assembly ("memory-safe") {
            usageHash := calldataload(add(start, TAB_USAGE_HASH))
            v := byte(0, calldataload(add(start, TAB_V)))
            r := calldataload(add(start, TAB_R))
            s := calldataload(add(start, TAB_S))
        }
    }
}
