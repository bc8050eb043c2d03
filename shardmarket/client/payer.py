"""The client's side of payment: one ledger of cumulative amounts per node and ONE EIP-712 tab signed per step,
covering every node the client pays; its usageHash chains the usage records of every step answered under this
client, so any single request can be audited later."""

from __future__ import annotations

import sqlite3
import threading
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from cchecksum import to_checksum_address

from shardmarket.chain.commitment import SignedCommitment
from shardmarket.chain.eip712 import (
    MAX_ENTRIES,
    Domain,
    Entry,
    Tab,
    UsageRecord,
    chain_usage_hash,
    pack_tab,
    sign_tab,
    signing_key,
)

if TYPE_CHECKING:
    from shardmarket.client.routing import NodeInfo

ZERO32 = bytes(32)
SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (node TEXT PRIMARY KEY, amount TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tab (id INTEGER PRIMARY KEY CHECK (id = 0), seq INTEGER NOT NULL, usage_hash BLOB NOT NULL);
"""


@dataclass(frozen=True)
class _Signed:
    """A signed tab raising `raises` (node -> cost) over the totals `base`, to `amounts`."""

    raises: dict[str, int]
    base: dict[str, int]
    amounts: dict[str, int]
    seq: int
    packed: bytes


def _raises(charges: list[tuple[NodeInfo, int]]) -> dict[str, int]:
    return {c[0].operator.lower(): c[0].price * c[1] for c in charges if c[0].price * c[1] > 0}


class TabFull(ValueError):
    """The client's tab already names the escrow's maximum of nodes."""


class Payer:
    """Signs tabs for `account` under the escrow's `domain`; the per-node totals live in SQLite, so a restarted
    client never signs less than it already promised."""

    def __init__(self, account, domain: Domain, ledger: Path) -> None:
        self.account, self.domain = account, domain
        self._key = signing_key(bytes(account.key))  # libsecp256k1, made once
        ledger.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(ledger, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: no fsync per tab; an OS crash may lose the newest totals, which only makes the next tabs too small
        # for the nodes to accept, never a double payment
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()
        self._amounts = {node: int(amount) for node, amount in self._db.execute("SELECT node, amount FROM entries")}
        row = self._db.execute("SELECT seq, usage_hash FROM tab").fetchone()
        self._seq: int = row[0] if row else 0
        self._usage = bytes(row[1]) if row else ZERO32
        self.request_costs: dict[bytes, int] = defaultdict(int)
        self._presigned: _Signed | None = None
        self._newest: bytes | None = None  # the newest tab signed since this client started

    @property
    def address(self) -> str:
        return self.account.address

    def tab(self, charges: list[tuple[NodeInfo, int]], request_id: bytes) -> bytes | None:
        """The signed tab for one step: every (node, tokens) of `charges` (NodeInfo, tokens it will process) raises
        that node's entry by price x tokens; stored before it is returned. None when the step costs nothing."""
        raises = _raises(charges)
        if not raises:
            return None
        with self._lock:
            signed, self._presigned = self._presigned, None
            if signed is None or signed.raises != raises or signed.base is not self._amounts:
                signed = self._sign(raises)
            self._store(signed)
            self.request_costs[request_id] += sum(raises.values())
        return signed.packed

    def standing(self, node: NodeInfo) -> bytes:
        """The newest tab, promising nothing new: it rides on OPEN so that a paid node knows who pays the session. Signed
        and stored now when this client has signed none since it started; one that has promised nothing to anyone yet
        names `node` at 0 (a tab names at least one node), an entry its next tab may leave out."""
        with self._lock:
            if self._newest is not None:
                return self._newest
            self._presigned = None  # its sequence number goes to this tab
            if self._amounts:
                signed = self._sign({})
                self._store(signed)
                return signed.packed
            tab = Tab(self.account.address, self._seq + 1, (Entry(to_checksum_address(node.operator), 0),), self._usage)
            self._db.execute("INSERT OR REPLACE INTO tab VALUES (0, ?, ?)", (tab.seq, self._usage))
            self._seq = tab.seq
            return pack_tab(tab, sign_tab(self._key, tab, self.domain))

    def _store(self, signed: _Signed) -> None:
        """Store `signed` before it goes out: what it raises and its sequence number (the caller holds the lock)."""
        self._db.execute("BEGIN")
        self._db.executemany("INSERT OR REPLACE INTO entries VALUES (?, ?)", [(n, str(signed.amounts[n])) for n in signed.raises])
        self._db.execute("INSERT OR REPLACE INTO tab VALUES (0, ?, ?)", (signed.seq, self._usage))
        self._db.execute("COMMIT")
        self._seq, self._amounts, self._newest = signed.seq, signed.amounts, signed.packed

    def presign(self, charges: list[tuple[NodeInfo, int]]) -> None:
        """Sign ahead, while the client waits on a node, the tab that `tab(charges)` would sign next; `tab` sends it
        if no other tab was signed meanwhile (its usageHash may then lag the newest answer: the next tab catches up).
        Nothing is stored until `tab` sends it, so a tab never sent promises nothing."""
        raises = _raises(charges)
        if not raises:
            return
        with self._lock:
            try:
                self._presigned = self._sign(raises)
            except TabFull:
                self._presigned = None  # `tab` raises it when the step is really sent

    def _sign(self, raises: dict[str, int]) -> _Signed:
        """The next tab raising `raises` over the stored totals, signed (the caller holds the lock)."""
        amounts = dict(self._amounts)
        for node, cost in raises.items():
            amounts[node] = amounts.get(node, 0) + cost
        if len(amounts) > MAX_ENTRIES:
            raise TabFull(
                f"this client's tab already names {len(self._amounts)} nodes, the escrow's cap of {MAX_ENTRIES}; "
                "withdraw its deposit and pay from a new account (`shardmarket keys new`)"
            )
        entries = tuple(Entry(to_checksum_address(n), a) for n, a in sorted(amounts.items(), key=lambda item: int(item[0], 16)))
        tab = Tab(self.account.address, self._seq + 1, entries, self._usage)
        return _Signed(raises, self._amounts, amounts, tab.seq, pack_tab(tab, sign_tab(self._key, tab, self.domain)))

    def answered(self, node, signed: SignedCommitment, tokens: int) -> None:
        """Chain the usage record of a step `node` answered into the client's usage hash."""
        c, output_hash = signed.commitment.context, signed.commitment.output_hash
        with self._lock:
            self._usage = chain_usage_hash(self._usage, UsageRecord(c.request_id, c.step, tokens, c.input_hash, output_hash))

    def promised(self, node_operator: str) -> int:
        """Total promised to a node so far."""
        return self._amounts.get(node_operator.lower(), 0)

    def close(self) -> None:
        self._db.close()
