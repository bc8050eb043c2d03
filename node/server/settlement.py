"""Redemption: the node turns its newest receipts into escrow payments in one batched transaction, when
enough value has piled up and at once when a client asks to withdraw (it watches WithdrawalRequested)."""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

import requests
from eth_utils import to_checksum_address

from node.chain.contracts import ChainError, Market
from node.chain.eip712 import split_signature
from node.server.payments import PaymentGate, PaymentRefused
from node.server.receipts import ReceiptStore

log = logging.getLogger("shardmarket.settle")
BATCH = 50  # receipts per redeemBatch transaction


@dataclass(frozen=True)
class Redemption:
    """One redeemBatch: its transaction, the receipts sent, the gas used and the tokens credited."""

    tx: str
    receipts: int
    gas: int
    paid: int


def redeem_pending(market: Market, store: ReceiptStore, gate: PaymentGate | None = None) -> list[Redemption]:
    """Redeem every stored receipt not yet fully paid, in batches; records what each channel has been paid."""
    node = market.address
    pending = [s for s in store.all() if s.unredeemed > 0]
    done = []
    for first in range(0, len(pending), BATCH):
        chunk = pending[first : first + BATCH]
        items = [(s.receipt.client, s.receipt.cumulative_amount, s.receipt.usage_hash, s.receipt.nonce, *split_signature(s.signature))
                 for s in chunk]
        before = market.read(market.escrow.functions.earningsOf(node))
        tx = market.transact(market.escrow.functions.redeemBatch(node, items), f"redeeming {len(items)} receipt(s)")
        paid = market.read(market.escrow.functions.earningsOf(node)) - before
        for stored in chunk:
            channel_paid, _ = market.read(market.escrow.functions.channelOf(stored.receipt.client, node))
            store.mark_redeemed(stored.receipt.client, channel_paid)
            if gate is not None:
                gate.redeemed(stored.receipt.client, channel_paid)
        done.append(Redemption(tx["transactionHash"].hex(), len(items), tx["gasUsed"], paid))
        log.info("redeemed %d receipt(s) for %d token units in tx %s (%d gas)", len(items), paid, done[-1].tx, tx["gasUsed"])
    return done


class Settler:
    """The node daemon's settlement loop; chain errors are logged and retried, never fatal."""

    def __init__(self, market: Market, store: ReceiptStore, gate: PaymentGate, *, interval_s: float, min_value: int,
                 tick_s: float = 1.0) -> None:
        self.market, self.store, self.gate = market, store, gate
        self.interval_s, self.min_value, self.tick_s = interval_s, min_value, tick_s
        self.redemptions: list[Redemption] = []
        self._from_block: int | None = None

    async def spendable(self, client: str) -> int:
        """The client's spendable escrow balance (for the payment gate)."""
        try:
            return await asyncio.to_thread(self.market.read, self.market.escrow.functions.spendableOf(client), "reading a balance")
        except ChainError as exc:
            raise PaymentRefused("chain_unreachable", f"cannot check the client's escrow balance: {exc}") from None

    def _withdrawing_clients(self) -> set[str]:
        latest = self.market.w3.eth.block_number
        start = latest if self._from_block is None else self._from_block
        if start > latest:
            return set()
        event = self.market.escrow.events.WithdrawalRequested
        logs = event.get_logs(from_block=start, to_block=latest)
        self._from_block = latest + 1
        return {entry["args"]["client"].lower() for entry in logs}

    def _refresh_balances(self) -> None:
        for client in list(self.gate.balances):
            self.gate.balances[client] = self.market.read(self.market.escrow.functions.spendableOf(to_checksum_address(client)))

    def _unredeemed(self, clients: set[str] | None = None) -> int:
        return sum(s.unredeemed for s in self.store.all() if clients is None or s.receipt.client.lower() in clients)

    def settle_once(self, periodic: bool) -> None:
        """Redeem now if a client with unredeemed receipts asked to withdraw, or (periodic) if enough value is due."""
        withdrawing = self._withdrawing_clients()
        urgent = bool(withdrawing) and self._unredeemed(withdrawing) > 0
        if urgent:
            log.info("client(s) %s asked to withdraw; redeeming their receipts before the timelock ends", ", ".join(sorted(withdrawing)))
        due = self._unredeemed()
        if urgent or (periodic and due > 0 and due >= self.min_value):
            self.redemptions += redeem_pending(self.market, self.store, self.gate)
        if periodic or withdrawing:
            self._refresh_balances()

    async def run(self) -> None:
        elapsed = 0.0
        while True:
            await asyncio.sleep(self.tick_s)
            elapsed += self.tick_s
            periodic = elapsed >= self.interval_s
            if periodic:
                elapsed = 0.0
            try:
                await asyncio.to_thread(self.settle_once, periodic)
            except (ChainError, requests.RequestException) as exc:
                log.warning("settlement postponed: %s", exc)
            except Exception:
                log.exception("settlement failed; retrying at the next interval")
