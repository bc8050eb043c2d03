"""Runs a Stage off the event loop on its one compute thread, with concurrent decode steps batched together, and a
long prefill cut into chunks with the waiting decode steps run between them (a 2,000-token prompt must not stall every
other session's next token for its whole length).

A lone session's decode step (one token, or a few when the client speculates) skips the queue;
`shardmarket.engine.openmp` says on which thread it runs.
"""

from __future__ import annotations

import asyncio
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import torch

from shardmarket.engine.openmp import PASSIVE_OPENMP
from shardmarket.engine.stage import Stage

FAST_STEP_TOKENS = 16  # a lone session's steps up to this long skip the queue: decode steps, with a draft or not


@dataclass
class _Work:
    session_id: str
    hidden: torch.Tensor
    positions: torch.Tensor
    done: asyncio.Future | None
    parts: list[torch.Tensor] = field(default_factory=list)  # outputs of a prefill's chunks computed so far
    elapsed: float = 0.0  # compute seconds of those chunks

    @property
    def decode(self) -> bool:
        """A decode step (one position, batched with the others); the last position of a chunked prefill is none."""
        return self.hidden.shape[1] == 1 and not self.parts


PREFILL_CHUNK = 128  # positions of a prefill computed at a time: decode steps wait at most one chunk's time


def compute_thread(threads: int | None = None) -> ThreadPoolExecutor:
    """The thread that will run every torch operation of this process (`threads` intra-op threads if given)."""
    executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="stage")
    if threads:
        executor.submit(torch.set_num_threads, threads).result()
    return executor


class StageWorker:
    """Queues steps for one Stage and runs them one batch at a time on the compute thread: decode steps (T == 1)
    waiting together run as one `step_batch`. With one session open there is nothing to batch with: its decode
    steps go to the compute thread at once, without the queue's two turns of the event loop."""

    def __init__(
        self,
        stage: Stage,
        max_batch: int = 32,
        executor: ThreadPoolExecutor | None = None,
        prefill_chunk: int = PREFILL_CHUNK,
    ) -> None:
        self.stage = stage
        self.max_batch = max_batch
        self.prefill_chunk = prefill_chunk
        self._queue: asyncio.Queue[_Work] = asyncio.Queue()
        self._executor = executor or compute_thread()
        self._task: asyncio.Task | None = None
        self._running = False  # a batch is being computed
        self.decode_ms = 0.0  # moving average of one decode step's compute time

    def warm_up(self, steps: int = 4) -> None:
        """Run a few decode steps of a throwaway session, so the first client is fast and `decode_ms` is known."""
        session_id = "warm-up"
        self.stage.open_session(session_id, steps)
        try:
            hidden = torch.zeros(1, 1, self.stage.hidden_size, dtype=self.stage.dtype)
            timings = []
            for position in range(steps):
                started = time.perf_counter()
                with torch.inference_mode():
                    self.stage.step(session_id, hidden, torch.tensor([[position]]))
                timings.append((time.perf_counter() - started) * 1000)
            self.decode_ms = min(timings[1:] or timings)
        finally:
            self.stage.close_session(session_id)

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
        self._executor.shutdown(wait=True)

    @property
    def queued(self) -> int:
        return self._queue.qsize()

    async def step(self, session_id: str, hidden: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, float]:
        """Run this stage's layers on `hidden`; returns the output and the seconds the layers took (its batch's)."""
        fast = hidden.shape[1] <= FAST_STEP_TOKENS
        if fast and not self._running and self._queue.empty() and len(self.stage.session_ids()) == 1:
            self._running = True
            try:
                work = [_Work(session_id, hidden, positions, None)]
                outputs, elapsed = self._compute(work) if PASSIVE_OPENMP else await self.call(self._compute, work)
            finally:
                self._running = False
            if hidden.shape[1] == 1:
                self._timed_decode(elapsed)
            return outputs[0], elapsed
        done = asyncio.get_running_loop().create_future()
        self._queue.put_nowait(_Work(session_id, hidden, positions, done))
        return await done

    async def call(self, fn, *args):
        """Run `fn(*args)` on the compute thread (session open/close must not race a step)."""
        return await asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    async def _run(self) -> None:
        while True:
            first = await self._queue.get()
            batch = [first]
            if first.decode:
                held: list[_Work] = []
                while not self._queue.empty() and len(batch) < self.max_batch:
                    item = self._queue.get_nowait()
                    (batch if item.decode else held).append(item)
                for item in held:  # prefill steps wait for the next round, in order
                    self._queue.put_nowait(item)
            elif first.parts or first.hidden.shape[1] > self.prefill_chunk:
                await self._prefill_chunk(first)
                continue
            computed = await self._execute(batch, batch)
            if computed is None:
                continue
            outputs, elapsed = computed
            if first.decode:
                self._timed_decode(elapsed)
            for item, output in zip(batch, outputs, strict=True):
                if item.done is not None and not item.done.done():
                    item.done.set_result((output, elapsed))

    async def _prefill_chunk(self, item: _Work) -> None:
        """Compute the first chunk of a long prefill and queue the rest behind the steps waiting now: each waiting
        decode batch and each other prefill gets a turn before its next chunk."""
        size = self.prefill_chunk
        chunk = _Work(item.session_id, item.hidden[:, :size], item.positions[:, :size], None)
        computed = await self._execute([chunk], [item])
        if computed is None:
            return
        outputs, elapsed = computed
        rest = _Work(item.session_id, item.hidden[:, size:], item.positions[:, size:], item.done, [*item.parts, outputs[0]])
        rest.elapsed = item.elapsed + elapsed
        if rest.hidden.shape[1]:
            self._queue.put_nowait(rest)
        elif item.done is not None and not item.done.done():
            item.done.set_result((torch.cat(rest.parts, dim=1), rest.elapsed))

    async def _execute(self, batch: list[_Work], waiting: list[_Work]) -> tuple[list[torch.Tensor], float] | None:
        """Compute `batch` on the engine's thread: its outputs and the seconds it took, or None after an engine error,
        which goes back to each step of `waiting`."""
        self._running = True
        try:
            return await self.call(self._compute, batch)
        except Exception as exc:  # engine errors go back to each waiting step
            for item in waiting:
                if item.done is not None and not item.done.done():
                    item.done.set_exception(exc)
            return None
        finally:
            self._running = False

    def _timed_decode(self, elapsed: float) -> None:
        elapsed_ms = elapsed * 1000
        self.decode_ms = elapsed_ms if not self.decode_ms else 0.8 * self.decode_ms + 0.2 * elapsed_ms

    def _compute(self, batch: list[_Work]) -> tuple[list[torch.Tensor], float]:
        started = time.perf_counter()
        with torch.inference_mode():
            if len(batch) == 1:
                item = batch[0]
                outputs = [self.stage.step(item.session_id, item.hidden, item.positions)]
            else:
                outputs = self.stage.step_batch([(w.session_id, w.hidden, w.positions) for w in batch])
        return outputs, time.perf_counter() - started
