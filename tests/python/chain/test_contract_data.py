"""Contract data read by name: the Python enums are the compiled contracts' enums (member names and order, from
solc's AST in brownie's build folder); on a real anvil with the contracts deployed, a struct, or several named
return values, comes back as a named tuple, and the commands that show it read the right fields."""

from __future__ import annotations

import json
import re
from enum import IntEnum

import pytest

from shardmarket.chain.contracts import BUILD_DIR, DisputeStatus, Market, Rejection
from shardmarket.chain.keys import load_account
from shardmarket.cli.devmarket import PASSWORD, DevMarket
from shardmarket.cli.keys import home_keys
from shardmarket.config import load_config

STAKE = 100 * 10**18  # scripts/deploy.py's MIN_STAKE
MODEL = "by-name"
ENUMS = {("DisputeManager", "Status"): DisputeStatus, ("PaymentEscrow", "Rejection"): Rejection}
REPO = BUILD_DIR.parents[1]


def contract_ast(name: str) -> dict:
    """The AST node of contract `name` as compiled into the build folder, which must match its source."""
    build = json.loads((BUILD_DIR / f"{name}.json").read_text())
    if build["source"] != (REPO / build["sourcePath"]).read_text():
        pytest.fail(f"build/contracts/{name}.json is older than {build['sourcePath']}: run `brownie compile`")
    return next(n for n in build["ast"]["nodes"] if n["nodeType"] == "ContractDefinition" and n["name"] == name)


@pytest.mark.parametrize(("contract", "enum"), ENUMS, ids=[f"{c}.{e}" for c, e in ENUMS])
def test_python_enums_are_the_solidity_enums(contract: str, enum: str):
    python = ENUMS[contract, enum]
    definition = next(n for n in contract_ast(contract)["nodes"] if n["nodeType"] == "EnumDefinition" and n["name"] == enum)
    solidity = [(re.sub(r"(?<!^)(?=[A-Z])", "_", m["name"]).upper(), value) for value, m in enumerate(definition["members"])]
    assert issubclass(python, IntEnum) and [(m.name, m.value) for m in python] == solidity


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    market = DevMarket(tmp_path_factory.mktemp("chain"))
    try:
        market.start_chain()
        market.new_account("operator", tokens=2 * STAKE)
        yield market
    finally:
        market.stop()


@pytest.fixture(scope="module")
def chain(market) -> Market:
    """The deployed contracts, with the operator's account sending the transactions."""
    with market.acting_as("operator"):
        return Market.connect(load_config().chain, load_account(PASSWORD, home_keys()))


def test_structs_and_named_return_values_are_read_by_name(market, chain, capsys):
    me = chain.address
    chain.transact(chain.models.functions.registerModel(MODEL, "bafyname", 6, b"\x01" * 32), "publishing")
    model = chain.read(chain.models.functions.getModel(chain.model_id(MODEL)))
    assert (model.publisher, model.layerCount, model.configHash, model.name, model.manifestCid) == (
        me, 6, b"\x01" * 32, MODEL, "bafyname")
    market.cli("operator", "node", "register", "--model", MODEL, "--layers", "2:5", "--price", "7", "--stake", str(STAKE))
    stake = chain.read(chain.stake.functions.stakeOf(me))
    assert (stake.bonded, stake.unbonding, stake.unbondReadyAt, stake.locks) == (STAKE, 0, 0, 0)
    market.cli("operator", "node", "update", "--price", "9")
    node = chain.read(chain.registry.functions.getNode(me))
    assert (node.registered, node.paused, node.layerStart, node.layerEnd, node.pricePerToken) == (True, False, 2, 5, 9)
    assert node.modelId == chain.model_id(MODEL) and len(node.encryptionKey) == 32 and len(node.endpoints) == 1
    capsys.readouterr()
    market.cli("operator", "node", "status")
    out = capsys.readouterr().out
    assert f"stake: bonded {STAKE}, unbonding 0 (ready at 0), dispute locks 0" in out
    assert f"serving layers 2:5 of {MODEL} at 9 per token on {node.endpoints[0]}; listed" in out
    chain.transact(chain.token.functions.approve(chain.addresses["PaymentEscrow"], 50), "approving the deposit")
    chain.transact(chain.escrow.functions.deposit(me, 50), "depositing")
    chain.transact(chain.escrow.functions.requestWithdrawal(20), "requesting a withdrawal")
    withdrawal = chain.read(chain.escrow.functions.pendingWithdrawalOf(me))
    assert withdrawal.amount == 20 and withdrawal.readyAt > 0
    market.cli("operator", "client", "balance")
    assert f"withdrawal of 20 requested, possible from timestamp {withdrawal.readyAt}" in capsys.readouterr().out
