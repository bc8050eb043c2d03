"""The node's tabs: every client's newest signed tab in SQLite, so a tab acknowledged to a client (the node's signed
commitment to the step it paid for goes out only after the tab is stored) survives a kill -9;
plus what the node served the client, the client's paid vector as last seen on chain (TabSettled, LoweringClaimed)
and the claims this node made against clients that lowered its entry."""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from shardmarket.chain.eip712 import Entry, Tab, pack_entries, pack_tab, unpack_entries, unpack_tab

SCHEMA = """
CREATE TABLE IF NOT EXISTS tabs (
    client TEXT PRIMARY KEY,
    seq INTEGER NOT NULL,
    signed BLOB NOT NULL,
    served TEXT NOT NULL,
    paid BLOB NOT NULL,
    paid_seq INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS claims (
    client TEXT NOT NULL,
    promised_seq INTEGER NOT NULL,
    lowered_seq INTEGER NOT NULL,
    amount TEXT NOT NULL,
    tx TEXT NOT NULL,
    PRIMARY KEY (client, promised_seq, lowered_seq)
);
"""


def tab_store_path(data_dir: Path) -> Path:
    """Where a node with data folder `data_dir` keeps its tabs."""
    return data_dir / "tabs.sqlite"


@dataclass(frozen=True)
class LoweringClaim:
    """What this node's claimLowered calls collected on the client's tab `promised_seq` against its lowering tab
    `lowered_seq`, in all, and the last call's transaction."""

    client: str
    promised_seq: int
    lowered_seq: int
    amount: int
    tx: str


@dataclass(frozen=True)
class StoredTab:
    """A client's newest tab, what this node served it, and its paid vector as of settlement `paid_seq` (-1: none seen)."""

    node: str
    tab: Tab
    signature: bytes
    served: int
    paid: tuple[Entry, ...]
    paid_seq: int

    @property
    def client(self) -> str:
        return self.tab.client

    @property
    def entry(self) -> int:
        """What the tab promises this node."""
        return self.tab.amount_for(self.node)

    @property
    def redeemed(self) -> int:
        """What the escrow has paid this node on this client's tabs."""
        node = self.node.lower()
        return next((e.amount for e in self.paid if e.node.lower() == node), 0)

    @property
    def owed(self) -> int:
        """What the tab promises this node beyond what the escrow has paid it."""
        return max(self.entry - self.redeemed, 0)

    @property
    def unpaid_total(self) -> int:
        """What the tab promises all its nodes beyond what the escrow has paid them."""
        paid = {e.node.lower(): e.amount for e in self.paid}
        return sum(max(e.amount - paid.get(e.node.lower(), 0), 0) for e in self.tab.entries)

    def packed_with_paid(self) -> bytes:
        """The packed tab with the stored paid vector, as settleTabs takes it."""
        return pack_tab(self.tab, self.signature, self.paid)

    def signed(self) -> bytes:
        """The packed tab alone (how it travels and how claimLowered takes it)."""
        return pack_tab(self.tab, self.signature)


class TabStore:
    """Thread-safe SQLite store. WAL with synchronous=NORMAL: a committed write is in the OS page cache, so it
    survives a kill -9 of the process; only a power cut can lose the last writes (fsync per step is what made
    payment cost speed, and a node loses at most the newest tabs' increments, not earlier ones)."""

    def __init__(self, path: Path, node: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.node = node
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)
        self._lock = threading.Lock()

    def get(self, client: str) -> StoredTab | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM tabs WHERE client = ?", (client.lower(),)).fetchone()
        return self._parse(row) if row else None

    def all(self) -> list[StoredTab]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM tabs ORDER BY client").fetchall()
        return [self._parse(row) for row in rows]

    def record(self, tab: Tab, signature: bytes, cost: int) -> StoredTab:
        """Add `cost` to what `tab.client` was served and keep `tab` if it is the newest; committed on return."""
        client = tab.client.lower()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT * FROM tabs WHERE client = ?", (client,)).fetchone()
                old = self._parse(row) if row else None
                newest, newest_signature = (tab, signature) if old is None or tab.seq > old.tab.seq else (old.tab, old.signature)
                stored = StoredTab(
                    self.node,
                    newest,
                    newest_signature,
                    (old.served if old else 0) + cost,
                    old.paid if old else (),
                    old.paid_seq if old else -1,
                )
                self._db.execute(
                    "INSERT OR REPLACE INTO tabs VALUES (?, ?, ?, ?, ?, ?)",
                    (
                        client,
                        newest.seq,
                        pack_tab(newest, newest_signature),
                        str(stored.served),
                        pack_entries(stored.paid),
                        stored.paid_seq,
                    ),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return stored

    def mark_paid(self, client: str, paid: tuple[Entry, ...], seq: int) -> None:
        """Record the client's paid vector of settlement `seq` (from TabSettled), if newer than the stored one."""
        with self._lock:
            self._db.execute(
                "UPDATE tabs SET paid = ?, paid_seq = ? WHERE client = ? AND paid_seq <= ?",
                (pack_entries(paid), seq, client.lower(), seq),
            )

    def record_claim(self, claim: LoweringClaim) -> None:
        """Record a claim; a second claim of the same pair of tabs adds its amount and keeps its transaction."""
        key = (claim.client.lower(), claim.promised_seq, claim.lowered_seq)
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute(
                    "SELECT amount FROM claims WHERE client = ? AND promised_seq = ? AND lowered_seq = ?", key
                ).fetchone()
                amount = claim.amount + (int(row[0]) if row else 0)
                self._db.execute("INSERT OR REPLACE INTO claims VALUES (?, ?, ?, ?, ?)", (*key, str(amount), claim.tx))
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def claims(self) -> list[LoweringClaim]:
        """Every claim this node made against a client that lowered its entry, oldest client first."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM claims ORDER BY client, promised_seq, lowered_seq").fetchall()
        return [LoweringClaim(client, promised, lowered, int(amount), tx) for client, promised, lowered, amount, tx in rows]

    def claimed(self, client: str, promised_seq: int, lowered_seq: int) -> bool:
        """Whether this node already claimed tab `promised_seq` of `client` against its tab `lowered_seq`."""
        with self._lock:
            row = self._db.execute(
                "SELECT 1 FROM claims WHERE client = ? AND promised_seq = ? AND lowered_seq = ?",
                (client.lower(), promised_seq, lowered_seq),
            ).fetchone()
        return row is not None

    def scanned_block(self) -> int:
        """The last block whose TabSettled events are in the store (-1: none)."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = 'scanned_block'").fetchone()
        return int(row[0]) if row else -1

    def set_scanned_block(self, block: int) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES ('scanned_block', ?)", (str(block),))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _parse(self, row: tuple) -> StoredTab:
        _, _, signed, served, paid, paid_seq = row
        tab, signature, _ = unpack_tab(bytes(signed))
        return StoredTab(self.node, tab, signature, int(served), unpack_entries(bytes(paid)), int(paid_seq))
