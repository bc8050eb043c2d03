// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";

/// @notice Receiver side of HookToken's transfer hook (like ERC-777's tokensReceived).
interface ITokenReceiver {
    function onTokenReceived(address from, uint256 amount) external;
}

/// @title HookToken
/// @notice Test-only ERC-20 that calls a receiver that asked for it after every transfer to it (like
/// ERC-777's tokensReceived), so tests can try reentrancy through a token with hooks.
contract HookToken is ERC20 {
    mapping(address => bool) public wantsHook;

    constructor(uint256 initialSupply) ERC20("Hook Token", "HOOK") {
        _mint(msg.sender, initialSupply);
    }

    /// @notice Ask for `onTokenReceived` calls on every incoming transfer.
    function registerHook() external {
        wantsHook[msg.sender] = true;
    }

    function _update(address from, address to, uint256 value) internal override {
        super._update(from, to, value);
        if (wantsHook[to]) ITokenReceiver(to).onTokenReceived(from, value);
    }
}
