"""Sessions of a stage: KV-cache budget, session cap, idle eviction, clear errors that change nothing."""

from __future__ import annotations

import time

import pytest
import torch

from shardmarket.engine.errors import CapacityError, DuplicateSession, EngineError, ShapeError, UnknownSession
from shardmarket.engine.stage import Stage


@pytest.fixture
def stage(tiny_checkpoints) -> Stage:
    return Stage.load(tiny_checkpoints["llama"], 1, 3, max_sessions=3)


def hidden(steps: int, seed: int = 0) -> torch.Tensor:
    return torch.randn(1, steps, 64, generator=torch.Generator().manual_seed(seed))


def positions(start: int, steps: int) -> torch.Tensor:
    return torch.arange(start, start + steps)[None]


def test_unknown_and_closed_sessions_raise_unknown_session(stage):
    with pytest.raises(UnknownSession, match="open a new session"):
        stage.step("nope", hidden(1), positions(0, 1))
    stage.open_session("a", 32)
    stage.close_session("a")
    with pytest.raises(UnknownSession):
        stage.step("a", hidden(1), positions(0, 1))
    with pytest.raises(UnknownSession):
        stage.close_session("a")


def test_session_cap(stage):
    for i in range(3):
        stage.open_session(f"s{i}", 16)
    with pytest.raises(CapacityError, match="3 sessions"):
        stage.open_session("s3", 16)
    with pytest.raises(DuplicateSession):
        stage.open_session("s0", 16)
    stage.close_session("s0")
    stage.open_session("s3", 16)
    assert sorted(stage.session_ids()) == ["s1", "s2", "s3"]


def test_cache_budget(tiny_checkpoints):
    # 2 layers x (keys + values) x 2 kv heads x 16 dims x 4 bytes = 512 bytes per position
    stage = Stage.load(tiny_checkpoints["llama"], 1, 3, cache_budget_bytes=512 * 100)
    stage.open_session("a", 60)
    assert stage.cache_bytes() == 512 * 60
    with pytest.raises(CapacityError, match="budget"):
        stage.open_session("b", 41)
    stage.open_session("b", 40)
    stage.close_session("a")
    stage.open_session("c", 60)


def test_idle_sessions_expire(tiny_checkpoints):
    stage = Stage.load(tiny_checkpoints["llama"], 1, 3, idle_timeout_s=0.2, max_sessions=1)
    stage.open_session("old", 16)
    stage.step("old", hidden(2), positions(0, 2))
    time.sleep(0.3)
    stage.open_session("new", 16)  # the idle session no longer counts against the cap
    with pytest.raises(UnknownSession, match="expired"):
        stage.step("old", hidden(1), positions(2, 1))


def test_bad_input_is_rejected_and_changes_nothing(stage):
    stage.open_session("a", 8)
    stage.step("a", hidden(3), positions(0, 3))
    bad = [
        (hidden(1)[0], positions(3, 1)),  # not [1, T, H]
        (torch.randn(1, 1, 65), positions(3, 1)),  # wrong hidden size
        (hidden(1).double(), positions(3, 1)),  # wrong dtype
        (hidden(2), positions(3, 1)),  # positions of another length
        (hidden(2), torch.tensor([[3, 5]])),  # not consecutive
        (hidden(1), positions(4, 1)),  # skips a position
        (hidden(6), positions(3, 6)),  # beyond max_length
        (hidden(1), positions(3, 1).int()),  # positions not int64
    ]
    for h, p in bad:
        with pytest.raises(ShapeError):
            stage.step("a", h, p)
        assert stage.session_length("a") == 3
    with pytest.raises(ShapeError):
        stage.open_session("b", 0)
    with pytest.raises(EngineError):
        stage.open_session("", 8)


def test_resending_a_step_gives_the_same_output(stage):
    """A retried step (same positions) rewrites the cache from there instead of appending twice."""
    stage.open_session("a", 16)
    stage.step("a", hidden(4), positions(0, 4))
    first = stage.step("a", hidden(1, seed=1), positions(4, 1))
    again = stage.step("a", hidden(1, seed=1), positions(4, 1))
    assert torch.equal(first, again)
    assert stage.session_length("a") == 5


def test_chunked_prefill_equals_one_prefill(tiny_checkpoints):
    stage = Stage.load(tiny_checkpoints["mistral"], 0, 5)  # sliding window 16
    prompt = hidden(40)
    stage.open_session("whole", 64)
    stage.open_session("chunks", 64)
    whole = stage.step("whole", prompt, positions(0, 40))
    chunks = torch.cat(
        [stage.step("chunks", prompt[:, i : i + 7], positions(i, prompt[:, i : i + 7].shape[1])) for i in range(0, 40, 7)], 1
    )
    assert torch.allclose(whole, chunks, rtol=1e-5, atol=1e-4)


def test_works_inside_and_outside_inference_mode(stage):
    """A server may open sessions and step in any autograd mode (e.g. steps under torch.inference_mode)."""
    with torch.inference_mode():
        stage.open_session("a", 8)
    stage.open_session("b", 8)
    first = stage.step("a", hidden(2), positions(0, 2))
    with torch.inference_mode():
        assert torch.equal(stage.step("b", hidden(2), positions(0, 2)), first)
        stage.step("a", hidden(1), positions(2, 1))
    stage.step("b", hidden(1), positions(2, 1))
