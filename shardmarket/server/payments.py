"""The node's payment check on every step: the client's newest EIP-712 tab must be signed by the client, promise
this node what it has served (up to a per-client credit limit), promise all its nodes no more than the client's
escrow balance can pay (plus the credit limit), and promise this node, beyond what the escrow has paid it, no more than
the client's reserve for this node (plus the credit limit): the balance is shared with every payee and the client can
drain it to an alias first, the reserve only this node can draw on. A client caught lowering what it promised is
refused."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Awaitable, Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TypeVar

from shardmarket.chain.eip712 import Domain, Entry, InvalidSignature, Tab, recover_tab_signer, tab_client, unpack_tab
from shardmarket.server.tabs import StoredTab, TabStore

T = TypeVar("T")


class PaymentRefused(Exception):
    """A step the node will not run for payment reasons; `code` goes back in the error frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Credit:
    """A step admitted on credit, answered before its tab is checked: its client, the tab as it came, and its cost,
    already counted as served. `PaymentGate.acknowledge` checks and stores the tab before the node commits."""

    client: str
    raw: bytes
    cost: int


async def _finished(check: Future | Awaitable[object]) -> None:
    """Wait for a tab check, as PaymentRefused on any failure: a thread that has finished answers at once, without the
    turns of the event loop that awaiting its asyncio wrapper takes."""
    try:
        if not isinstance(check, Future):
            await check
        elif check.done():
            check.result()
        else:
            await asyncio.wrap_future(check)
    except PaymentRefused:
        raise
    except Exception as exc:  # a full disk, a broken store: the step must not go out unpaid
        raise PaymentRefused("payment_unavailable", f"this node could not check or store the tab ({exc}); try again") from exc


