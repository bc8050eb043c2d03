"""The node's payment check on every step: the client's newest EIP-712 tab must be signed by the client, promise
this node what it has served (up to a per-client credit limit), and promise all its nodes no more than the
client's escrow balance can pay (plus the credit limit). A client caught lowering what it promised is refused."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace

from shardmarket.chain.eip712 import Domain, Entry, InvalidSignature, Tab, decode_settlement, recover_tab_signer, settlement_client
from shardmarket.server.tabs import StoredTab, TabStore


class PaymentRefused(Exception):
    """A step the node will not run for payment reasons; `code` goes back in the error frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Charge:
    """A verified tab and the cost of the step it pays for, to be stored before the answer goes out."""

    tab: Tab
    signature: bytes
    cost: int


@dataclass(frozen=True)
class OnCredit:
    """A step run before its tab is checked (see `PaymentGate.run_on_credit`): its client, the tab as it came, and
    its cost, already counted as served."""

    client: str
    raw: bytes
    cost: int


async def charged(charging: Future | Awaitable[Charge | None]) -> Charge | None:
    """The outcome of `PaymentGate.start_charge`: a thread that has finished answers at once, without the turns of the
    event loop that awaiting its asyncio wrapper takes (about 0.1 ms a step on a cold CPU)."""
    if isinstance(charging, Future):
        return charging.result() if charging.done() else await asyncio.wrap_future(charging)
    return await charging


