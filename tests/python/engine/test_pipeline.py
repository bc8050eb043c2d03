"""A model split into in-process stages generates exactly what transformers generates on the whole model."""

from __future__ import annotations

from node.engine.head import Head
from node.engine.sampling import SamplingParams, generate
from node.engine.stage import Stage

from .conftest import chain, prompt_ids, reference_tokens


def test_two_stage_llama_matches_generate(tiny_checkpoints):
    checkpoint = tiny_checkpoints["llama"]
    head = Head.load(checkpoint)
    ids = prompt_ids(head)
    stages = [Stage.load(checkpoint, 0, 2), Stage.load(checkpoint, 2, 5)]
    for stage in stages:
        stage.open_session("s1", 256)
    tokens = list(generate(head, chain(stages, "s1"), ids, SamplingParams(max_tokens=64)))
    assert len(tokens) == 64
    assert tokens == reference_tokens(checkpoint, ids, 64)