class PaymentGate:
    """Checks tabs and credit per client; `credit(client)` reads the client's spendable escrow balance and its reserve
    for this node from the chain."""

    def __init__(
        self,
        store: TabStore,
        node: str,
        price: int,
        domain: Domain,
        credit_limit: int,
        credit: Callable[[str], Awaitable[tuple[int, int]]],
    ) -> None:
        self.store, self.node, self.price, self.domain = store, node, price, domain
        self.credit_limit = credit_limit
        self.credit = credit
        self.balances: dict[str, int] = {}  # client -> spendable escrow balance, refreshed by the settler
        self.reserves: dict[str, int] = {}  # client -> its reserve for this node, refreshed by the settler
        self._accounts: dict[str, StoredTab] = {s.client.lower(): s for s in store.all()}
        self._session_clients: dict[bytes, str] = {}
        self._lock = threading.Lock()  # tabs are checked and stored on worker threads too
        self._threads = ThreadPoolExecutor(max_workers=4, thread_name_prefix="tabs")
        self._refused: set[str] = {c.client.lower() for c in store.claims() if c.lowered}

    async def admit(
        self, request_id: bytes, tokens: int, fields: dict, step: Callable[[], Awaitable[T]]
    ) -> tuple[T, Credit | None]:
        """Run `step`, a step of `tokens` tokens whose tab rides in `fields`, as its payment allows; returns its result and,
        for a step admitted on credit, the Credit that `acknowledge` must settle before the node commits to the answer.
        Raises PaymentRefused when the client must pay first (the result must then not go out).

        Three ways in, fastest first: a session whose payer an earlier checked tab named runs on credit, its tab checked
        after the answer went out; a known client's tab is checked and stored on a thread while `step` runs; a client's
        first tab is checked (its escrow balance read from the chain) while `step` runs, before the answer goes out."""
        credit = self._on_credit(request_id, tokens, fields)
        if credit is not None:
            try:
                return await step(), credit
            except BaseException:
                self._refund(credit)
                raise
        if tab_client(fields.get("tab")) in self.balances:  # not verified yet: only to pick the way
            checking = self._threads.submit(self._check_and_store, request_id, tokens, fields.get("tab"))
            try:
                result = await step()
            except BaseException:
                await asyncio.gather(_finished(checking), return_exceptions=True)
                raise
            await _finished(checking)
            return result, None
        running = asyncio.ensure_future(step())
        try:
            await _finished(self._check_first_tab(request_id, tokens, fields))
        except BaseException:
            await asyncio.gather(running, return_exceptions=True)
            raise
        return await running, None

    async def acknowledge(self, credit: Credit | None, commitment: Callable[[], T]) -> T:
        """`commitment()`, returned once the tab of a step admitted on `credit` is checked and stored (on a thread, while
        `commitment()` signs). Raises PaymentRefused for a bad tab: the answered step then stays served against the
        client's credit, on the tab stored before."""
        if credit is None:
            return commitment()
        checking = self._threads.submit(self._check_credited, credit)
        signed = commitment()
        await _finished(checking)
        return signed

    async def bind(self, request_id: bytes, raw: object) -> None:
        """Name the payer of a session being opened: the client whose tab rides on its OPEN (a tab promising nothing
        new will do). Raises PaymentRefused unless the tab is signed by a client this node serves that has something to
        spend in the escrow (read from the chain on first sight): sessions, which hold memory, are for paying clients."""
        await _finished(self._bind(request_id, raw))

    async def _bind(self, request_id: bytes, raw: object) -> None:
        tab, _ = await asyncio.to_thread(self._parse, raw)
        client = tab.client.lower()
        self._check_served(tab)
        balance = self.balances.get(client)
        if balance is None:
            balance, reserve = await self.credit(tab.client)
            if balance > 0:  # a stranger's fresh keys leave nothing behind
                self.balances[client], self.reserves[client] = balance, reserve
        if balance <= 0:
            raise PaymentRefused(
                "insufficient_funds",
                f"client {tab.client} has nothing to spend in the escrow; deposit with `shardmarket client deposit`",
            )
        self._session_clients[request_id] = client

    def payer(self, request_id: bytes) -> str | None:
        """The client paying session `request_id`, once a tab named it (on OPEN or on a step); None before."""
        return self._session_clients.get(request_id)

    def refuse(self, client: str) -> None:
        """Serve `client` no more (it lowered what it promised this node)."""
        self._refused.add(client.lower())

    def release(self, request_id: bytes) -> None:
        """Forget the payer of a closed session."""
        self._session_clients.pop(request_id, None)

    def settled(self, client: str, paid: tuple[Entry, ...], seq: int) -> None:
        """The escrow's paid vector for `client` is now `paid` (settlement `seq`)."""
        with self._lock:
            known = self._accounts.get(client.lower())
            if known is not None and seq >= known.paid_seq:
                self._accounts[client.lower()] = replace(known, paid=paid, paid_seq=seq)

    def reset(self, client: str, paid: tuple[Entry, ...], seq: int) -> None:
        """The chain forgot blocks: `client`'s paid vector is `paid` (settlement `seq`) again, even if older."""
        with self._lock:
            known = self._accounts.get(client.lower())
            if known is not None:
                self._accounts[client.lower()] = replace(known, paid=paid, paid_seq=seq)

    def _parse(self, raw: object) -> tuple[Tab, bytes]:
        if raw is None:
            raise PaymentRefused(
                "payment_required", f"this node charges {self.price} token units per token: send a tab with every step"
            )
        if not isinstance(raw, bytes):
            raise PaymentRefused("bad_tab", f"a tab is bytes, not {type(raw).__name__}; send the signed tab as bytes")
        try:
            tab, signature, paid = unpack_tab(raw)
            if paid:
                raise ValueError("a step's tab carries no paid vector")
            signer = recover_tab_signer(tab, signature, self.domain)
        except (TypeError, ValueError, InvalidSignature) as exc:
            raise PaymentRefused("bad_tab", f"the tab is malformed or its signature is invalid ({exc}); sign it again") from None
        if signer.lower() != tab.client.lower():
            raise PaymentRefused("bad_tab", f"the tab names client {tab.client} but was signed by {signer}")
        return tab, signature

    async def _check_first_tab(self, request_id: bytes, tokens: int, fields: dict) -> None:
        """A client's first step: its signature is checked before its escrow balance is read from the chain."""
        if self.price == 0 and "tab" not in fields:
            return
        tab, signature = await asyncio.to_thread(self._parse, fields.get("tab"))  # off the loop: overlaps the step
        if tab.client.lower() not in self.balances:
            self.balances[tab.client.lower()], self.reserves[tab.client.lower()] = await self.credit(tab.client)
        with self._lock:
            cost = self._reserve(request_id, tokens, tab, signature)
        await asyncio.to_thread(self.store.record, tab, signature, cost)

    def _check_and_store(self, request_id: bytes, tokens: int, raw: object) -> None:
        tab, signature = self._parse(raw)
        with self._lock:
            cost = self._reserve(request_id, tokens, tab, signature)
            self.store.record(tab, signature, cost)

    def _reserve(self, request_id: bytes, tokens: int, tab: Tab, signature: bytes) -> int:
        """Check `tab` against this node's books and reserve the step's cost, which it returns (the caller holds the lock)."""
        client = tab.client.lower()
        self._check_served(tab)
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
        return cost

    def _check_served(self, tab: Tab) -> None:
        if tab.client.lower() in self._refused:
            raise PaymentRefused(
                "client_refused",
                f"client {tab.client} signed a tab lowering what it promised this node; this node no longer serves it",
            )

    def _newer(self, known: StoredTab, tab: Tab, signature: bytes) -> StoredTab:
        """`known` with `tab` as its newest tab if `tab` is newer; raises if `tab` lowers what was promised this node
        or drops a node the escrow paid."""
        if tab.seq <= known.tab.seq:
            return known
        if tab.amount_for(self.node) < known.entry:
            raise PaymentRefused(
                "bad_tab",
                f"tab {tab.seq} promises this node less than tab {known.tab.seq} did; a client never lowers what it promised",
            )
        if not tab.covers(known.paid):
            raise PaymentRefused(
                "bad_tab",
                f"tab {tab.seq} names less than the escrow has already paid some node; "
                "the escrow would reject it: sign a tab over every node paid",
            )
        return replace(known, tab=tab, signature=signature)

    def _check_funds(self, newest: StoredTab) -> None:
        balance = self.balances[newest.client.lower()]
        if newest.unpaid_total > balance + self.credit_limit:
            raise PaymentRefused(
                "insufficient_funds",
                f"client {newest.client} has {balance} spendable in the escrow, less than its tab's unpaid "
                f"total ({newest.unpaid_total}); deposit more with `shardmarket client deposit`",
            )
        reserve = self.reserves.get(newest.client.lower(), 0)
        if newest.owed > reserve + self.credit_limit:
            raise PaymentRefused(
                "reserve_required",
                f"the tab promises this node {newest.owed} beyond what the escrow has paid it, more than the {reserve} "
                f"client {newest.client} reserved for it (and this node's credit of {self.credit_limit}); reserve more for "
                f"node {self.node} with `shardmarket client reserve {self.node} AMOUNT`",
            )

    def _on_credit(self, request_id: bytes, tokens: int, fields: dict) -> Credit | None:
        """Reserve a step's cost on credit, so that it runs and is answered before its tab is checked. Only for a session
        whose payer an earlier checked tab named (so nobody can spend another client's credit), and only while the
        newest checked tab leaves credit for the step. None: the tab must be checked first."""
        client = self._session_clients.get(request_id)
        raw = fields.get("tab")
        if client is None or not isinstance(raw, bytes) or tab_client(raw) != client:
            return None
        cost = self.price * tokens
        with self._lock:
            known = self._accounts.get(client)
            if client in self._refused or known is None or known.served + cost - known.entry > self.credit_limit:
                return None
            self._accounts[client] = replace(known, served=known.served + cost)
        return Credit(client, raw, cost)

    def _refund(self, credit: Credit) -> None:
        """Take back the reservation of a step on credit that did not run."""
        with self._lock:
            known = self._accounts[credit.client]
            self._accounts[credit.client] = replace(known, served=known.served - credit.cost)

    def _check_credited(self, credit: Credit) -> None:
        """Check and store the tab of a step that ran on credit. A bad tab is refused (PaymentRefused) and the step
        stays served on the stored tab: it was answered, so it counts against the client's credit."""
        try:
            tab, signature = self._parse(credit.raw)
            with self._lock:
                known = self._accounts[credit.client]
                newest = self._newer(known, tab, signature)
                self._check_funds(newest)
                self.store.record(tab, signature, credit.cost)
                self._accounts[credit.client] = newest
        except PaymentRefused:
            with self._lock:
                known = self._accounts[credit.client]
                self.store.record(known.tab, known.signature, credit.cost)
            raise
