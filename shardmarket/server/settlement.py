"""Settlement: the node turns its clients' newest tabs into escrow payments in one settleTabs transaction, when
enough value is owed and at once when a client asks to withdraw (it watches WithdrawalRequested). A tab pays
every node it names, so the node first reads each client's paid vector from the chain's TabSettled events and
skips clients another node has already settled. A client that signed a newer tab promising this node less than the
tab held here is made to pay the older promise (PaymentEscrow.claimLowered, once per pair of tabs)."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import requests
from eth_utils import to_checksum_address
from web3.logs import DISCARD

from shardmarket.chain.contracts import ChainError, Market, Rejection
from shardmarket.chain.eip712 import (
    Entry,
    Tab,
    pack_entries,
    pack_tab,
    paid_vector_hash,
    split_packed_tabs,
    unpack_entries,
    unpack_tab,
)
from shardmarket.chain.watch import BlockWatch
from shardmarket.server.payments import PaymentGate, PaymentRefused
from shardmarket.server.tabs import LoweringClaim, StoredTab, TabStore

log = logging.getLogger("shardmarket.settle")
BATCH = 50  # clients per settleTabs transaction
REJECTIONS = {
    Rejection.BAD_SIGNATURE: "bad signature",
    Rejection.STALE_SEQ: "stale seq",
    Rejection.WRONG_PREVIOUS: "wrong previous vector",
    Rejection.MALFORMED: "malformed",
}


@dataclass(frozen=True)
class Settlement:
    """One settleTabs: its transaction, the clients' tabs sent, the gas used and the tokens credited to this node."""

    tx: str
    tabs: int
    gas: int
    paid: int


def paid_vector_events(market: Market, from_block: int, to_block: int | str = "latest", client: str | None = None) -> list:
    """The TabSettled and LoweringClaimed events (both carry a client's new paid vector and settled seq) in log order."""
    filters = {"client": to_checksum_address(client)} if client else None
    logs = [
        entry
        for event in (market.escrow.events.TabSettled, market.escrow.events.LoweringClaimed)
        for entry in event.get_logs(from_block=from_block, to_block=to_block, argument_filters=filters)
    ]
    return sorted(logs, key=lambda entry: (entry["blockNumber"], entry["logIndex"]))


def paid_vector_on_chain(market: Market, client: str, from_block: int = 0) -> tuple[tuple[Entry, ...], int]:
    """`client`'s paid vector and settled seq from its last TabSettled or LoweringClaimed event ((), -1 if none)."""
    logs = paid_vector_events(market, from_block, client=client)
    if not logs:
        return (), -1
    last = logs[-1]["args"]
    return unpack_entries(bytes(last["paid"])), last["seq"]


def sync_paid_vectors(market: Market, store: TabStore, gate: PaymentGate | None = None) -> None:
    """Read the paid-vector events since the last sync into the store (and the gate)."""
    latest = market.w3.eth.block_number
    start = store.scanned_block() + 1
    if start <= latest:
        for entry in paid_vector_events(market, start, latest):
            _mark(store, gate, entry["args"]["client"], unpack_entries(bytes(entry["args"]["paid"])), entry["args"]["seq"])
        store.set_scanned_block(latest)


def _mark(store: TabStore, gate: PaymentGate | None, client: str, paid: tuple[Entry, ...], seq: int) -> None:
    store.mark_paid(client, paid, seq)
    if gate is not None:
        gate.settled(client, paid, seq)


def _reconcile(market: Market, stored: StoredTab, store: TabStore, gate: PaymentGate | None) -> StoredTab | None:
    """Bring `stored` up to date with the escrow (its paid vector; the client's own newer tab; a claim, sent now, against
    a client that lowered this node's entry); returns the tab to settle if settling it pays this node something."""
    settled = market.read(market.escrow.functions.tabOf(stored.client), "reading a client's tab state")
    if settled.paidHash != paid_vector_hash(stored.paid):  # a settlement the event sync has not seen (or a client new to us)
        paid, paid_seq = paid_vector_on_chain(market, stored.client)
        _mark(store, gate, stored.client, paid, paid_seq)
        stored = store.get(stored.client) or stored  # the store never drops a tab: this is the refreshed row
    if stored.owed == 0:
        return None  # another node settled this client's tab
    if stored.tab.seq < settled.seq:  # another node settled a newer tab short (or the client lowered this node's entry)
        newer = _settled_tab(market, stored.client, settled.seq)
        if newer is None:
            log.error(
                "client %s owes this node %d but the escrow settled its tab %d, whose signed form this node cannot "
                "read back (sent through another contract); this node no longer serves it",
                stored.client,
                stored.owed,
                settled.seq,
            )
            if gate is not None:
                gate.refuse(stored.client)
            return None
        if newer[0].amount_for(stored.node) < stored.entry:
            _claim_lowered(market, store, gate, stored, *newer)
            return None
        stored = store.record(*newer, 0)  # the client's own signed newer tab: settling it again collects the rest
    return stored


