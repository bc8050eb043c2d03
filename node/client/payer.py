"""The client's side of payment: one cumulative EIP-712 receipt per node, signed for every step it runs,
whose usageHash chains the usage records of every step the node has answered (auditable later)."""

from __future__ import annotations

import sqlite3
import threading
from collections import defaultdict
from pathlib import Path

from eth_keys import keys

from node.chain.eip712 import Domain, Receipt, UsageRecord, chain_usage_hash, sign_receipt
from node.net.commitment import SignedCommitment
from node.server.payments import encode_receipt

ZERO32 = bytes(32)
SCHEMA = "CREATE TABLE IF NOT EXISTS channels (node TEXT PRIMARY KEY, cumulative TEXT NOT NULL, nonce INTEGER NOT NULL, usage_hash BLOB NOT NULL)"


class Payer:
    """Signs receipts for `account` under the escrow's `domain`; the per-node totals live in SQLite, so a
    restarted client never signs less than it already promised."""

    def __init__(self, account, domain: Domain, ledger: Path) -> None:
        self.account, self.domain = account, domain
        self._key = keys.PrivateKey(bytes(account.key))
        ledger.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(ledger, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        # NORMAL: no fsync per receipt (three per token); an OS crash may lose the newest totals, which only makes
        # the next receipts too small for the nodes to accept, never a double payment
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.execute(SCHEMA)
        self._lock = threading.Lock()
        self._channels = {node: [int(c), n, bytes(u)] for node, c, n, u in self._db.execute("SELECT * FROM channels")}
        self.request_costs: dict[bytes, int] = defaultdict(int)

    @property
    def address(self) -> str:
        return self.account.address

    def receipt(self, node, request_id: bytes, step: int, tokens: int) -> bytes | None:
        """The signed receipt for one step of `node` (a NodeInfo): its running total grows by price x tokens."""
        cost = node.price * tokens
        if cost == 0:
            return None
        key = node.operator.lower()
        with self._lock:
            cumulative, nonce, usage = self._channels.get(key, [0, 0, ZERO32])
            cumulative, nonce = cumulative + cost, nonce + 1
            self._channels[key] = [cumulative, nonce, usage]
            self._db.execute("INSERT OR REPLACE INTO channels VALUES (?, ?, ?, ?)", (key, str(cumulative), nonce, usage))
            self.request_costs[request_id] += cost
        receipt = Receipt(self.account.address, node.operator, cumulative, usage, nonce)
        return encode_receipt(receipt, sign_receipt(self._key, receipt, self.domain))

    def answered(self, node, signed: SignedCommitment, tokens: int) -> None:
        """Chain the usage record of a step `node` answered into that node's usage hash."""
        c = signed.commitment
        record = UsageRecord(c.request_id, c.step, tokens, c.input_hash, c.output_hash)
        key = node.operator.lower()
        with self._lock:
            channel = self._channels.setdefault(key, [0, 0, ZERO32])
            channel[2] = chain_usage_hash(channel[2], record)

    def promised(self, node_operator: str) -> int:
        """Total promised to a node so far."""
        return self._channels.get(node_operator.lower(), [0])[0]

    def close(self) -> None:
        self._db.close()
