"""Fixtures of the engine tests: tiny seeded random checkpoints (built once per run) and a private SHARDMARKET_HOME."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from node.engine.head import Head
from node.engine.models import random_checkpoint, tiny_config
from node.engine.stage import Stage

CHAT = [{"role": "user", "content": "Split the model across machines, then pay each node."}]


@pytest.fixture(autouse=True)
def _home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SHARDMARKET_HOME", str(tmp_path / "home"))


@pytest.fixture(scope="session")
def tiny_checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One tiny random checkpoint per family: llama (untied), mistral (sliding window), qwen2 (bias, tied, sliding)."""
    root = tmp_path_factory.mktemp("tiny")
    return {family: random_checkpoint(tiny_config(family), root / family, seed=0) for family in ("llama", "mistral", "qwen2")}


def prompt_ids(head: Head) -> list[int]:
    """The chat prompt of the tests through the checkpoint's own template."""
    return list(head.tokenizer.apply_chat_template(CHAT, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])


def reference_tokens(checkpoint: Path, ids: list[int], new_tokens: int) -> list[int]:
    """Greedy tokens of transformers' own generate() on the whole model."""
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32)
    out = model.generate(
        torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
    )
    return out[0, len(ids):].tolist()


def chain(stages: list[Stage], session_id: str):
    """run_layers over in-process stages, in order."""

    def run_layers(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        for stage in stages:
            hidden = stage.step(session_id, hidden, positions)
        return hidden

    return run_layers
