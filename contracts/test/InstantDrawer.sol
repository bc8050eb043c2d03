// SPDX-License-Identifier: Apache-2.0
pragma solidity ^0.8.24;

import {IERC20} from "@openzeppelin/contracts/token/ERC20/IERC20.sol";
import {DisputeManager} from "../DisputeManager.sol";

/// @title InstantDrawer
/// @notice Test-only challenger that tries to learn its panel inside its own transaction, to go through with a
/// challenge only when its sybils sit on the panel: it challenges, then draws at once.
contract InstantDrawer {
    /// @notice Challenge `commitment` (this contract pays the bond) and draw the panel in the same transaction.
    function challengeAndDraw(
        DisputeManager disputes,
        address node,
        DisputeManager.Commitment calldata commitment,
        bytes calldata signature
    ) external returns (bool seated) {
        IERC20 token = disputes.token();
        token.approve(address(disputes), disputes.challengeBond());
        uint256 disputeId = disputes.challenge(node, commitment, signature, "");
        seated = disputes.drawPanel(disputeId);
    }
}
