"""The node's tabs: every client's newest signed tab in SQLite, so a tab acknowledged to a client (the node's signed
commitment to the step it paid for goes out only after the tab is stored) survives a kill -9;
plus what the node served the client, the client's paid vector as last seen on chain (TabSettled, Claimed) and as of
the last final block, and the claims this node sent."""

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
    paid_seq INTEGER NOT NULL,
    final BLOB NOT NULL DEFAULT x''
);
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS claim_log (
    tx TEXT PRIMARY KEY,
    client TEXT NOT NULL,
    tab_seq INTEGER NOT NULL,
    amount TEXT NOT NULL,
    from_reserve TEXT NOT NULL,
    lowered INTEGER NOT NULL
);
"""
# A store written before paid vectors had a final copy gets the column (its paid vectors count as final until the
# next sync says otherwise).
MIGRATIONS = {"final": "ALTER TABLE tabs ADD COLUMN final BLOB NOT NULL DEFAULT x''; UPDATE tabs SET final = paid"}


def tab_store_path(data_dir: Path) -> Path:
    """Where a node with data folder `data_dir` keeps its tabs."""
    return data_dir / "tabs.sqlite"


@dataclass(frozen=True)
class Claim:
    """A claim this node sent (PaymentEscrow.claim): the client's tab it claimed, what it collected, the part of that
    taken out of the client's reserve for this node, its transaction, and whether the client had settled a newer tab
    promising this node less (a client this node no longer serves)."""

    client: str
    tab_seq: int
    amount: int
    from_reserve: int
    tx: str
    lowered: bool


@dataclass(frozen=True)
class StoredTab:
    """A client's newest tab, what this node served it, and its paid vector as of settlement `paid_seq` (-1: none seen)."""

    node: str
    tab: Tab
    signature: bytes
    served: int
    paid: tuple[Entry, ...]
    paid_seq: int
    final: tuple[Entry, ...] = ()  # the paid vector as of the last block with enough confirmations

    @property
    def client(self) -> str:
        return self.tab.client

    @property
    def entry(self) -> int:
        """What the tab promises this node."""
        return self.tab.amount_for(self.node)

    @property
    def redeemed(self) -> int:
        """What the escrow has paid this node on this client's tabs (as far as the newest block says)."""
        return _amount_for(self.paid, self.node)

    @property
    def redeemed_final(self) -> int:
        """What the escrow has paid this node on this client's tabs in blocks with enough confirmations to count."""
        return _amount_for(self.final, self.node)

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
        """The packed tab alone (how it travels and how claim takes it)."""
        return pack_tab(self.tab, self.signature)


def _amount_for(paid: tuple[Entry, ...], node: str) -> int:
    node = node.lower()
    return next((e.amount for e in paid if e.node.lower() == node), 0)


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
        columns = {row[1] for row in self._db.execute("PRAGMA table_info(tabs)")}
        for column, migration in MIGRATIONS.items():
            if column not in columns:
                self._db.executescript(migration)
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
                    old.final if old else (),
                )
                self._db.execute(
                    "INSERT OR REPLACE INTO tabs VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        client,
                        newest.seq,
                        pack_tab(newest, newest_signature),
                        str(stored.served),
                        pack_entries(stored.paid),
                        stored.paid_seq,
                        pack_entries(stored.final),
                    ),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return stored

    def mark_paid(self, client: str, paid: tuple[Entry, ...], seq: int) -> None:
        """Record the client's paid vector of settlement `seq` (from TabSettled or Claimed), if not older than the stored
        one."""
        with self._lock:
            self._db.execute(
                "UPDATE tabs SET paid = ?, paid_seq = ? WHERE client = ? AND paid_seq <= ?",
                (pack_entries(paid), seq, client.lower(), seq),
            )

    def mark_final(self, client: str, paid: tuple[Entry, ...]) -> None:
        """Record the client's paid vector as of the newest block with enough confirmations."""
        with self._lock:
            self._db.execute("UPDATE tabs SET final = ? WHERE client = ?", (pack_entries(paid), client.lower()))

    def reset_paid(self, client: str, paid: tuple[Entry, ...], seq: int) -> None:
        """Replace the client's paid vector with what the chain says now (after the chain forgot blocks), older or not."""
        with self._lock:
            self._db.execute(
                "UPDATE tabs SET paid = ?, paid_seq = ?, final = ? WHERE client = ?",
                (pack_entries(paid), seq, pack_entries(paid), client.lower()),
            )

    def record_claim(self, claim: Claim) -> None:
        """Record a claim this node sent."""
        with self._lock:
            self._db.execute(
                "INSERT OR REPLACE INTO claim_log VALUES (?, ?, ?, ?, ?, ?)",
                (claim.tx, claim.client.lower(), claim.tab_seq, str(claim.amount), str(claim.from_reserve), int(claim.lowered)),
            )

    def forget_claim(self, tx: str) -> None:
        """Drop the record of a claim whose transaction the chain no longer has."""
        with self._lock:
            self._db.execute("DELETE FROM claim_log WHERE tx = ?", (tx,))

    def claims(self) -> list[Claim]:
        """Every claim this node sent, in the order it sent them."""
        with self._lock:
            rows = self._db.execute("SELECT * FROM claim_log ORDER BY rowid").fetchall()
        return [
            Claim(client, seq, int(amount), int(reserve), tx, bool(lowered)) for tx, client, seq, amount, reserve, lowered in rows
        ]

    def cursor(self, name: str) -> tuple[int, str]:
        """A block this store has read the chain up to, and its hash ((-1, "") before the first read): `scanned` for
        the paid-vector events, `final` for those with enough confirmations."""
        with self._lock:
            row = self._db.execute("SELECT value FROM meta WHERE key = ?", (f"{name}_block",)).fetchone()
        if row is None:
            return -1, ""
        number, _, block_hash = row[0].partition(" ")
        return int(number), block_hash

    def set_cursor(self, name: str, block: int, block_hash: str) -> None:
        with self._lock:
            self._db.execute("INSERT OR REPLACE INTO meta VALUES (?, ?)", (f"{name}_block", f"{block} {block_hash}"))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _parse(self, row: tuple) -> StoredTab:
        _, _, signed, served, paid, paid_seq, final = row
        tab, signature, _ = unpack_tab(bytes(signed))
        return StoredTab(
            self.node, tab, signature, int(served), unpack_entries(bytes(paid)), int(paid_seq), unpack_entries(bytes(final))
        )
