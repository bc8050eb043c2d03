"""A node's keys: the operator account (signs commitments) and the X25519 session key, from the account's keystore
(a paid node) or from `<data_dir>` (a free node, created on first start)."""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

import coincurve
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from eth_account import Account

from shardmarket.chain.eip712 import signing_key
from shardmarket.chain.keys import load_account, load_or_create_x25519_key, x25519_key
from shardmarket.files import write_private


@dataclass(frozen=True)
class NodeIdentity:
    """The operator's private key and address, and the X25519 key clients encrypt to."""

    operator_key: bytes
    operator: str
    x25519: X25519PrivateKey

    @cached_property
    def signer(self) -> coincurve.PrivateKey:
        """The operator key ready to sign every step's commitment."""
        return signing_key(self.operator_key)

    @property
    def x25519_public(self) -> bytes:
        return self.x25519.public_key().public_bytes_raw()


def load_identity(password: str, directory: Path) -> NodeIdentity:
    """The node's identity from the keystore in `directory` (the operator account and the X25519 key beside it)."""
    account = load_account(password, directory)
    return NodeIdentity(bytes(account.key), account.address, x25519_key(directory))


def load_or_create_identity(data_dir: Path) -> NodeIdentity:
    """Read the node's keys from `data_dir`, creating them (mode 0600) on first start."""
    path = data_dir / "operator.key"
    if path.exists():
        try:
            key = bytes.fromhex(path.read_text().strip().removeprefix("0x"))
            account = Account.from_key(key)
        except ValueError:
            raise ValueError(f"{path} is not a hex secp256k1 private key; move it away to create a new one") from None
    else:
        account = Account.create()
        write_private(path, account.key.hex().encode())
    return NodeIdentity(bytes(account.key), account.address, load_or_create_x25519_key(data_dir / "x25519.key"))
