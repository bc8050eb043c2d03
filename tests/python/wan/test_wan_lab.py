"""The WAN lab (bench/wanlab.py): each link's delay is what it was configured to, even while torch keeps every core
busy, and a pipeline of nodes that push to each other across delayed links generates the tokens of local greedy
decoding, faster per token than client relaying pays in round trips alone. Root only."""

from __future__ import annotations

import asyncio
import statistics
import sys
import time
from pathlib import Path

import pytest
import torch

from shardmarket.chain.eip712 import Domain
from shardmarket.client.generation import Completion, RemoteModel
from shardmarket.engine.head import Head
from shardmarket.engine.models import random_checkpoint, tiny_config
from shardmarket.engine.sampling import SamplingParams, generate
from shardmarket.engine.stage import Stage

sys.path.insert(0, str(Path(__file__).resolve().parents[3] / "bench"))

from wan import start_nodes
from wanlab import WanLab, cores_busy, missing, ping_pong

DOMAIN = Domain(31337, "0x" + "00" * 20)
PROMPT = list(range(3, 30))
TOKENS = 10


@pytest.fixture(autouse=True)
def root_only():
    why = missing()
    if why:
        pytest.skip(why)


def test_each_link_has_its_own_delay_while_every_core_computes():
    """a-b is 10 ms one way, a-c 30 ms: the ping-pong round trips are 20 and 60 ms, within a few ms, with torch busy;
    a-b set to 40 ms later gives 80 ms."""
    with WanLab(["a", "b", "c"], {("a", "b"): 10, ("a", "c"): 30, ("b", "c"): 5}) as lab, cores_busy():
        near, far = ping_pong(lab, "a", "b", 30, port=7998), ping_pong(lab, "a", "c", 30, port=7997)
        lab.set_delays({("a", "b"): 40})  # a running lab takes new delays
        changed = ping_pong(lab, "a", "b", 20, port=7996)
    for rtts, configured in ((near, 20), (far, 60), (changed, 80)):
        rtts.sort()
        assert configured <= rtts[0]  # never early
        assert statistics.median(rtts) < configured + 2  # the switch keeps time
        assert rtts[int(0.9 * (len(rtts) - 1))] < configured + 5


def test_nodes_that_push_across_delayed_links_generate_local_greedy_tokens(tmp_path):
    checkpoint = random_checkpoint(tiny_config(), tmp_path / "tiny")
    stage = Stage.load(checkpoint, 0, 5)
    stage.open_session("local", 64)
    rtt = 0.06
    hosts = ["client", "a", "b", "c"]
    with WanLab(hosts, {(x, y): rtt * 1000 / 2 for i, x in enumerate(hosts) for y in hosts[i + 1 :]}) as lab:
        urls = start_nodes(lab, checkpoint, 5, tmp_path / "home")

        async def go(push: bool) -> tuple[list[int], float, list[bool]]:
            model = await RemoteModel.connect(checkpoint, urls, DOMAIN, step_timeout_s=30, push=push)
            pushes: list[bool] = []
            model.on_finished = lambda session: pushes.extend(hop.pushes for hop in session.hops)
            params = SamplingParams(max_tokens=TOKENS, ignore_eos=True)
            try:
                [t async for t in model.stream(PROMPT, params, Completion(len(PROMPT)))]  # connects and handshakes
                arrivals, tokens = [], []
                async for token in model.stream(PROMPT, params, Completion(len(PROMPT))):
                    arrivals.append(time.perf_counter())
                    tokens.append(token)
            finally:
                await model.aclose()
            return tokens, (arrivals[-1] - arrivals[0]) / (len(tokens) - 1), pushes[-3:]

        with lab.inside("client"):
            relayed, relay_s, _ = asyncio.run(asyncio.wait_for(go(push=False), 180))
            pushed, push_s, pushes = asyncio.run(asyncio.wait_for(go(push=True), 180))
    params = SamplingParams(max_tokens=TOKENS, ignore_eos=True)
    with torch.inference_mode():
        local = list(generate(Head.load(checkpoint), lambda h, p: stage.step("local", h, p), PROMPT, params))
    assert pushed == relayed == local
    assert pushes == [True, True, False]
    assert 3 * rtt <= relay_s  # client relaying pays 3 round trips a token
    assert 2 * rtt <= push_s < 3 * rtt  # push pays 2, and the tiny model's compute is far below one
