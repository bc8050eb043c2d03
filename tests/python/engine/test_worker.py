"""A node's compute queue under many sessions: a long prefill is computed in chunks with the waiting decode steps run
between them, its output the same as in one piece, and every session keeps its turn."""

from __future__ import annotations

import asyncio

import torch

from shardmarket.engine.stage import Stage
from shardmarket.server.worker import StageWorker

HIDDEN = 64


def _stage(checkpoint) -> Stage:
    return Stage.load(checkpoint, 0, 5)


def _open(stage: Stage, session_id: str, prompt: int, gen: torch.Generator) -> None:
    stage.open_session(session_id, 512)
    stage.step(session_id, torch.randn(1, prompt, HIDDEN, generator=gen), torch.arange(prompt)[None])


async def _decode(worker: StageWorker, session_id: str, start: int, steps: int, done: list[str]) -> None:
    for position in range(start, start + steps):
        await worker.step(session_id, torch.randn(1, 1, HIDDEN), torch.tensor([[position]]))
        done.append(session_id)


def test_decode_steps_run_between_the_chunks_of_a_long_prefill(tiny_checkpoints):
    """A 480-token prefill arrives first, then two sessions decode: their steps are answered between the prefill's 64-token
    chunks, not after the whole prompt, and the chunked prefill's output equals the one computed in one piece."""
    stage, reference = _stage(tiny_checkpoints["llama"]), _stage(tiny_checkpoints["llama"])
    gen = torch.Generator().manual_seed(5)
    for session_id in ("a", "b"):
        _open(stage, session_id, 4, gen)
    prompt = torch.randn(1, 480, HIDDEN, generator=gen)
    positions = torch.arange(480)[None]
    stage.open_session("long", 512)
    reference.open_session("long", 512)
    expected = reference.step("long", prompt, positions)

    async def go() -> tuple[torch.Tensor, int]:
        worker = StageWorker(stage, prefill_chunk=64)
        worker.start()
        done: list[str] = []
        prefill = asyncio.create_task(worker.step("long", prompt, positions))
        await asyncio.sleep(0)  # the prefill is queued first
        decoding = [asyncio.create_task(_decode(worker, s, 4, 6, done)) for s in ("a", "b")]
        output, _ = await prefill
        before = len(done)
        await asyncio.gather(*decoding)
        await worker.stop()
        return output, before

    output, decoded_before = asyncio.run(go())
    assert decoded_before >= 6  # of the 12 decode steps, most were answered while the 8-chunk prefill ran
    assert torch.allclose(output, expected, rtol=1e-4, atol=1e-4)


def test_every_session_keeps_its_turn_under_decode_and_prefill_load(tiny_checkpoints):
    """Four sessions decode 20 steps each while other sessions send 256-token prompts one after another: the decoding
    sessions move in lockstep (batched together), and the prompts are not starved by them."""
    stage = _stage(tiny_checkpoints["llama"])
    gen = torch.Generator().manual_seed(6)
    decoders = [f"d{i}" for i in range(4)]
    for session_id in decoders:
        _open(stage, session_id, 3, gen)
    prompts = [f"p{i}" for i in range(20)]
    for session_id in prompts:
        stage.open_session(session_id, 512)

    async def go() -> tuple[list[str], int]:
        worker = StageWorker(stage, prefill_chunk=64)
        worker.start()
        done: list[str] = []
        prefilled = 0

        async def prefilling() -> None:
            nonlocal prefilled
            for session_id in prompts:
                await worker.step(session_id, torch.randn(1, 256, HIDDEN), torch.arange(256)[None])
                prefilled += 1

        prefill = asyncio.create_task(prefilling())
        await asyncio.sleep(0)
        await asyncio.gather(*(_decode(worker, s, 3, 20, done) for s in decoders))
        during = prefilled
        prefill.cancel()
        await asyncio.gather(prefill, return_exceptions=True)
        await worker.stop()
        return done, during

    done, prefilled = asyncio.run(go())
    for end in range(len(done)):
        counts = [done[: end + 1].count(s) for s in decoders]
        assert max(counts) - min(counts) <= 1, f"after {end + 1} decode steps the sessions stood at {counts}"
    assert len(done) == 80
    assert prefilled >= 2  # the prompts went on between the decode rounds
