"""Batched decode: one forward pass over the decode steps of several sessions equals stepping each alone."""

from __future__ import annotations

import pytest
import torch

from shardmarket.engine.errors import ShapeError, UnknownSession
from shardmarket.engine.stage import Stage


@pytest.mark.parametrize("family", ["llama", "mistral", "qwen2"])
def test_step_batch_equals_step(tiny_checkpoints, family):
    batched = Stage.load(tiny_checkpoints[family], 0, 5)
    alone = Stage.load(tiny_checkpoints[family], 0, 5)
    gen = torch.Generator().manual_seed(3)
    lengths = [3, 9, 20, 1]  # different positions per session, some beyond the sliding windows
    for i, length in enumerate(lengths):
        prompt = torch.randn(1, length, 64, generator=gen)
        for stage in (batched, alone):
            stage.open_session(f"s{i}", 64)
            stage.step(f"s{i}", prompt, torch.arange(length)[None])
    for step in range(5):
        items = [
            (f"s{i}", torch.randn(1, 1, 64, generator=gen), torch.tensor([[length + step]])) for i, length in enumerate(lengths)
        ]
        outs = batched.step_batch(items)
        for (session, h, p), out in zip(items, outs, strict=True):
            assert out.shape == (1, 1, 64)
            assert torch.allclose(out, alone.step(session, h, p), rtol=1e-5, atol=1e-4)
    assert [batched.session_length(f"s{i}") for i in range(4)] == [length + 5 for length in lengths]


def test_step_batch_rejects_bad_items(tiny_checkpoints):
    stage = Stage.load(tiny_checkpoints["llama"], 0, 2)
    stage.open_session("a", 8)
    one = torch.zeros(1, 1, 64)
    with pytest.raises(ShapeError, match="at most once"):
        stage.step_batch([("a", one, torch.tensor([[0]])), ("a", one, torch.tensor([[0]]))])
    with pytest.raises(ShapeError, match="decode"):
        stage.step_batch([("a", torch.zeros(1, 2, 64), torch.tensor([[0, 1]]))])
    with pytest.raises(UnknownSession):
        stage.step_batch([("a", one, torch.tensor([[0]])), ("b", one, torch.tensor([[0]]))])
    assert stage.session_length("a") == 0
    assert stage.step_batch([]) == []
