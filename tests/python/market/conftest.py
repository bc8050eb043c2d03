"""A market on a real anvil for the market tests: a seeded tiny model published and served by 3 paid node
processes (layers 0:2, 2:4, 4:5), and a funded client."""

from __future__ import annotations

import pytest

from shardmarket.cli.devmarket import PASSWORD, DevMarket
from shardmarket.engine.models import random_checkpoint, tiny_config

MODEL = "tiny"
PRICE = 1000
RANGES = ["0:2", "2:4", "4:5"]


def serve_market(root, checkpoint, nodes):
    """Publish `checkpoint` as MODEL, register and start `nodes` (name, layers, price, extra `node run` args); yields
    the market, stops everything after."""
    market = DevMarket(root)
    market.checkpoint = checkpoint
    try:
        market.start_chain()
        market.new_account("publisher")
        market.cli("publisher", "model", "publish", "--checkpoint", str(checkpoint), "--name", MODEL)
        for name, layers, price, _ in nodes:
            market.register_node(name, MODEL, layers, price)
        market.start_nodes([name for name, *_ in nodes], {name: extra for name, _, _, extra in nodes})
        yield market
    finally:
        market.stop()


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    root = tmp_path_factory.mktemp("market")
    checkpoint = random_checkpoint(tiny_config(), root / "tiny-model")
    yield from serve_market(root, checkpoint, [(f"node{i}", layers, PRICE, []) for i, layers in enumerate(RANGES)])


async def client_model(market: DevMarket, name: str, *, tokens: int = 10**18, spot_check_rate: float = 0.0):
    """A paid RemoteModel for client `name` (created, funded and deposited on first use)."""
    import os

    from shardmarket.chain.keys import load_account
    from shardmarket.cli.keys import home_keys
    from shardmarket.client.market import connect_paid
    from shardmarket.config import load_config

    if name not in market.accounts:
        market.new_account(name, tokens=tokens)
        market.cli(name, "client", "deposit", "0.1")
    with market.acting_as(name):
        os.environ["SHARDMARKET_CLIENT_SPOT_CHECK_RATE"] = str(spot_check_rate)
        account, config = load_account(PASSWORD, home_keys()), load_config()
    return await connect_paid(market.checkpoint, config, account, MODEL)


async def generate(model, prompt: list[int], max_tokens: int):
    """Greedy tokens and the Completion (with its cost) of one paid request."""
    from shardmarket.client.generation import Completion
    from shardmarket.engine.sampling import SamplingParams

    completion = Completion(prompt_tokens=len(prompt))
    tokens = [t async for t in model.stream(prompt, SamplingParams(max_tokens=max_tokens), completion)]
    return tokens, completion
