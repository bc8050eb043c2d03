"""Dispute transactions shared by challengers (the client's auditor) and verifiers (the node's duty)."""

from __future__ import annotations

import logging

from shardmarket.chain.contracts import ChainError, DisputeStatus, Market

log = logging.getLogger("shardmarket.disputes")
# drawPanel's gas limit: up to MAX_DRAWS (64) registry reads and MAX_VERIFIERS (7) seats, with a margin. The call is sent
# without an estimate: an estimate runs on the newest block, which is the challenge's own block right after it, where
# the draw must fail (its randomness is that block's hash); the transaction itself lands in a later block.
DRAW_GAS = 2_000_000


def draw_panel(market: Market, dispute_id: int) -> DisputeStatus:
    """Send drawPanel for `dispute_id` (in a block after its challenge's) and return where the dispute stands then: OPEN
    once a panel sits, VOID when too few verifiers were eligible, DRAWING when the draw moved to a later block.
    Another sender may have drawn it first: then this transaction fails and the status says what happened."""
    functions = market.disputes.functions
    try:
        market.transact(functions.drawPanel(dispute_id), f"drawing the panel of dispute {dispute_id}", gas=DRAW_GAS)
    except ChainError as exc:
        log.info("dispute %d: this node's draw failed (%s)", dispute_id, exc)
    dispute = market.read(functions.getDispute(dispute_id))
    status = DisputeStatus(dispute.status)
    if status == DisputeStatus.OPEN:
        log.info("dispute %d: panel drawn: %s", dispute_id, ", ".join(dispute.verifiers[: dispute.verifierCount]))
    elif status == DisputeStatus.DRAWING:
        log.warning("dispute %d: its draw block's hash had expired; the draw moved to block %d", dispute_id, dispute.drawBlock)
    elif status == DisputeStatus.VOID and dispute.verifierCount == 0:
        log.warning("dispute %d: too few eligible verifiers for a full panel: void, the bond is credited back", dispute_id)
    return status
