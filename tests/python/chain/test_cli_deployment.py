"""Chain commands against a chain that lacks the deployment's contracts (a dev chain restarted empty): one clear line
saying what is wrong and what to do, and a non-zero exit, never a web3 traceback."""

from __future__ import annotations

import pytest
from web3 import Web3

from shardmarket.chain.contracts import CONTRACTS
from shardmarket.chain.deployments import write_deployments
from shardmarket.chain.devchain import free_port, start_anvil
from shardmarket.cli import main

# where anvil's first account deploys: the addresses a dev chain had before it restarted empty
ADDRESSES = {name: Web3.to_checksum_address(f"0x5fbdb2315678afecb367f032d93f642f6418{i:04x}") for i, name in enumerate(CONTRACTS)}
COMMANDS = [
    ["node", "earnings"],
    ["node", "redeem"],
    ["node", "status"],
    ["node", "pause"],
    ["node", "update", "--price", "3"],
    ["node", "register", "--model", "m", "--layers", "0:1", "--price", "1", "--stake", "1"],
    ["client", "balance"],
    ["client", "withdraw", "1"],
    ["model", "publish", "--manifest", "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o"],
]


@pytest.fixture
def empty_chain(tmp_path, monkeypatch):
    """An anvil without contracts, a deployments file naming addresses on it, and a funded account in the home."""
    port = free_port()
    anvil = start_anvil(port, tmp_path / "anvil.log")
    rpc = f"http://127.0.0.1:{port}"
    write_deployments(31337, ADDRESSES, 0, tmp_path / "deployments")
    for name, value in {
        "HOME": tmp_path / "home",
        "CHAIN_RPC_URL": rpc,
        "CHAIN_DEPLOYMENTS_DIR": tmp_path / "deployments",
        "CHAIN_KEYSTORE_SCRYPT_N": 1024,
        "PASSWORD": "pw",
    }.items():
        monkeypatch.setenv(f"SHARDMARKET_{name}", str(value))
    monkeypatch.delenv("SHARDMARKET_CONFIG", raising=False)
    assert main(["keys", "new"]) == 0
    from shardmarket.chain.keys import keystore_address
    from shardmarket.cli.keys import home_keys

    w3 = Web3(Web3.HTTPProvider(rpc))
    w3.provider.make_request("anvil_setBalance", [keystore_address(home_keys()), hex(10**19)])
    try:
        yield w3
    finally:
        anvil.terminate()
        anvil.wait(10)


def _one_line_error(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), err
    return err


@pytest.mark.parametrize("argv", COMMANDS, ids=" ".join)
def test_no_contracts_at_the_deployment_addresses(empty_chain, argv, capsys):
    capsys.readouterr()
    assert main(argv) == 1
    err = _one_line_error(capsys)
    assert "no contract" in err and "deployments" in err and "deploy" in err


def test_other_code_at_the_deployment_addresses(empty_chain, capsys):
    """The addresses hold code, but not shardmarket's contracts (the file is from another deployment)."""
    for address in ADDRESSES.values():
        empty_chain.provider.make_request("anvil_setCode", [address, "0x00"])  # STOP: every call returns nothing
    capsys.readouterr()
    for argv in (["node", "earnings"], ["node", "status"], ["client", "balance"]):
        assert main(argv) == 1
        err = _one_line_error(capsys)
        assert "do not answer as shardmarket's contracts" in err and "deploy" in err


def test_node_run_on_a_chain_without_the_contracts(empty_chain, capsys):
    capsys.readouterr()
    assert main(["node", "run"]) == 1
    err = _one_line_error(capsys)
    assert "do not answer as shardmarket's contracts" in err and "deploy" in err
