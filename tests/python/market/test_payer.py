"""The client's receipts: the same signature as the one EIP-712 module, running totals that survive a restart."""

from __future__ import annotations

from dataclasses import dataclass

from eth_account import Account

from node.chain.eip712 import Domain, Receipt, recover_receipt_signer, sign_receipt
from node.client.payer import Payer
from node.server.payments import decode_receipt

DOMAIN = Domain(31337, "0x" + "22" * 20)


@dataclass
class _Node:
    operator: str
    price: int


def test_receipts_accumulate_sign_like_eip712_and_survive_a_restart(tmp_path):
    account = Account.create()
    node = _Node(Account.create().address, 7)
    payer = Payer(account, DOMAIN, tmp_path / "ledger.sqlite")
    payer.receipt(node, bytes(32), 0, 10)
    receipt, signature = decode_receipt(payer.receipt(node, bytes(32), 1, 1), node.operator)
    assert receipt == Receipt(account.address, node.operator, 77, receipt.usage_hash, 2)
    assert signature == sign_receipt(account.key, receipt, DOMAIN)
    assert recover_receipt_signer(receipt, signature, DOMAIN) == account.address
    payer.close()
    again = Payer(account, DOMAIN, tmp_path / "ledger.sqlite")
    assert decode_receipt(again.receipt(node, bytes(32), 2, 1), node.operator)[0].cumulative_amount == 84  # never signs less than before
    assert again.receipt(_Node(node.operator, 0), bytes(32), 3, 5) is None  # free nodes need no receipt
