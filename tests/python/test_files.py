"""Key files: mode 0600 in a 0700 folder, never replaced, never left half-written."""

from __future__ import annotations

import stat

import pytest

from shardmarket.chain.keys import KeystoreError, load_or_create_x25519_key, save_account
from shardmarket.files import write_private
from shardmarket.server.identity import load_or_create_identity


def test_a_private_file_is_readable_by_its_owner_only_and_never_replaced(tmp_path):
    path = tmp_path / "keys" / "secret"
    write_private(path, b"first")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600 and stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    with pytest.raises(FileExistsError):
        write_private(path, b"second")
    assert path.read_bytes() == b"first"
    assert sorted(p.name for p in path.parent.iterdir()) == ["secret"]  # no temporary file left behind


def test_every_key_writer_makes_owner_only_files(tmp_path):
    identity = load_or_create_identity(tmp_path / "free")
    load_or_create_x25519_key(tmp_path / "x" / "x25519.key")
    save_account(bytes(range(1, 33)), "pw", tmp_path / "keys", scrypt_n=2)
    files = [
        tmp_path / "free" / "operator.key",
        tmp_path / "free" / "x25519.key",
        tmp_path / "x" / "x25519.key",
        tmp_path / "keys" / "account.json",
        tmp_path / "keys" / "x25519.key",
    ]
    assert all(stat.S_IMODE(f.stat().st_mode) == 0o600 for f in files)
    assert load_or_create_identity(tmp_path / "free").operator == identity.operator  # read back, not recreated
    with pytest.raises(KeystoreError, match="exists already"):
        save_account(bytes(range(2, 34)), "pw", tmp_path / "keys", scrypt_n=2)
