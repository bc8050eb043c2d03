"""Sampling on the client: seeds, temperature, top-p, max_tokens, EOS and bad parameters."""

from __future__ import annotations

import pytest

from shardmarket.engine.errors import EngineError
from shardmarket.engine.head import Head
from shardmarket.engine.sampling import SamplingParams, generate
from shardmarket.engine.stage import Stage

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


def test_a_step_redone_at_confirm_is_sampled_again_from_the_same_random_state(tiny_checkpoints):
    """`confirm` handing back another output (a step redone after a bad commitment) gives the tokens of a run whose
    layers returned that output in the first place, with the same seed."""
    checkpoint = tiny_checkpoints["llama"]
    head = Head.load(checkpoint)
    stage = Stage.load(checkpoint, 0, 5)
    params = SamplingParams(max_tokens=12, temperature=0.3, seed=5)

    def redone(hidden):  # what the redone 4th step gave instead
        return -hidden  # negated logits: another token, surely

    def layers(session, redo_at_step: int | None):
        run, steps = chain([stage], session), []

        def run_layers(hidden, positions):
            steps.append(1)
            out = run(hidden, positions)
            return redone(out) if len(steps) == redo_at_step else out

        return run_layers, steps

    for session in "abc":
        stage.open_session(session, 128)
    run_a, steps_a = layers("a", None)
    confirmed = list(
        generate(head, run_a, prompt_ids(head), params, confirm=lambda hidden: redone(hidden) if len(steps_a) == 4 else hidden)
    )
    assert confirmed == list(generate(head, layers("b", 4)[0], prompt_ids(head), params))
    assert confirmed != list(generate(head, layers("c", None)[0], prompt_ids(head), params))  # the redo changed the text
