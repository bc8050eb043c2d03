"""What sets the newer families apart is live in their tiny models, so test_pipeline's split == whole checks it:
Llama 3.x's RoPE scaling, Gemma 2's soft-capped attention scores and logits, Gemma 3's local and global RoPE bases,
Gemma's scaled embeddings."""

from __future__ import annotations

import json
import shutil

import pytest
import torch

from shardmarket.engine.head import Head

from .conftest import reference

CHANGES = {
    "llama3 without RoPE scaling": ("llama3", {"rope_parameters": {"rope_type": "default", "rope_theta": 500000.0}}),
    "gemma2 without soft-capped scores": ("gemma2", {"attn_logit_softcapping": None}),
    "gemma2 without soft-capped logits": ("gemma2", {"final_logit_softcapping": None}),
    "gemma3 with one RoPE base": (
        "gemma3",
        {
            "rope_parameters": {
                kind: {"rope_theta": 10000.0, "rope_type": "default"} for kind in ("full_attention", "sliding_attention")
            }
        },
    ),
}


@pytest.mark.parametrize("change", sorted(CHANGES))
def test_the_family_feature_changes_what_the_model_generates(tiny_checkpoints, tiny_references, tmp_path, change):
    family, edit = CHANGES[change]
    changed = shutil.copytree(tiny_checkpoints[family], tmp_path / family)
    config = json.loads((changed / "config.json").read_text())
    (changed / "config.json").write_text(json.dumps({**config, **edit}))
    ref = tiny_references[family]
    other = reference(changed, ref.prompt, 16)
    assert other.tokens != ref.tokens[:16] or torch.max(torch.abs(other.logits - ref.logits[:16])) > 1e-2


def test_gemma_heads_scale_embeddings_and_cap_logits(tiny_checkpoints):
    head = Head.load(tiny_checkpoints["gemma2"])
    ids = torch.tensor([[5, 6, 7]])
    assert torch.equal(head.embed(ids), torch.nn.functional.embedding(ids, head.embed_weight) * 8.0)  # sqrt(64)
    assert float(head.logits(100 * torch.randn(1, 3, 64)).abs().max()) <= 3.0  # final_logit_softcapping
