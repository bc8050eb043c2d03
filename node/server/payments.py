"""The node's payment check on every step: the client's cumulative EIP-712 receipt must be signed by the
client, for this node, and cover what the node has served it, up to a per-client credit limit."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from eth_utils import to_checksum_address

from node.chain.eip712 import Domain, InvalidSignature, Receipt, recover_receipt_signer
from node.server.receipts import ReceiptStore, StoredReceipt


class PaymentRefused(Exception):
    """A step the node will not run for payment reasons; `code` goes back in the error frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class Charge:
    """A verified receipt and the cost of the step it pays for, to be stored before the answer goes out."""

    receipt: Receipt
    signature: bytes
    cost: int


@dataclass
class _Account:
    newest: int
    served: int
    redeemed: int


RECEIPT_BYTES = 20 + 32 + 32 + 32 + 65


def encode_receipt(receipt: Receipt, signature: bytes) -> bytes:
    """A receipt as it rides in a step frame: client || cumulativeAmount || usageHash || nonce || signature
    (181 bytes; the node field is implied: the receiving node)."""
    return (bytes.fromhex(receipt.client[2:]) + receipt.cumulative_amount.to_bytes(32, "big") + receipt.usage_hash
            + receipt.nonce.to_bytes(32, "big") + signature)


def decode_receipt(data: bytes, node: str) -> tuple[Receipt, bytes]:
    """The receipt and signature of `encode_receipt`'s bytes, addressed to `node`; raises ValueError if malformed."""
    if not isinstance(data, bytes) or len(data) != RECEIPT_BYTES:
        raise ValueError(f"a receipt is {RECEIPT_BYTES} bytes")
    receipt = Receipt(to_checksum_address(data[:20]), node, int.from_bytes(data[20:52], "big"), data[52:84], int.from_bytes(data[84:116], "big"))
    return receipt, data[116:]


class PaymentGate:
    """Checks receipts and credit per client; `spendable(client)` reads the client's escrow balance from the chain."""

    def __init__(self, store: ReceiptStore, node: str, price: int, domain: Domain, credit_limit: int,
                 spendable: Callable[[str], Awaitable[int]]) -> None:
        self.store, self.node, self.price, self.domain = store, node, price, domain
        self.credit_limit = credit_limit
        self.spendable = spendable
        self.balances: dict[str, int] = {}  # client -> spendable escrow balance, refreshed by the settler
        self._accounts = {s.receipt.client.lower(): _Account(s.receipt.cumulative_amount, s.served, s.redeemed) for s in store.all()}
        self._session_clients: dict[bytes, str] = {}

    def _parse(self, raw: object) -> tuple[Receipt, bytes]:
        if raw is None:
            raise PaymentRefused("payment_required", f"this node charges {self.price} token units per token: send a receipt with every step")
        try:
            receipt, signature = decode_receipt(raw, self.node)
            signer = recover_receipt_signer(receipt, signature, self.domain)
        except (TypeError, ValueError, InvalidSignature) as exc:
            raise PaymentRefused("bad_receipt", f"the receipt is malformed or its signature is invalid ({exc}); sign it again") from None
        if signer.lower() != receipt.client.lower():
            raise PaymentRefused("bad_receipt", f"the receipt names client {receipt.client} but was signed by {signer}")
        return receipt, signature

    async def authorize(self, request_id: bytes, tokens: int, fields: dict) -> Charge | None:
        """Check the step's receipt and reserve its cost; raises PaymentRefused when the client must pay first."""
        if self.price == 0 and "receipt" not in fields:
            return None
        receipt, signature = await asyncio.to_thread(self._parse, fields.get("receipt"))  # off the loop: overlaps the compute
        client = receipt.client.lower()
        bound = self._session_clients.setdefault(request_id, client)
        if bound != client:
            raise PaymentRefused("bad_receipt", "this session is paid by another client; one session, one payer")
        if client not in self.balances:
            self.balances[client] = await self.spendable(receipt.client)
        account = self._accounts.setdefault(client, _Account(0, 0, 0))
        cost = self.price * tokens
        newest = max(account.newest, receipt.cumulative_amount)
        if account.served + cost - newest > self.credit_limit:
            raise PaymentRefused(
                "payment_required",
                f"receipts cover {newest} but this step brings the total served to {account.served + cost} "
                f"(credit limit {self.credit_limit}); send a receipt covering the step",
            )
        if newest - account.redeemed > self.balances[client] + self.credit_limit:
            raise PaymentRefused(
                "insufficient_funds",
                f"client {receipt.client} has {self.balances[client]} spendable in the escrow, less than its unredeemed receipts "
                f"({newest - account.redeemed}); deposit more with `shardmarket client deposit`",
            )
        account.served += cost
        account.newest = newest
        return Charge(receipt, signature, cost)

    async def record(self, charge: Charge) -> StoredReceipt:
        """Store the receipt durably (the step's answer is sent only after this returns)."""
        return await asyncio.to_thread(self.store.record, charge.receipt, charge.signature, charge.cost)

    def release(self, request_id: bytes) -> None:
        self._session_clients.pop(request_id, None)

    def redeemed(self, client: str, paid: int) -> None:
        """The escrow has paid `paid` in total on `client`'s channel."""
        self._accounts.setdefault(client.lower(), _Account(0, 0, 0)).redeemed = paid
