"""Contract data read by name, on a real anvil with the contracts deployed: a struct, or several named return values,
comes back as a named tuple, and the commands that show it read the right fields."""

from __future__ import annotations

import pytest

from shardmarket.chain.contracts import Market
from shardmarket.chain.keys import load_account
from shardmarket.cli.devmarket import PASSWORD, DevMarket
from shardmarket.cli.keys import home_keys
from shardmarket.config import load_config

STAKE = 100 * 10**18  # scripts/deploy.py's MIN_STAKE
MODEL = "by-name"


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
