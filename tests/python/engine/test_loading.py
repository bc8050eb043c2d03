"""Loading: a stage reads only its layers, renumbered; wrong checkpoints and ranges get clear errors."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig

from shardmarket.engine.errors import EngineError, ShapeError, UnsupportedModel
from shardmarket.engine.head import Head
from shardmarket.engine.stage import Stage


def test_stage_loads_from_a_shard_holding_only_its_layers(tiny_checkpoints, tmp_path):
    full = tiny_checkpoints["llama"]
    shutil.copy(full / "config.json", tmp_path / "config.json")
    tensors = load_file(full / "model.safetensors")
    save_file(
        {k: v for k, v in tensors.items() if k.startswith(("model.layers.2.", "model.layers.3."))},
        tmp_path / "layers.safetensors",
    )
    shard = Stage.load(tmp_path, 2, 4)
    assert next(name for name, _ in shard.body.named_parameters()).startswith("layers.0.")
    assert len(shard.body.layers) == 2
    assert sum(p.numel() for p in shard.body.parameters()) == sum(
        v.numel() for k, v in tensors.items() if k.startswith(("model.layers.2.", "model.layers.3."))
    )
    reference = Stage.load(full, 2, 4)
    x = torch.randn(1, 5, 64)
    for stage in (shard, reference):
        stage.open_session("a", 8)
    assert torch.equal(shard.step("a", x, torch.arange(5)[None]), reference.step("a", x, torch.arange(5)[None]))
    with pytest.raises(EngineError, match="missing"):
        Stage.load(tmp_path, 1, 3)


def test_bad_ranges_and_folders(tiny_checkpoints, tmp_path):
    checkpoint = tiny_checkpoints["llama"]
    for start, end in [(0, 0), (3, 2), (-1, 2), (0, 6)]:
        with pytest.raises(EngineError, match="outside"):
            Stage.load(checkpoint, start, end)
    with pytest.raises(EngineError, match=r"config\.json"):
        Stage.load(tmp_path, 0, 1)
    with pytest.raises(EngineError, match="offload folder"):
        Stage.load(checkpoint, 0, 5, max_memory={"cpu": 1000})


def test_unsupported_architecture(tmp_path):
    AutoConfig.for_model("gpt2", n_layer=2).save_pretrained(tmp_path)
    with pytest.raises(UnsupportedModel, match="llama"):
        Stage.load(tmp_path, 0, 1)
    assert json.loads((tmp_path / "config.json").read_text())["model_type"] == "gpt2"


def test_head_embeds_and_checks_ids(tiny_checkpoints):
    head = Head.load(tiny_checkpoints["qwen2"])  # tied embeddings: the LM head is the embedding matrix
    assert head.lm_head_weight is head.embed_weight
    assert head.embed(torch.tensor([[1, 2, 3]])).shape == (1, 3, 64)
    assert head.logits(torch.zeros(1, 2, 64)).shape == (1, 2, 384)
    for bad in (torch.tensor([[384]]), torch.tensor([[-1]]), torch.tensor([1, 2]), torch.tensor([[1.0]])):
        with pytest.raises(ShapeError):
            head.embed(bad)
