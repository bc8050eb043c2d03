"""The node's receipts: the newest receipt of every client in SQLite (WAL, synchronous=FULL), so a receipt
acknowledged to a client survives a kill -9; plus what was served and what was redeemed."""

from __future__ import annotations

import sqlite3
import threading
from dataclasses import dataclass
from pathlib import Path

from eth_utils import to_checksum_address

from node.chain.eip712 import Receipt

SCHEMA = """
CREATE TABLE IF NOT EXISTS receipts (
    client TEXT PRIMARY KEY,
    cumulative TEXT NOT NULL,
    usage_hash BLOB NOT NULL,
    nonce TEXT NOT NULL,
    signature BLOB NOT NULL,
    served TEXT NOT NULL,
    redeemed TEXT NOT NULL
)
"""


@dataclass(frozen=True)
class StoredReceipt:
    """A client's newest receipt, what the node served it and what the escrow has paid so far."""

    receipt: Receipt
    signature: bytes
    served: int
    redeemed: int

    @property
    def unredeemed(self) -> int:
        return self.receipt.cumulative_amount - self.redeemed


class ReceiptStore:
    """Thread-safe SQLite store; every write is committed (and fsynced) before it returns."""

    def __init__(self, path: Path, node: str) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self.node = node
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=FULL")
        self._db.execute(SCHEMA)
        self._lock = threading.Lock()

    def get(self, client: str) -> StoredReceipt | None:
        with self._lock:
            row = self._db.execute("SELECT * FROM receipts WHERE client = ?", (client.lower(),)).fetchone()
        return self._parse(row) if row else None

    def all(self) -> list[StoredReceipt]:
        with self._lock:
            rows = self._db.execute("SELECT * FROM receipts ORDER BY client").fetchall()
        return [self._parse(row) for row in rows]

    def record(self, receipt: Receipt, signature: bytes, cost: int) -> StoredReceipt:
        """Add `cost` to what `receipt.client` was served and keep `receipt` if it is the newest; durable on return."""
        client = receipt.client.lower()
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                row = self._db.execute("SELECT * FROM receipts WHERE client = ?", (client,)).fetchone()
                old = self._parse(row) if row else None
                served = (old.served if old else 0) + cost
                redeemed = old.redeemed if old else 0
                if old is None or receipt.cumulative_amount > old.receipt.cumulative_amount:
                    newest, newest_signature = receipt, signature
                else:
                    newest, newest_signature = old.receipt, old.signature
                self._db.execute(
                    "INSERT OR REPLACE INTO receipts VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (client, str(newest.cumulative_amount), newest.usage_hash, str(newest.nonce), newest_signature, str(served), str(redeemed)),
                )
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise
        return StoredReceipt(newest, newest_signature, served, redeemed)

    def mark_redeemed(self, client: str, paid: int) -> None:
        """Record that the escrow has paid `paid` in total on `client`'s channel (as channelOf reports it)."""
        with self._lock:
            self._db.execute("UPDATE receipts SET redeemed = ? WHERE client = ?", (str(paid), client.lower()))

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def _parse(self, row: tuple) -> StoredReceipt:
        client, cumulative, usage_hash, nonce, signature, served, redeemed = row
        receipt = Receipt(to_checksum_address(client), self.node, int(cumulative), bytes(usage_hash), int(nonce))
        return StoredReceipt(receipt, bytes(signature), int(served), int(redeemed))
