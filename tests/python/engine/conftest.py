"""Fixtures of the engine tests: tiny seeded random checkpoints (built once per run) and a private SHARDMARKET_HOME."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from shardmarket.engine.head import Head
from shardmarket.engine.models import TINY_FAMILIES, random_checkpoint, tiny_config
from shardmarket.engine.sampling import SamplingParams, generate
from shardmarket.engine.stage import Stage

# Tiny models gain nothing from intra-op threads, and on a machine whose cores are busy a second OpenMP thread
# waiting for a core stalls every op.
torch.set_num_threads(1)

CHAT = [{"role": "user", "content": "Split the model across machines, then pay each node."}]
FAMILIES = TINY_FAMILIES


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDMARKET_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny random checkpoint per family: llama (untied), llama3 (RoPE scaling), mistral (sliding window), qwen2
    (bias, tied, sliding), qwen3 (q/k norms), gemma2 (soft-capping, sliding), gemma3 (q/k norms, local/global RoPE)."""
    root = tmp_path_factory.mktemp("tiny")
    return {family: random_checkpoint(tiny_config(family), root / family, seed=0) for family in FAMILIES}


@dataclass
class Reference:
    """What transformers' generate() gives on the whole model: prompt, greedy tokens and the raw logits of each step."""

    prompt: list[int]
    tokens: list[int]
    logits: torch.Tensor  # [new_tokens, vocab]


def prompt_ids(head: Head, chat: list[dict] = CHAT) -> list[int]:
    """The chat prompt through the checkpoint's own template."""
    return list(
        head.tokenizer.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    )


def reference(checkpoint: Path, ids: list[int], new_tokens: int) -> Reference:
    """Greedy tokens and logits of transformers' own generate() on the whole model."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    out = model.generate(
        torch.tensor([ids]),
        attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=new_tokens,
        min_new_tokens=new_tokens,
        do_sample=False,
        output_logits=True,
        return_dict_in_generate=True,
    )
    return Reference(ids, out.sequences[0, len(ids) :].tolist(), torch.cat(out.logits))


@pytest.fixture(scope="session")
def tiny_references(tiny_checkpoints) -> dict[str, Reference]:
    """64 greedy tokens of each tiny model from transformers."""
    return {family: reference(path, prompt_ids(Head.load(path)), 64) for family, path in tiny_checkpoints.items()}


def chain(stages: list[Stage], session_id: str):
    """run_layers over in-process stages, in order (hidden states cast to each stage's dtype, as a client sends them)."""

    def run_layers(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        for stage in stages:
            hidden = stage.step(session_id, hidden.to(stage.dtype), positions)
        return hidden

    return run_layers


def run_pipeline(head: Head, stages: list[Stage], ids: list[int], new_tokens: int, chunk_size: int = 256):
    """Greedy tokens through `stages` and the logits the head computed at each step."""
    session = "pipeline"
    for stage in stages:
        stage.open_session(session, len(ids) + new_tokens)
    run = chain(stages, session)
    logits = []

    def recording(hidden, positions):
        out = run(hidden, positions)
        logits.append(head.logits(out[:, -1:])[0, -1])
        return out

    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    tokens = list(generate(head, recording, ids, params, chunk_size=chunk_size))
    for stage in stages:
        stage.close_session(session)
    chunks = -(-len(ids) // chunk_size)
    return tokens, torch.stack(logits[chunks - 1 :])  # the logits of earlier prefill chunks pick no token
