// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";

/// @title BlacklistToken
/// @notice Test-only ERC-20 whose owner can block an account, like a stablecoin's blacklist: any transfer to or
/// from a blocked account reverts. Tests use it to show that a payout to a blocked party blocks nothing else.
contract BlacklistToken is ERC20 {
    address public immutable owner;
    mapping(address account => bool) public blocked;

    error Blocked(address account);
    error NotOwner(address caller);

    event BlockedSet(address indexed account, bool blocked);

    constructor(uint256 initialSupply) ERC20("Blacklist Token", "BLK") {
        owner = msg.sender;
        _mint(msg.sender, initialSupply);
    }

    /// @notice Block or unblock `account` (owner only).
    function setBlocked(address account, bool value) external {
        if (msg.sender != owner) revert NotOwner(msg.sender);
        blocked[account] = value;
        emit BlockedSet(account, value);
    }

    function _update(address from, address to, uint256 value) internal override {
        if (blocked[from]) revert Blocked(from);
        if (blocked[to]) revert Blocked(to);
        super._update(from, to, value);
    }
}
