"""Checks across numerics, on a real anvil with real node processes: nodes of one range computing with float32,
int8 or bfloat16 are never accused by a client's spot checks, their answers differ within the tolerance of each
pair, and a node adding noise, whatever weights it announces, is challenged and slashed by verifiers that compute
otherwise than it does."""

from __future__ import annotations

import asyncio
import time

import pytest
import torch

from shardmarket.chain.contracts import DisputeStatus, Market
from shardmarket.chain.evidence import relative_difference
from shardmarket.client.session import InferenceSession
from shardmarket.config import load_config
from shardmarket.engine.formats import Numerics, tolerance
from shardmarket.engine.models import random_checkpoint, tiny_config

from .conftest import MODEL, client_model, generate, serve_market

PROMPT = [3, 1, 4, 1, 5]
BASE = 1e-3  # the configured tolerance between float32 re-runs (spot_check_tolerance, dispute_tolerance)
NODES = [  # name, layers, price, extra `node run` arguments
    ("a", "0:2", 1000, []),
    ("f32", "2:4", 1000, []),
    ("f32b", "2:4", 1000, ["--threads", "2"]),
    ("i8", "2:4", 1000, ["--weights", "int8"]),
    ("bf", "2:4", 1000, ["--dtype", "bfloat16"]),
    ("i8bf", "2:4", 1000, ["--weights", "int8", "--dtype", "bfloat16"]),
    ("c", "4:5", 1000, ["--weights", "int8"]),
]
MIDDLE = {
    "f32": Numerics("float32", "float32"),
    "f32b": Numerics("float32", "float32"),
    "i8": Numerics("int8", "float32"),
    "bf": Numerics("bfloat16", "bfloat16"),
    "i8bf": Numerics("int8", "bfloat16"),
}


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    root = tmp_path_factory.mktemp("numerics")
    checkpoint = random_checkpoint(tiny_config(), root / "tiny-model", seed=3)
    yield from serve_market(root, checkpoint, NODES)


def chain_of(market, name: str) -> Market:
    with market.acting_as(name):
        return Market.connect(load_config().chain)


def stake_of(market, name: str) -> int:
    chain = chain_of(market, name)
    return chain.read(chain.stake.functions.totalStakeOf(market.accounts[name]))


async def audited_through_each(model, names: list[str], market) -> None:
    """One request routed through each node of `names` for layers 2:4 (every hop spot-checked), then one over all."""
    everyone = list(model.nodes)
    for name in names:
        url = market.nodes[name].url
        model.nodes = [n for n in everyone if (n.start, n.end) != (2, 4) or n.url == url]
        await generate(model, PROMPT, 4)
        await model.auditor.wait()
    model.nodes = everyone
    await generate(model, PROMPT, 4)
    await model.auditor.wait()


def test_honest_nodes_in_any_numerics_are_never_accused(market):
    async def scenario():
        model = await client_model(market, "honest-client", tokens=100 * 10**18, spot_check_rate=1.0)
        announced = {n.url: n.numerics for n in model.nodes}
        await audited_through_each(model, list(MIDDLE), market)
        return model.auditor, announced

    auditor, announced = asyncio.run(scenario())
    assert {name: announced[market.nodes[name].url] for name in MIDDLE} == MIDDLE  # as /info announces them
    assert announced[market.nodes["c"].url] == Numerics("int8", "float32")
    assert auditor.checks >= 3 * (len(MIDDLE) + 1)  # every hop of every request was re-run elsewhere or locally
    assert auditor.findings == []
    chain = chain_of(market, "a")
    assert chain.read(chain.disputes.functions.disputeCount()) == 0


def test_answers_of_one_range_differ_within_the_tolerance_of_their_pair(market):
    async def outputs_of_each():
        model = await client_model(market, "honest-client", spot_check_rate=0.0)
        hidden = model.head.config.hidden_size
        inputs = [(0, 0.3 * torch.randn(1, 4, hidden)), (4, 0.3 * torch.randn(1, 1, hidden))]
        outputs = {}
        for node in [n for n in model.nodes if (n.start, n.end) == (2, 4)]:
            session = InferenceSession([node], model.head.num_layers, model.domain, max_length=8, tab_source=model.tab_source)
            hop = (await session._open_hops([node]))[0]
            outputs[node.numerics, node.url] = [o for _, o in await session._replay_hop(hop, inputs)]
            await session.close()
        return outputs

    outputs = asyncio.run(outputs_of_each())
    assert len(outputs) == len(MIDDLE)
    for (a, _), answers_a in outputs.items():
        for (b, _), answers_b in outputs.items():
            for x, y in zip(answers_a, answers_b, strict=True):
                assert relative_difference(x, y) <= tolerance(a, b, BASE)
                if a == b:
                    assert relative_difference(x, y) <= 1e-5  # other thread counts, same numbers


def test_noisy_nodes_are_slashed_whatever_weights_they_announce(market):
    """Each cheater, the cheapest node of its range while it runs, adds `--cheat-noise 0.1` to its answers: a peer of the
    same numerics disagrees, the client's local re-run in the cheater's numerics says which of the two is wrong, and
    the verifiers (drawn from nodes computing in float32, int8 or bfloat16) re-run the hop and slash it."""
    cheaters = {"cheat": [], "cheat8": ["--weights", "int8"]}
    challenges = []
    for name, extra in cheaters.items():
        market.new_account(name, tokens=100 * 10**18)
        market.node_port(name)
        market.cli(name, "node", "register", "--model", MODEL, "--layers", "2:4", "--price", "1raw", "--stake", "100e18")
        market.start_node(name, "--cheat-noise", "0.1", *extra)

        async def scenario():
            model = await client_model(market, "checking-client", tokens=100 * 10**18, spot_check_rate=1.0)
            await generate(model, PROMPT, 4)
            await model.auditor.wait()
            return model.auditor

        found = [f for f in asyncio.run(scenario()).findings if f.kind == "challenge"]
        assert [f.node for f in found] == [market.accounts[name]]  # caught, and no honest peer with it
        challenges += found
        market.stop_node(name)
    chain = chain_of(market, "a")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        statuses = [chain.read(chain.disputes.functions.getDispute(f.dispute_id)).status for f in challenges]
        if DisputeStatus.OPEN not in statuses:
            break
        time.sleep(0.5)
    assert statuses == [DisputeStatus.NODE_SLASHED] * len(cheaters)
    assert all(stake_of(market, name) == 50 * 10**18 for name in cheaters)  # wrongOutputSlashBps = 50 %
    assert all(stake_of(market, name) == 100 * 10**18 for name, _, _, _ in NODES)