class PaymentGate:
    """Checks tabs and credit per client; `spendable(client)` reads the client's escrow balance from the chain."""

    def __init__(self, store: TabStore, node: str, price: int, domain: Domain, credit_limit: int,
                 spendable: Callable[[str], Awaitable[int]]) -> None:
        self.store, self.node, self.price, self.domain = store, node, price, domain
        self.credit_limit = credit_limit
        self.spendable = spendable
        self.balances: dict[str, int] = {}  # client -> spendable escrow balance, refreshed by the settler
        self._accounts: dict[str, StoredTab] = {s.client.lower(): s for s in store.all()}
        self._session_clients: dict[bytes, str] = {}
        self._lock = threading.Lock()  # `charge` checks and stores on worker threads
        self._threads = ThreadPoolExecutor(max_workers=4, thread_name_prefix="tabs")
        self._refused: set[str] = {c.client.lower() for c in store.claims()}

    def _parse(self, raw: object) -> tuple[Tab, bytes]:
        if raw is None:
            raise PaymentRefused("payment_required", f"this node charges {self.price} token units per token: send a tab with every step")
        try:
            tab, signature, previous = decode_settlement(raw)
            if previous:
                raise ValueError("a step's tab carries no paid vector")
            signer = recover_tab_signer(tab, signature, self.domain)
        except (TypeError, ValueError, InvalidSignature) as exc:
            raise PaymentRefused("bad_tab", f"the tab is malformed or its signature is invalid ({exc}); sign it again") from None
        if signer.lower() != tab.client.lower():
            raise PaymentRefused("bad_tab", f"the tab names client {tab.client} but was signed by {signer}")
        return tab, signature

    async def authorize(self, request_id: bytes, tokens: int, fields: dict) -> Charge | None:
        """Check the step's tab and reserve its cost; raises PaymentRefused when the client must pay first."""
        if self.price == 0 and "tab" not in fields:
            return None
        tab, signature = await asyncio.to_thread(self._parse, fields.get("tab"))  # off the loop: overlaps the compute
        if tab.client.lower() not in self.balances:
            self.balances[tab.client.lower()] = await self.spendable(tab.client)
        with self._lock:
            return self._reserve(request_id, tokens, tab, signature)

    async def charge(self, request_id: bytes, tokens: int, fields: dict) -> Charge | None:
        """`authorize`, then `record` (see `start_charge`)."""
        return await charged(self.start_charge(request_id, tokens, fields))

    def start_charge(self, request_id: bytes, tokens: int, fields: dict) -> Future | Awaitable[Charge | None]:
        """`charge`, started now (finish it with `charged`): a known client's tab is checked and stored on a worker
        thread from this moment (the returned concurrent Future), so the layers can run at once alongside; a client's
        first step goes the long way (its signature is checked before its escrow balance is read from the chain)."""
        if settlement_client(fields.get("tab")) in self.balances:  # not verified yet: only to pick the way
            return self._threads.submit(self._charge, request_id, tokens, fields.get("tab"))
        return self._authorize_then_record(request_id, tokens, fields)

    async def _authorize_then_record(self, request_id: bytes, tokens: int, fields: dict) -> Charge | None:
        charge = await self.authorize(request_id, tokens, fields)
        if charge is not None:
            await self.record(charge)
        return charge

    def _charge(self, request_id: bytes, tokens: int, raw: object) -> Charge:
        tab, signature = self._parse(raw)
        with self._lock:
            charge = self._reserve(request_id, tokens, tab, signature)
            self.store.record(charge.tab, charge.signature, charge.cost)
        return charge

    def _reserve(self, request_id: bytes, tokens: int, tab: Tab, signature: bytes) -> Charge:
        """Check `tab` against this node's books and reserve the step's cost (the caller holds the lock)."""
        client = tab.client.lower()
        if client in self._refused:
            raise PaymentRefused("client_refused", f"client {tab.client} signed a tab lowering what it promised this node; "
                                                   "this node no longer serves it")
        bound = self._session_clients.setdefault(request_id, client)
        if bound != client:
            raise PaymentRefused("bad_tab", "this session is paid by another client; one session, one payer")
        first = client not in self._accounts
        known = self._accounts[client] if not first else StoredTab(self.node, tab, signature, 0, (), -1)
        newest = known if first else self._newer(known, tab, signature)
        cost = self.price * tokens
        if known.served + cost - newest.entry > self.credit_limit:
            raise PaymentRefused(
                "payment_required",
                f"the tab promises this node {newest.entry} but this step brings the total served to {known.served + cost} "
                f"(credit limit {self.credit_limit}); send a tab covering the step",
            )
        self._check_funds(newest)
        self._accounts[client] = replace(newest, served=known.served + cost)
        return Charge(tab, signature, cost)

    def _newer(self, known: StoredTab, tab: Tab, signature: bytes) -> StoredTab:
        """`known` with `tab` as its newest tab if `tab` is newer; raises if `tab` lowers what was promised this node
        or drops a node the escrow paid."""
        if tab.seq <= known.tab.seq:
            return known
        if tab.amount_for(self.node) < known.entry:
            raise PaymentRefused("bad_tab", f"tab {tab.seq} promises this node less than tab {known.tab.seq} did; "
                                            "a client never lowers what it promised")
        if not tab.covers(known.paid):
            raise PaymentRefused("bad_tab", f"tab {tab.seq} names less than the escrow has already paid some node; "
                                            "the escrow would reject it: sign a tab over every node paid")
        return replace(known, tab=tab, signature=signature)

    def _check_funds(self, newest: StoredTab) -> None:
        balance = self.balances[newest.client.lower()]
        if newest.unpaid_total > balance + self.credit_limit:
            raise PaymentRefused(
                "insufficient_funds",
                f"client {newest.client} has {balance} spendable in the escrow, less than its tab's unpaid "
                f"total ({newest.unpaid_total}); deposit more with `shardmarket client deposit`",
            )

    def run_on_credit(self, request_id: bytes, tokens: int, fields: dict) -> OnCredit | None:
        """Reserve a step's cost on credit, so that it runs and is answered before its tab is checked; `settle_credit`
        checks and stores the tab afterwards, before the node commits to the answer. Only for a session whose payer an
        earlier checked tab named (so nobody can spend another client's credit), and only while the newest checked
        tab leaves credit for the step. None: check the tab first (`start_charge`)."""
        client = self._session_clients.get(request_id)
        raw = fields.get("tab")
        if client is None or settlement_client(raw) != client:
            return None
        cost = self.price * tokens
        with self._lock:
            known = self._accounts.get(client)
            if client in self._refused or known is None or known.served + cost - known.entry > self.credit_limit:
                return None
            self._accounts[client] = replace(known, served=known.served + cost)
        return OnCredit(client, raw, cost)

    def refund(self, step: OnCredit) -> None:
        """Take back the reservation of a step on credit that did not run."""
        with self._lock:
            known = self._accounts[step.client]
            self._accounts[step.client] = replace(known, served=known.served - step.cost)

    def start_settle(self, step: OnCredit) -> Future:
        """`settle_credit` on a worker thread (finish it with `charged`)."""
        return self._threads.submit(self.settle_credit, step)

    def settle_credit(self, step: OnCredit) -> Charge:
        """Check and store the tab of a step that ran on credit. A bad tab is refused (PaymentRefused) and the step
        stays served on the stored tab: it was answered, so it counts against the client's credit."""
        try:
            tab, signature = self._parse(step.raw)
            with self._lock:
                known = self._accounts[step.client]
                newest = self._newer(known, tab, signature)
                self._check_funds(newest)
                self.store.record(tab, signature, step.cost)
                self._accounts[step.client] = newest
        except PaymentRefused:
            with self._lock:
                known = self._accounts[step.client]
                self.store.record(known.tab, known.signature, step.cost)
            raise
        return Charge(tab, signature, step.cost)

    async def record(self, charge: Charge) -> StoredTab:
        """Store the tab (the step's answer is sent only after this returns)."""
        return await asyncio.to_thread(self.store.record, charge.tab, charge.signature, charge.cost)

    def refuse(self, client: str) -> None:
        """Serve `client` no more (it lowered what it promised this node)."""
        self._refused.add(client.lower())

    def release(self, request_id: bytes) -> None:
        self._session_clients.pop(request_id, None)

    def settled(self, client: str, paid: tuple[Entry, ...], seq: int) -> None:
        """The escrow's paid vector for `client` is now `paid` (settlement `seq`)."""
        with self._lock:
            known = self._accounts.get(client.lower())
            if known is not None and seq >= known.paid_seq:
                self._accounts[client.lower()] = StoredTab(self.node, known.tab, known.signature, known.served, paid, seq)

