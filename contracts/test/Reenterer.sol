// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ITokenReceiver} from "./HookToken.sol";

/// @title Reenterer
/// @notice Test-only attacker: forwards any call to a target and, when it receives HookToken, calls the
/// target again with a prepared payload, recording whether the reentrant call succeeded.
contract Reenterer is ITokenReceiver {
    address public target;
    bytes public attack;
    bool public attempted;
    bool public reentered;
    bytes public reentryError;

    /// @notice Arrange the reentrant call made on the next token receipt.
    function arm(address target_, bytes calldata attack_) external {
        target = target_;
        attack = attack_;
        attempted = false;
    }

    /// @notice Call `to` with `data` as this contract (approve, deposit, stake, withdraw...).
    function execute(address to, bytes calldata data) external returns (bytes memory) {
        (bool ok, bytes memory result) = to.call(data);
        if (!ok) {
            assembly {
                revert(add(result, 32), mload(result))
            }
        }
        return result;
    }

    function onTokenReceived(address, uint256) external {
        if (attempted || attack.length == 0) return;
        attempted = true;
        (bool ok, bytes memory result) = target.call(attack);
        reentered = ok;
        reentryError = result;
    }
}