def _claim_lowered(
    market: Market, store: TabStore, gate: PaymentGate | None, stored: StoredTab, lowered: Tab, signature: bytes
) -> None:
    """Make the client pay the held tab's promise with the fraud proof (the held tab and the lowering one): once, and
    again only for what an empty balance left unpaid, after the client deposits."""
    if gate is not None:
        gate.refuse(stored.client)
    balance = market.read(market.escrow.functions.balanceOf(to_checksum_address(stored.client)), "reading a balance")
    if balance == 0:
        if not store.claimed(stored.client, stored.tab.seq, lowered.seq):
            log.error(
                "client %s lowered this node's entry from %d (tab %d) to %d (tab %d) but its escrow balance is empty; "
                "the claim is sent once it deposits; this node no longer serves it",
                stored.client,
                stored.entry,
                stored.tab.seq,
                lowered.amount_for(stored.node),
                lowered.seq,
            )
        return
    owed = stored.owed
    call = market.escrow.functions.claimLowered(
        to_checksum_address(stored.node), stored.signed() + pack_tab(lowered, signature), pack_entries(stored.paid)
    )
    try:
        receipt = market.transact(call, f"claiming what client {stored.client} promised in tab {stored.tab.seq}")
    except ChainError as exc:
        log.error(
            "client %s lowered this node's entry from %d (tab %d) to %d (tab %d) and the claim failed: %s; it is "
            "tried again next round; this node no longer serves it",
            stored.client,
            stored.entry,
            stored.tab.seq,
            lowered.amount_for(stored.node),
            lowered.seq,
            exc,
        )
        return
    paid = 0
    for event in market.escrow.events.LoweringClaimed().process_receipt(receipt, errors=DISCARD):
        _mark(store, gate, event["args"]["client"], unpack_entries(bytes(event["args"]["paid"])), event["args"]["seq"])
        paid += event["args"]["amount"]
    claim = LoweringClaim(stored.client, stored.tab.seq, lowered.seq, paid, receipt["transactionHash"].to_0x_hex())
    store.record_claim(claim)
    log.error(
        "client %s lowered this node's entry from %d (tab %d) to %d (tab %d); the fraud proof collected %d of the %d "
        "it owed, in tx %s (%d gas); this node no longer serves it",
        stored.client,
        stored.entry,
        stored.tab.seq,
        lowered.amount_for(stored.node),
        lowered.seq,
        paid,
        owed,
        claim.tx,
        receipt["gasUsed"],
    )


def _settled_tab(market: Market, client: str, seq: int) -> tuple[Tab, bytes] | None:
    """The signed tab `seq` of `client`, read back from the calldata of the settleTabs that settled it."""
    for entry in reversed(
        market.escrow.events.TabSettled.get_logs(from_block=0, argument_filters={"client": to_checksum_address(client)})
    ):
        if entry["args"]["seq"] != seq:
            continue
        tx = market.w3.eth.get_transaction(entry["transactionHash"])
        try:
            _, args = market.escrow.decode_function_input(tx["input"])
            for item in split_packed_tabs(args["tabs"]):
                tab, signature, _ = unpack_tab(item)
                if tab.client.lower() == client.lower() and tab.seq == seq:
                    return tab, signature
        except ValueError:
            continue  # sent through another contract: its calldata is not a settleTabs call
    return None


