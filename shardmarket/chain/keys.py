"""Account keys under `<home>/keys`: an eth-account encrypted keystore (the operator or client account) and,
beside it, the X25519 key clients encrypt sessions to. Passwords come from a prompt, a file or
SHARDMARKET_PASSWORD, never from a command-line flag."""

from __future__ import annotations

import getpass
import json
import os
from pathlib import Path

from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from eth_account import Account

from shardmarket.files import write_private

KEYSTORE_FILE = "account.json"
X25519_FILE = "x25519.key"
PASSWORD_ENV = "SHARDMARKET_PASSWORD"
X25519_KEY_BYTES = 32
DEFAULT_SCRYPT_N = 262144  # eth-account's default cost of a new keystore


class KeystoreError(ValueError):
    """A keystore that is missing, exists already, or does not open with the password given."""


def keys_dir(home: Path) -> Path:
    """Where the account of the SHARDMARKET_HOME `home` lives."""
    return home / "keys"


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


def save_account(private_key: bytes, password: str, directory: Path, *, scrypt_n: int = DEFAULT_SCRYPT_N) -> str:
    """Encrypt `private_key` into the keystore (refusing to overwrite one) and create the X25519 key; returns the address."""
    path = directory / KEYSTORE_FILE
    exists = f"{path} exists already; move it away first to replace the account"
    if path.exists():
        raise KeystoreError(exists)
    keystore = Account.encrypt(private_key, password, kdf="scrypt", iterations=scrypt_n)
    try:
        write_private(path, json.dumps(keystore).encode())
    except FileExistsError:
        raise KeystoreError(exists) from None
    load_or_create_x25519_key(directory / X25519_FILE)
    return Account.from_key(private_key).address


def keystore_address(directory: Path) -> str:
    """The account's address, read from the keystore without the password."""
    path = directory / KEYSTORE_FILE
    try:
        return "0x" + json.loads(path.read_text())["address"].removeprefix("0x")
    except FileNotFoundError:
        raise KeystoreError(f"no account at {path}: create one with `shardmarket keys new` or `keys import`") from None


def load_account(password: str, directory: Path):
    """The decrypted account (eth-account LocalAccount)."""
    path = directory / KEYSTORE_FILE
    try:
        keystore = json.loads(path.read_text())
    except FileNotFoundError:
        raise KeystoreError(f"no account at {path}: create one with `shardmarket keys new` or `keys import`") from None
    try:
        return Account.from_key(Account.decrypt(keystore, password))
    except ValueError:
        raise KeystoreError(f"the password does not open {path}") from None


def x25519_key(directory: Path) -> X25519PrivateKey:
    """The X25519 key beside the keystore, created on first use."""
    return load_or_create_x25519_key(directory / X25519_FILE)


def x25519_public(directory: Path) -> bytes:
    """The 32 raw bytes of that key's public half (as NodeRegistry stores it)."""
    return x25519_key(directory).public_key().public_bytes_raw()


def load_or_create_x25519_key(path: Path) -> X25519PrivateKey:
    """A long-term X25519 key, created (mode 0600) on first use."""
    if path.exists():
        raw = path.read_bytes()
        if len(raw) != X25519_KEY_BYTES:
            raise ValueError(f"{path} is not a 32-byte X25519 private key; move it away to create a new one")
        return X25519PrivateKey.from_private_bytes(raw)
    key = X25519PrivateKey.generate()
    write_private(
        path, key.private_bytes(serialization.Encoding.Raw, serialization.PrivateFormat.Raw, serialization.NoEncryption())
    )
    return key
