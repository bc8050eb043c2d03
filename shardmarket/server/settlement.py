"""Settlement: the node turns its clients' newest tabs into escrow payments in one settleTabs transaction, when
enough value is owed and at once when a client asks to withdraw its balance or this node's reserve. A tab pays
every node it names, so the node first reads each client's paid vector from the chain's TabSettled and Claimed
events and skips clients another node has already settled. What settling leaves owed (the client settled a newer tab
promising this node less, or another payee drained the balance first) is claimed with the tab held here
(PaymentEscrow.claim), out of the client's balance and then out of its reserve for this node.

The chain may forget blocks (a reorg, or a development chain restarted from an older state). The node keeps the hash
of the last block it read; when the chain no longer has that block, it reads every client's paid vector again, forgets
the claims whose transactions are gone, and settles again what was lost. A paid vector counts as final (what `node
earnings` calls redeemed) once `confirmations` blocks are on top of it."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import requests
from eth_typing import HexStr
from eth_utils import to_checksum_address
from web3.exceptions import BlockNotFound, TransactionNotFound
from web3.logs import DISCARD

from shardmarket.chain.contracts import ChainError, Market, Rejection
from shardmarket.chain.eip712 import Entry, Tab, pack_entries, paid_vector_hash, split_packed_tabs, unpack_entries, unpack_tab
from shardmarket.chain.watch import BlockWatch
from shardmarket.server.payments import PaymentGate, PaymentRefused
from shardmarket.server.tabs import Claim, StoredTab, TabStore

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
    """The TabSettled and Claimed events (both carry a client's new paid vector and settled seq) in log order."""
    filters = {"client": to_checksum_address(client)} if client else None
    logs = [
        entry
        for event in (market.escrow.events.TabSettled, market.escrow.events.Claimed)
        for entry in event.get_logs(from_block=from_block, to_block=to_block, argument_filters=filters)
    ]
    return sorted(logs, key=lambda entry: (entry["blockNumber"], entry["logIndex"]))


def paid_vector_on_chain(market: Market, client: str, to_block: int | str = "latest") -> tuple[tuple[Entry, ...], int]:
    """`client`'s paid vector and settled seq as of block `to_block`, from its last TabSettled or Claimed event
    ((), -1 if none)."""
    if isinstance(to_block, int) and to_block < 0:
        return (), -1
    logs = paid_vector_events(market, 0, to_block, client=client)
    if not logs:
        return (), -1
    last = logs[-1]["args"]
    return unpack_entries(bytes(last["paid"])), last["seq"]


def sync_paid_vectors(market: Market, store: TabStore, gate: PaymentGate | None = None, confirmations: int = 0) -> bool:
    """Read the paid-vector events since the last sync into the store (and the gate); when the chain forgot a block the
    store had read, read every client's paid vector again instead. Returns whether the chain forgot blocks."""
    head = market.w3.eth.get_block("latest")
    final_head = max(head["number"] - confirmations, -1)
    scanned, final = store.cursor("scanned"), store.cursor("final")
    forgot = not _still_on_chain(market, *scanned) or not _still_on_chain(market, *final)
    if forgot:
        _recover(market, store, gate, scanned[0], head["number"], final_head)
    else:
        if scanned[0] < head["number"]:
            for entry in paid_vector_events(market, scanned[0] + 1, head["number"]):
                args = entry["args"]
                _mark(store, gate, args["client"], unpack_entries(bytes(args["paid"])), args["seq"])
        if final[0] < final_head:
            for entry in paid_vector_events(market, final[0] + 1, final_head):
                store.mark_final(entry["args"]["client"], unpack_entries(bytes(entry["args"]["paid"])))
    store.set_cursor("scanned", head["number"], head["hash"].to_0x_hex())
    try:
        final_block = head if final_head == head["number"] else market.w3.eth.get_block(final_head) if final_head >= 0 else None
    except BlockNotFound:  # the chain went back while this sync read it: the next sync finds the scanned block gone
        return forgot
    if final_block is not None:
        store.set_cursor("final", final_head, final_block["hash"].to_0x_hex())
    return forgot


def _still_on_chain(market: Market, number: int, block_hash: str) -> bool:
    """Whether block `number` is still the block of hash `block_hash` (a store that read nothing yet: yes)."""
    if number < 0:
        return True
    try:
        return market.w3.eth.get_block(number)["hash"].to_0x_hex() == block_hash
    except BlockNotFound:
        return False


def _recover(market: Market, store: TabStore, gate: PaymentGate | None, scanned: int, head: int, final_head: int) -> None:
    """The chain forgot blocks: every client's paid vector as the chain has it now, and only the claims it still has."""
    log.warning(
        "the chain no longer has block %d that this node read (a reorg, or a chain restarted from an older state; its "
        "head is now %d): reading every client's paid vector again; whatever the lost blocks paid is settled again",
        scanned,
        head,
    )
    for stored in store.all():
        paid, seq = paid_vector_on_chain(market, stored.client, head)
        if paid != stored.paid:
            log.warning(
                "client %s: this node's pay went from %d to %d", stored.client, stored.redeemed, _amount(paid, stored.node)
            )
        store.reset_paid(stored.client, paid, seq)
        store.mark_final(stored.client, paid_vector_on_chain(market, stored.client, final_head)[0])
        if gate is not None:
            gate.reset(stored.client, paid, seq)
    for claim in store.claims():
        try:
            market.w3.eth.get_transaction_receipt(HexStr(claim.tx))
        except TransactionNotFound:
            log.warning(
                "the claim on client %s's tab %d (tx %s) is gone with the lost blocks", claim.client, claim.tab_seq, claim.tx
            )
            store.forget_claim(claim.tx)


def _amount(paid: tuple[Entry, ...], node: str) -> int:
    return next((e.amount for e in paid if e.node.lower() == node.lower()), 0)


def _mark(store: TabStore, gate: PaymentGate | None, client: str, paid: tuple[Entry, ...], seq: int) -> None:
    store.mark_paid(client, paid, seq)
    if gate is not None:
        gate.settled(client, paid, seq)


def _refresh(market: Market, stored: StoredTab, store: TabStore, gate: PaymentGate | None, lowered: set[str]) -> StoredTab | None:
    """Bring `stored` up to date with the escrow (its paid vector; the client's own newer tab); returns the tab to settle
    if settling it pays this node something, None when nothing is owed or only a claim can collect it. A client that
    settled a newer tab promising this node less joins `lowered`."""
    settled = market.read(market.escrow.functions.tabOf(stored.client), "reading a client's tab state")
    if settled.paidHash != paid_vector_hash(stored.paid):  # a settlement the event sync has not seen (or a client new to us)
        paid, paid_seq = paid_vector_on_chain(market, stored.client)
        _mark(store, gate, stored.client, paid, paid_seq)
        stored = store.get(stored.client) or stored  # the store never drops a tab: this is the refreshed row
    if stored.owed == 0:
        return None  # another node settled this client's tab
    if stored.tab.seq < settled.seq:  # the client, or another node, settled a newer tab
        newer = _settled_tab(market, stored.client, settled.seq)
        if newer is None or newer[0].amount_for(stored.node) < stored.entry:
            if newer is not None:
                log.error(
                    "client %s settled tab %d promising this node %d, less than the %d of its tab %d held here; this node "
                    "claims the difference and no longer serves it",
                    stored.client,
                    settled.seq,
                    newer[0].amount_for(stored.node),
                    stored.entry,
                    stored.tab.seq,
                )
                lowered.add(stored.client.lower())
                if gate is not None:
                    gate.refuse(stored.client)
            return None
        stored = store.record(*newer, 0)  # the client's own signed newer tab: settling it again collects the rest
    return stored if stored.tab.covers(stored.paid) else None


def _claim(market: Market, store: TabStore, stored: StoredTab, lowered: bool) -> Claim | None:
    """Collect with the held tab what settling could not (PaymentEscrow.claim): out of the client's balance, then out of
    its reserve for this node. Nothing is sent while both are empty. `lowered`: the client settled a newer tab promising
    this node less."""
    client, node = to_checksum_address(stored.client), to_checksum_address(stored.node)
    balance = market.read(market.escrow.functions.balanceOf(client), "reading a balance")
    reserve = market.read(market.escrow.functions.reserveOf(client, node), "reading a reserve").amount
    if balance + reserve == 0:
        log.warning(
            "client %s owes this node %d on its tab %d but has no balance and no reserve for it; claimed once it deposits",
            stored.client,
            stored.owed,
            stored.tab.seq,
        )
        return None
    owed = stored.owed
    call = market.escrow.functions.claim(node, stored.signed(), pack_entries(stored.paid))
    try:
        receipt = market.transact(call, f"claiming what client {stored.client} promised in tab {stored.tab.seq}")
    except ChainError as exc:
        log.error("claiming what client %s owes on its tab %d failed: %s; tried again next round", client, stored.tab.seq, exc)
        return None
    [event] = market.escrow.events.Claimed().process_receipt(receipt, errors=DISCARD)
    args = event["args"]
    claim = Claim(
        stored.client,
        stored.tab.seq,
        args["fromBalance"] + args["fromReserve"],
        args["fromReserve"],
        receipt["transactionHash"].to_0x_hex(),
        lowered,
    )
    store.record_claim(claim)
    log.warning(
        "claimed %d of the %d client %s owes this node on its tab %d (%d out of its reserve for this node), in tx %s (%d gas)",
        claim.amount,
        owed,
        stored.client,
        stored.tab.seq,
        claim.from_reserve,
        claim.tx,
        receipt["gasUsed"],
    )
    return claim


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
    market: Market, store: TabStore, gate: PaymentGate | None = None, clients: set[str] | None = None, confirmations: int = 0
) -> list[Settlement]:
    """Settle the newest tab of every client (of `clients`, if given) that still owes this node, BATCH per transaction;
    then claim what settling could not collect."""
    sync_paid_vectors(market, store, gate, confirmations)
    pending = [s for s in store.all() if s.owed > 0 and (clients is None or s.client.lower() in clients)]
    lowered: set[str] = set()
    ready = [r for r in (_refresh(market, s, store, gate, lowered) for s in pending) if r is not None]
    done = []
    for first in range(0, len(ready), BATCH):
        chunk = ready[first : first + BATCH]
        owed = sum(s.owed for s in chunk)
        tx = market.transact(
            market.escrow.functions.settleTabs(b"".join(s.packed_with_paid() for s in chunk)),
            f"settling {len(chunk)} client tab(s)",
        )
        for event in market.escrow.events.TabRejected().process_receipt(tx, errors=DISCARD):
            rejected = chunk[event["args"]["index"]]
            log.warning(
                "the escrow rejected the tab of %s (%s); it is read again next round",
                rejected.client,
                REJECTIONS.get(event["args"]["reason"], event["args"]["reason"]),
            )
        sync_paid_vectors(market, store, gate, confirmations)  # the settlement's events, read back like any other block's
        paid = owed - sum(fresh.owed for s in chunk if (fresh := store.get(s.client)) is not None)
        done.append(Settlement(tx["transactionHash"].to_0x_hex(), len(chunk), tx["gasUsed"], paid))
        log.info(
            "settled %d tab(s), %d token units to this node, in tx %s (%d gas)", len(chunk), paid, done[-1].tx, tx["gasUsed"]
        )
    for stored in [store.get(s.client) or s for s in pending]:
        if stored.owed > 0 and _claim(market, store, stored, stored.client.lower() in lowered) is not None:
            sync_paid_vectors(market, store, gate, confirmations)
    return done


