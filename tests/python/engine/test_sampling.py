"""Sampling on the client: seeds, temperature, top-p, max_tokens, EOS and bad parameters."""

from __future__ import annotations

import pytest

from node.engine.errors import EngineError
from node.engine.head import Head
from node.engine.sampling import SamplingParams, generate
from node.engine.stage import Stage

from .conftest import chain, prompt_ids


@pytest.fixture
def run(tiny_checkpoints):
    checkpoint = tiny_checkpoints["llama"]
    head = Head.load(checkpoint)
    stage = Stage.load(checkpoint, 0, 5)
    count = iter(range(1000))

    def tokens(params: SamplingParams) -> list[int]:
        session = f"s{next(count)}"
        stage.open_session(session, 128)
        return list(generate(head, chain([stage], session), prompt_ids(head), params))

    return tokens


def test_seeded_sampling_is_reproducible(run):
    first = run(SamplingParams(max_tokens=20, temperature=1.0, seed=11))
    assert first == run(SamplingParams(max_tokens=20, temperature=1.0, seed=11))
    assert first != run(SamplingParams(max_tokens=20, temperature=1.0, seed=12))


def test_tiny_top_p_is_greedy(run):
    greedy = run(SamplingParams(max_tokens=20))
    assert run(SamplingParams(max_tokens=20, temperature=1.5, top_p=1e-6, seed=1)) == greedy
    assert run(SamplingParams(max_tokens=20, temperature=1.5, seed=1)) != greedy


def test_max_tokens(run):
    assert len(run(SamplingParams(max_tokens=7))) == 7


def test_stops_at_eos(tiny_checkpoints):
    checkpoint = tiny_checkpoints["llama"]
    head = Head.load(checkpoint)
    stage = Stage.load(checkpoint, 0, 5)
    stage.open_session("a", 128)
    stage.open_session("b", 128)
    free = list(generate(head, chain([stage], "a"), prompt_ids(head), SamplingParams(max_tokens=10)))
    head.eos_token_ids = {free[4]}  # make the 5th greedy token the end of the answer
    assert list(generate(head, chain([stage], "b"), prompt_ids(head), SamplingParams(max_tokens=10))) == free[:4]


@pytest.mark.parametrize(
    "params", [SamplingParams(max_tokens=0), SamplingParams(temperature=-1), SamplingParams(top_p=0), SamplingParams(top_p=1.5)]
)
def test_bad_parameters(run, params):
    with pytest.raises(EngineError):
        run(params)
