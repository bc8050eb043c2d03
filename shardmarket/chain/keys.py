"""Account keys under `<home>/keys`: an eth-account encrypted keystore (the operator or client account) and,
beside it, the X25519 key clients encrypt sessions to. Passwords come from a prompt, a file or
SHARDMARKET_PASSWORD, never from a command-line flag."""

from __future__ import annotations

import getpass
import json
import os
from pathlib import Path

from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from eth_account import Account

from shardmarket.config import load_config
from shardmarket.files import write_private
from shardmarket.net.crypto import load_or_create_static_key, public_bytes
from shardmarket.server.identity import NodeIdentity

KEYSTORE_FILE = "account.json"
X25519_FILE = "x25519.key"
PASSWORD_ENV = "SHARDMARKET_PASSWORD"


class KeystoreError(ValueError):
    """A keystore that is missing, exists already, or does not open with the password given."""


def keys_dir(home: Path | None = None) -> Path:
    return (home or load_config().home) / "keys"


def read_password(password_file: Path | None = None, *, confirm: bool = False) -> str:
    """The keystore password: from `password_file`, else SHARDMARKET_PASSWORD, else a prompt."""
    if password_file is not None:
        try:
            return password_file.read_text().rstrip("\r\n")
        except OSError as exc:
            raise KeystoreError(f"cannot read the password file {password_file}: {exc.strerror}") from None
    if os.environ.get(PASSWORD_ENV):
        return os.environ[PASSWORD_ENV]
    password = getpass.getpass("keystore password: ")
    if confirm and getpass.getpass("repeat the password: ") != password:
        raise KeystoreError("the two passwords differ; nothing was written")
    if not password:
        raise KeystoreError("an empty password is not allowed")
    return password


def save_account(private_key: bytes, password: str, directory: Path | None = None, *, scrypt_n: int | None = None) -> str:
    """Encrypt `private_key` into the keystore (refusing to overwrite one) and create the X25519 key; returns the address."""
    directory = directory or keys_dir()
    path = directory / KEYSTORE_FILE
    exists = f"{path} exists already; move it away first to replace the account"
    if path.exists():
        raise KeystoreError(exists)
    n = scrypt_n or load_config().chain.keystore_scrypt_n
    keystore = Account.encrypt(private_key, password, kdf="scrypt", iterations=n)
    try:
        write_private(path, json.dumps(keystore).encode())
    except FileExistsError:
        raise KeystoreError(exists) from None
    load_or_create_static_key(directory / X25519_FILE)
    return Account.from_key(private_key).address


def keystore_address(directory: Path | None = None) -> str:
    """The account's address, read from the keystore without the password."""
    path = (directory or keys_dir()) / KEYSTORE_FILE
    try:
        return "0x" + json.loads(path.read_text())["address"].removeprefix("0x")
    except FileNotFoundError:
        raise KeystoreError(f"no account at {path}: create one with `shardmarket keys new` or `keys import`") from None


def load_account(password: str, directory: Path | None = None):
    """The decrypted account (eth-account LocalAccount)."""
    path = (directory or keys_dir()) / KEYSTORE_FILE
    try:
        keystore = json.loads(path.read_text())
    except FileNotFoundError:
        raise KeystoreError(f"no account at {path}: create one with `shardmarket keys new` or `keys import`") from None
    try:
        return Account.from_key(Account.decrypt(keystore, password))
    except ValueError:
        raise KeystoreError(f"the password does not open {path}") from None


def x25519_key(directory: Path | None = None) -> X25519PrivateKey:
    return load_or_create_static_key((directory or keys_dir()) / X25519_FILE)


def x25519_public(directory: Path | None = None) -> bytes:
    return public_bytes(x25519_key(directory))


def load_identity(password: str, directory: Path | None = None) -> NodeIdentity:
    """The node's identity (operator account + X25519 key) from the keystore."""
    account = load_account(password, directory)
    return NodeIdentity(bytes(account.key), account.address, x25519_key(directory))