def escrow_credit_reader(market: Market, node: str) -> Callable[[str], Awaitable[tuple[int, int]]]:
    """What the payment gate asks about a client it has not seen yet: its spendable escrow balance and its reserve for
    `node`, read off the loop."""

    async def credit(client: str) -> tuple[int, int]:
        try:
            spendable, reserve = await asyncio.to_thread(
                market.read, market.escrow.functions.creditOf(client, to_checksum_address(node)), "reading a client's credit"
            )
        except ChainError as exc:
            raise PaymentRefused("chain_unreachable", f"cannot check the client's escrow balance: {exc}") from None
        return spendable, reserve

    return credit


class Settler:
    """The node daemon's settlement loop; chain errors are logged and retried, never fatal."""

    def __init__(
        self,
        market: Market,
        store: TabStore,
        gate: PaymentGate,
        *,
        interval_s: float,
        min_value: int,
        confirmations: int = 0,
        tick_s: float = 1.0,
    ) -> None:
        self.market, self.store, self.gate = market, store, gate
        self.interval_s, self.min_value, self.confirmations, self.tick_s = interval_s, min_value, confirmations, tick_s
        self.settlements: list[Settlement] = []
        self.next_check_at = time.time() + interval_s  # unix time of the next periodic check (the dashboard shows it)
        self._from_block: int | None = None
        self._seen = store.cursor("scanned")  # the newest block this process read, and its hash

    def _withdrawing_clients(self, latest: int) -> set[str]:
        """Clients that asked, by block `latest`, to withdraw their balance or their reserve for this node."""
        start = latest if self._from_block is None else self._from_block
        if start > latest:
            return set()
        escrow = self.market.escrow.events
        logs = escrow.WithdrawalRequested.get_logs(from_block=start, to_block=latest) + escrow.ReserveReleaseRequested.get_logs(
            from_block=start, to_block=latest, argument_filters={"node": to_checksum_address(self.gate.node)}
        )
        self._from_block = latest + 1
        return {entry["args"]["client"].lower() for entry in logs}

    def _refresh_balances(self) -> None:
        for claim in self.store.claims():  # claims sent by `node redeem` in another process too
            if claim.lowered:
                self.gate.refuse(claim.client)
        node = to_checksum_address(self.gate.node)
        for client in list(self.gate.balances):
            credit = self.market.read(self.market.escrow.functions.creditOf(to_checksum_address(client), node))
            self.gate.balances[client], self.gate.reserves[client] = credit

    def _owed(self, clients: set[str] | None = None) -> int:
        return sum(s.owed for s in self.store.all() if clients is None or s.client.lower() in clients)

    def settle_once(self, periodic: bool, latest: int) -> None:
        """Read the new blocks' settlements (settling again at once what blocks the chain forgot had paid); settle now if
        a client that owes this node asked by block `latest` to withdraw its balance or its reserve for this node, or
        (periodic) if enough value is owed."""
        forgot = sync_paid_vectors(self.market, self.store, self.gate, self.confirmations)
        if not forgot and not _still_on_chain(self.market, *self._seen):
            # the store's reader in another process (`node earnings`, `node redeem`) found the lost blocks first and
            # set the store right: so must this process's payment gate
            forgot = True
            for stored in self.store.all():
                self.gate.reset(stored.client, stored.paid, stored.paid_seq)
        self._seen = self.store.cursor("scanned")
        withdrawing = self._withdrawing_clients(latest)
        if not withdrawing and not periodic and not forgot:
            return  # the common tick: no new request, nothing lost, and the interval has not come round
        urgent = forgot or (bool(withdrawing) and self._owed(withdrawing) > 0)
        if urgent and withdrawing:
            log.info(
                "client(s) %s asked to withdraw; settling their tabs before the timelock ends", ", ".join(sorted(withdrawing))
            )
        due = self._owed()
        if (urgent and due > 0) or (periodic and due > 0 and due >= self.min_value):
            self.settlements += settle_pending(self.market, self.store, self.gate, confirmations=self.confirmations)
        if periodic or withdrawing or forgot:
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
                    self.next_check_at = time.time() + self.interval_s
            except (ChainError, requests.RequestException) as exc:
                log.warning("settlement postponed: %s", exc)
            except Exception:
                log.exception("settlement failed; retrying at the next interval")
