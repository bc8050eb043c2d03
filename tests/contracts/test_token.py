import json
import os
from pathlib import Path

from brownie import network

from scripts.deploy import INITIAL_SUPPLY


def test_deploy_writes_the_deployments_file(deployment):
    path = Path(os.environ["SHARDMARKET_HOME"]) / "deployments" / f"{network.chain.id}.json"
    data = json.loads(path.read_text())
    assert data["chain_id"] == network.chain.id == 31337
    assert data["contracts"] == deployment


def test_deployer_holds_the_supply(token, accounts):
    assert token.totalSupply() == INITIAL_SUPPLY
    assert token.balanceOf(accounts[0]) == INITIAL_SUPPLY


def test_transfer_moves_balances(token, accounts):
    tx = token.transfer(accounts[1], 1234, {"from": accounts[0]})
    assert token.balanceOf(accounts[1]) == 1234
    assert token.balanceOf(accounts[0]) == INITIAL_SUPPLY - 1234
    assert tx.events["Transfer"]["value"] == 1234


def test_transfer_above_balance_reverts_with_custom_error(token, accounts, reverts_with):
    with reverts_with("ERC20InsufficientBalance"):
        token.transfer(accounts[2], 1, {"from": accounts[1]})


def test_only_owner_mints(token, accounts, reverts_with):
    token.mint(accounts[3], 50, {"from": accounts[0]})
    assert token.balanceOf(accounts[3]) == 50
    with reverts_with("OwnableUnauthorizedAccount"):
        token.mint(accounts[3], 50, {"from": accounts[3]})
    assert token.totalSupply() == INITIAL_SUPPLY + 50
