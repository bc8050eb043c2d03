"""`shardmarket keys`: an encrypted keystore and an X25519 key; passwords never come from a flag."""

from __future__ import annotations

import json

import pytest

from shardmarket.cli import main
from shardmarket.cli.keys import home_keys


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("SHARDMARKET_HOME", str(tmp_path))
    monkeypatch.setenv("SHARDMARKET_CHAIN_KEYSTORE_SCRYPT_N", "1024")
    return tmp_path


def test_new_show_and_refusals(home, monkeypatch, capsys):
    monkeypatch.setenv("SHARDMARKET_PASSWORD", "correct horse")
    assert main(["keys", "new"]) == 0
    keystore = json.loads((home / "keys" / "account.json").read_text())
    assert "crypto" in keystore and "correct horse" not in (home / "keys" / "account.json").read_text()
    assert (home / "keys" / "x25519.key").stat().st_mode & 0o077 == 0
    created = capsys.readouterr().out
    assert main(["keys", "show"]) == 0
    assert f"address 0x{keystore['address']}".lower() in capsys.readouterr().out.lower()
    assert main(["keys", "new"]) == 1  # never overwrites an account
    assert "exists already" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["keys", "new", "--passphrase", "x"])  # there is no flag taking the password itself
    from shardmarket.chain.keys import KeystoreError, load_account

    with pytest.raises(KeystoreError, match="does not open"):
        load_account("wrong", home_keys())
    assert load_account("correct horse", home_keys()).address.lower() in created.lower()


def test_import_from_a_key_file_and_a_password_file(home, tmp_path, capsys):
    key_file, password_file = tmp_path / "key.hex", tmp_path / "password"
    key_file.write_text("0x" + "11" * 32 + "\n")
    password_file.write_text("s3cret\n")
    assert main(["keys", "import", "--key-file", str(key_file), "--password-file", str(password_file)]) == 0
    assert "0x19E7E376E7C213B7E7e7e46cc70A5dD086DAff2A".lower() in capsys.readouterr().out.lower()
    key_file.write_text("not a key")
    assert main(["keys", "import", "--key-file", str(key_file), "--password-file", str(password_file)]) == 1
    assert "32 bytes of hex" in capsys.readouterr().err
