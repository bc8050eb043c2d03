// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {ERC20} from "@openzeppelin/contracts/token/ERC20/ERC20.sol";
import {ERC20Permit} from "@openzeppelin/contracts/token/ERC20/extensions/ERC20Permit.sol";
import {Ownable} from "@openzeppelin/contracts/access/Ownable.sol";

/// @title TestToken
/// @notice ERC-20 used for stake and payment on development chains only; EIP-2612 permits let a holder approve with a
/// signature, so a deposit is one transaction.
contract TestToken is ERC20, ERC20Permit, Ownable {
    constructor(uint256 initialSupply)
        ERC20("shardmarket Test Token", "SMT")
        ERC20Permit("shardmarket Test Token")
        Ownable(msg.sender)
    {
        _mint(msg.sender, initialSupply);
    }

    /// @notice Mint `amount` tokens to `to`; only the deployer can mint.
    /// @param to Receiver of the new tokens.
    /// @param amount Amount in the token's smallest unit.
    function mint(address to, uint256 amount) external onlyOwner {
        _mint(to, amount);
    }
}
