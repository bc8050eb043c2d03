"""A model split into in-process stages generates exactly what transformers generates on the whole model."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from shardmarket.engine.head import Head
from shardmarket.engine.stage import Stage

from .conftest import FAMILIES, run_pipeline

SPLITS = {
    1: [(0, 5)],
    2: [(0, 1), (1, 5)],
    3: [(0, 3), (3, 4), (4, 5)],
    4: [(0, 1), (1, 2), (2, 4), (4, 5)],
}


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("stages", sorted(SPLITS))
def test_split_matches_generate(tiny_checkpoints, tiny_references, family, stages):
    checkpoint, ref = tiny_checkpoints[family], tiny_references[family]
    head = Head.load(checkpoint)
    tokens, logits = run_pipeline(head, [Stage.load(checkpoint, a, b) for a, b in SPLITS[stages]], ref.prompt, 64)
    assert tokens == ref.tokens
    assert torch.max(torch.abs(logits - ref.logits)) <= 1e-4


@pytest.mark.parametrize("family", FAMILIES)
def test_disk_offload_matches_generate(tiny_checkpoints, tiny_references, tmp_path, family):
    checkpoint, ref = tiny_checkpoints[family], tiny_references[family]
    head = Head.load(checkpoint)
    layer_bytes = sum(t.numel() * 4 for name, t in load_file(checkpoint / "model.safetensors").items() if ".layers.0." in name)
    stages = [  # part on CPU, part on disk
        Stage.load(checkpoint, 0, 3, max_memory={"cpu": int(2.5 * layer_bytes)}, offload_folder=tmp_path),
        Stage.load(checkpoint, 3, 5, max_memory={"cpu": 0}, offload_folder=tmp_path),  # all on disk
    ]
    assert {"cpu", "disk"} <= set(stages[0].device_map.values())
    assert set(stages[1].device_map.values()) == {"disk"}
    tokens, logits = run_pipeline(head, stages, ref.prompt, 64)
    assert tokens == ref.tokens
    assert torch.max(torch.abs(logits - ref.logits)) <= 1e-4


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gemma2", "gemma3"])
def test_chunked_prefill_matches_generate(tiny_checkpoints, tiny_references, family):
    """Prefill chunks of 5 positions cross the sliding windows (12 and 16) and still give the same tokens."""
    checkpoint, ref = tiny_checkpoints[family], tiny_references[family]
    head = Head.load(checkpoint)
    tokens, logits = run_pipeline(
        head, [Stage.load(checkpoint, 0, 2), Stage.load(checkpoint, 2, 5)], ref.prompt, 64, chunk_size=5
    )
    assert tokens == ref.tokens
    assert torch.max(torch.abs(logits - ref.logits)) <= 1e-4


def test_a_missing_layer_changes_the_tokens(tiny_checkpoints, tiny_references):
    """The layers matter in these tiny models: skipping one of them gives other tokens, so the tests above can fail."""
    checkpoint, ref = tiny_checkpoints["llama"], tiny_references["llama"]
    head = Head.load(checkpoint)
    tokens, _ = run_pipeline(head, [Stage.load(checkpoint, 0, 2), Stage.load(checkpoint, 3, 5)], ref.prompt, 64)
    assert tokens != ref.tokens
