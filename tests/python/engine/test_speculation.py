"""Speculative decoding on the client: prompt lookup drafts what followed the context's last n-gram, greedy output with
drafts is the greedy output without, sampling with drafts keeps the distribution of the tokens (a chi-square test over
many seeds, for point-mass drafts and for drafts a local model sampled), and the draft length backs off when drafts
keep failing."""

from __future__ import annotations

from collections import Counter

import pytest
import torch

from shardmarket.engine.head import Head
from shardmarket.engine.models import random_checkpoint, tiny_config
from shardmarket.engine.sampling import SamplingParams, generate
from shardmarket.engine.speculation import Draft, ModelDrafter, PromptLookup, Speculator
from shardmarket.engine.stage import Stage

PROMPT = [1, 40, 41, 42, 43, 40, 41]


@pytest.fixture(scope="module")
def target(tmp_path_factory) -> tuple[Head, Stage]:
    path = random_checkpoint(tiny_config(), tmp_path_factory.mktemp("target") / "tiny")
    return Head.load(path), Stage.load(path, 0, 5)


@pytest.fixture(scope="module")
def draft_model(tmp_path_factory) -> tuple[Head, Stage]:
    """Another seeded random model with the same vocabulary: its drafts are sometimes right, often wrong."""
    path = random_checkpoint(tiny_config(), tmp_path_factory.mktemp("draft") / "tiny", seed=1)
    return Head.load(path), Stage.load(path, 0, 5)


def run(target, params: SamplingParams, speculator: Speculator | None = None, prompt=PROMPT) -> list[int]:
    head, stage = target
    stage.open_session("run", 128)
    try:
        return list(generate(head, lambda h, p: stage.step("run", h, p), prompt, params, speculator=speculator))
    finally:
        stage.close_session("run")


def test_prompt_lookup_drafts_what_followed_the_latest_occurrence_of_the_last_ngram():
    lookup = PromptLookup(max_ngram=3, min_ngram=2)
    assert lookup.propose([5, 6, 7, 8, 9, 5, 6], 3).tokens == [7, 8, 9]
    assert lookup.propose([5, 6, 7, 8, 9, 5, 6, 7, 1, 6, 7], 2).tokens == [1, 6]  # the latest occurrence of (6, 7)
    assert lookup.propose([5, 6, 7, 8, 9, 5, 6, 7, 1, 6, 7, 8], 4).tokens == [9, 5, 6, 7]  # (6, 7, 8) beats (7, 8)
    assert lookup.propose([1, 2, 3, 4], 4).tokens == []  # no n-gram seen before
    assert lookup.propose([9, 9, 9], 5).tokens == [9]  # a new context is indexed afresh; the draft ends with it


def test_greedy_with_drafts_equals_greedy_without(target, draft_model):
    params = SamplingParams(max_tokens=24, ignore_eos=True)
    plain = run(target, params)
    same = Speculator(ModelDrafter(*target, max_length=128), max_draft=6)  # drafts the target's own argmax
    other = Speculator(ModelDrafter(*draft_model, max_length=128), max_draft=6)
    assert run(target, params, same) == plain
    assert run(target, params, other) == plain
    assert same.stats.accepted == same.stats.drafted > 0 and same.stats.passes < len(plain) / 2
    assert other.stats.drafted > other.stats.accepted  # rejections happened and rolled the cache back


def chi_square_p(a: Counter, b: Counter) -> float:
    """The p-value of a two-sample chi-square test that counts `a` and `b` (equal totals) come from one distribution;
    bins with fewer than 10 samples in all are pooled."""
    bins: dict[object, tuple[int, int]] = {}
    for key in a.keys() | b.keys():
        label = key if a[key] + b[key] >= 10 else "pooled"
        x, y = bins.get(label, (0, 0))
        bins[label] = (x + a[key], y + b[key])
    statistic = sum((x - y) ** 2 / (x + y) for x, y in bins.values() if x + y)
    freedom = len(bins) - 1
    return float(torch.special.gammaincc(torch.tensor(freedom / 2, dtype=torch.float64), torch.tensor(statistic / 2)))


@pytest.mark.parametrize("draft_temperature", [0.0, 1.0], ids=["point-mass-drafts", "sampled-drafts"])
def test_sampling_with_drafts_keeps_the_distribution_of_the_tokens(target, draft_temperature):
    """The second to fourth tokens (the first is picked before any draft) over many seeds at temperature 0.35 and top_p
    0.9 (a few likely tokens, so that a biased rule shows), with drafts and without. The drafts come from the model
    itself, taken greedily (point masses) or sampled at another temperature (their distributions ride with them): close
    enough to the target that many are kept, not all."""
    runs, positions = 800, (1, 2, 3)
    plain: list[Counter] = [Counter() for _ in positions]
    drafted: list[Counter] = [Counter() for _ in positions]
    drafter = ModelDrafter(*target, max_length=128, temperature=draft_temperature, seed=7)
    accepted = total = 0
    for seed in range(runs):
        params = SamplingParams(max_tokens=4, temperature=0.35, top_p=0.9, seed=seed, ignore_eos=True)
        without = run(target, params)
        params.seed = seed + runs  # independent samples
        speculator = Speculator(drafter, max_draft=3, min_rate=0.0)
        with_drafts = run(target, params, speculator)
        accepted, total = accepted + speculator.stats.accepted, total + speculator.stats.drafted
        for i, position in enumerate(positions):
            plain[i][without[position]] += 1
            drafted[i][with_drafts[position]] += 1
    drafter.close()
    assert 0.1 < accepted / total < 0.9  # drafts were both kept and rejected
    for i in range(len(positions)):
        assert chi_square_p(drafted[i], plain[i]) > 1e-3


def test_the_draft_length_backs_off_while_drafts_fail_and_resumes_when_they_hold():
    class Always:
        def propose(self, tokens, k):
            return Draft([0] * k)

        def close(self) -> None:
            pass

    speculator = Speculator(Always(), max_draft=8)
    proposed = []
    for _ in range(200):
        draft = speculator.propose([1, 2, 3], 8)
        proposed.append(len(draft.tokens))
        speculator.update(len(draft.tokens), 0)
    assert sum(1 for n in proposed if n) < 20  # a few tries, further and further apart
    assert max(proposed[100:]) == 1
    for _ in range(300):  # the next try holds: drafting resumes and grows
        draft = speculator.propose([1, 2, 3], 8)
        speculator.update(len(draft.tokens), len(draft.tokens))
    assert len(speculator.propose([1, 2, 3], 8).tokens) == 8
