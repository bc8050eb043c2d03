"""`shardmarket keys new|import|show`: the account (encrypted keystore) and X25519 key under <home>/keys."""

from __future__ import annotations

import argparse
import getpass
import sys
from pathlib import Path

from eth_account import Account

from shardmarket.chain.keys import KeystoreError, keys_dir, keystore_address, read_password, save_account, x25519_public
from shardmarket.config import load_config


def home_keys() -> Path:
    """The keys folder of this SHARDMARKET_HOME."""
    return keys_dir(load_config().home)


def add_password_file(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--password-file", type=Path, help="file holding the keystore password (else SHARDMARKET_PASSWORD, else a prompt)"
    )


def register(commands) -> None:
    group = commands.add_parser("keys", help="the account that signs transactions, receipts and commitments")
    sub = group.add_subparsers(dest="keys_command", required=True, metavar="COMMAND")
    new = sub.add_parser("new", help="create a new account in an encrypted keystore (and an X25519 key)")
    add_password_file(new)
    new.set_defaults(run=cmd_new)
    imp = sub.add_parser("import", help="encrypt an existing private key into the keystore")
    imp.add_argument("--key-file", type=Path, help="file holding the hex private key (else a prompt)")
    add_password_file(imp)
    imp.set_defaults(run=cmd_import)
    show = sub.add_parser("show", help="print the address and the X25519 public key")
    show.set_defaults(run=cmd_show)


def _fail(problem: Exception | str) -> int:
    print(f"error: {problem}", file=sys.stderr)
    return 1


def cmd_new(args: argparse.Namespace) -> int:
    try:
        address = save_account(
            bytes(Account.create().key),
            read_password(args.password_file, confirm=True),
            home_keys(),
            scrypt_n=load_config().chain.keystore_scrypt_n,
        )
    except KeystoreError as exc:
        return _fail(exc)
    print(f"created account {address} in {home_keys()}")
    print(f"x25519 public key {x25519_public(home_keys()).hex()}")
    return 0


def cmd_import(args: argparse.Namespace) -> int:
    try:
        raw = args.key_file.read_text() if args.key_file else getpass.getpass("private key (hex): ")
        key = bytes.fromhex(raw.strip().removeprefix("0x"))
        if len(key) != 32:
            raise ValueError
    except OSError as exc:
        return _fail(f"cannot read {args.key_file}: {exc.strerror}")
    except ValueError:
        return _fail("a private key is 32 bytes of hex (64 hex digits, 0x optional); nothing was written")
    try:
        address = save_account(
            key, read_password(args.password_file, confirm=True), home_keys(), scrypt_n=load_config().chain.keystore_scrypt_n
        )
    except KeystoreError as exc:
        return _fail(exc)
    print(f"imported account {address} into {home_keys()}")
    return 0


def cmd_show(args: argparse.Namespace) -> int:
    try:
        address = keystore_address(home_keys())
    except KeystoreError as exc:
        return _fail(exc)
    print(f"address {address}")
    print(f"x25519 public key {x25519_public(home_keys()).hex()}")
    return 0