def settle_pending(
    market: Market, store: TabStore, gate: PaymentGate | None = None, clients: set[str] | None = None
) -> list[Settlement]:
    """Settle the newest tab of every client (of `clients`, if given) that still owes this node, BATCH per transaction."""
    sync_paid_vectors(market, store, gate)
    pending = [s for s in store.all() if s.owed > 0 and (clients is None or s.client.lower() in clients)]
    ready = [r for r in (_reconcile(market, s, store, gate) for s in pending) if r is not None]
    done = []
    for first in range(0, len(ready), BATCH):
        chunk = ready[first : first + BATCH]
        owed = sum(s.owed for s in chunk)
        tx = market.transact(
            market.escrow.functions.settleTabs(b"".join(s.packed_with_paid() for s in chunk)),
            f"settling {len(chunk)} client tab(s)",
        )
        for event in market.escrow.events.TabSettled().process_receipt(tx, errors=DISCARD):
            _mark(store, gate, event["args"]["client"], unpack_entries(bytes(event["args"]["paid"])), event["args"]["seq"])
        for event in market.escrow.events.TabRejected().process_receipt(tx, errors=DISCARD):
            rejected = chunk[event["args"]["index"]]
            log.warning(
                "the escrow rejected the tab of %s (%s); it is read again next round",
                rejected.client,
                REJECTIONS.get(event["args"]["reason"], event["args"]["reason"]),
            )
        paid = owed - sum(fresh.owed for s in chunk if (fresh := store.get(s.client)) is not None)
        done.append(Settlement(tx["transactionHash"].hex(), len(chunk), tx["gasUsed"], paid))
        log.info(
            "settled %d tab(s), %d token units to this node, in tx %s (%d gas)", len(chunk), paid, done[-1].tx, tx["gasUsed"]
        )
    return done


def escrow_balance_reader(market: Market) -> Callable[[str], Awaitable[int]]:
    """What the payment gate asks about a client it has not seen yet: its spendable escrow balance, read off the loop."""

    async def spendable(client: str) -> int:
        try:
            return await asyncio.to_thread(market.read, market.escrow.functions.spendableOf(client), "reading a balance")
        except ChainError as exc:
            raise PaymentRefused("chain_unreachable", f"cannot check the client's escrow balance: {exc}") from None

    return spendable


class Settler:
    """The node daemon's settlement loop; chain errors are logged and retried, never fatal."""

    def __init__(
        self, market: Market, store: TabStore, gate: PaymentGate, *, interval_s: float, min_value: int, tick_s: float = 1.0
    ) -> None:
        self.market, self.store, self.gate = market, store, gate
        self.interval_s, self.min_value, self.tick_s = interval_s, min_value, tick_s
        self.settlements: list[Settlement] = []
        self._from_block: int | None = None

    def _withdrawing_clients(self, latest: int) -> set[str]:
        start = latest if self._from_block is None else self._from_block
        if start > latest:
            return set()
        event = self.market.escrow.events.WithdrawalRequested
        logs = event.get_logs(from_block=start, to_block=latest)
        self._from_block = latest + 1
        return {entry["args"]["client"].lower() for entry in logs}

    def _refresh_balances(self) -> None:
        for claim in self.store.claims():  # claims sent by `node redeem` in another process too
            self.gate.refuse(claim.client)
        for client in list(self.gate.balances):
            self.gate.balances[client] = self.market.read(self.market.escrow.functions.spendableOf(to_checksum_address(client)))

    def _owed(self, clients: set[str] | None = None) -> int:
        return sum(s.owed for s in self.store.all() if clients is None or s.client.lower() in clients)

    def settle_once(self, periodic: bool, latest: int) -> None:
        """Settle now if a client that owes this node asked to withdraw by block `latest`, or (periodic) if enough
        value is owed."""
        withdrawing = self._withdrawing_clients(latest)
        if not withdrawing and not periodic:
            return  # the common tick: no new withdrawal request, and the interval has not come round
        urgent = bool(withdrawing) and self._owed(withdrawing) > 0
        if urgent:
            log.info(
                "client(s) %s asked to withdraw; settling their tabs before the timelock ends", ", ".join(sorted(withdrawing))
            )
        due = self._owed()
        if urgent or (periodic and due > 0 and due >= self.min_value):
            self.settlements += settle_pending(self.market, self.store, self.gate)
        if periodic or withdrawing:
            self._refresh_balances()

    async def run(self, watch: BlockWatch) -> None:
        """Every tick: look at the newest block (`watch`), and work only when a block came (a withdrawal request can
        only arrive in one) or the redeem interval is up."""
        elapsed, handled = 0.0, None
        while True:
            await asyncio.sleep(self.tick_s)
            elapsed += self.tick_s
            periodic = elapsed >= self.interval_s
            try:
                latest = await watch.latest(max_age_s=self.tick_s / 2)  # the verifier's read of this tick will do
                if latest == handled and not periodic:
                    continue
                await asyncio.to_thread(self.settle_once, periodic, latest)
                handled = latest
                if periodic:
                    elapsed = 0.0
            except (ChainError, requests.RequestException) as exc:
                log.warning("settlement postponed: %s", exc)
            except Exception:
                log.exception("settlement failed; retrying at the next interval")
