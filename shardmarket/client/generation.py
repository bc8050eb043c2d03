"""The client's model: embeddings and LM head run locally (Head), every decoder layer on the remote route."""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncGenerator, Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from contextlib import aclosing
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

from shardmarket.chain.eip712 import Domain
from shardmarket.client.failures import RecentFailures
from shardmarket.client.routing import NodeInfo, RouteError, discover, plan_route
from shardmarket.client.session import (
    MAX_DRAFT_STEP,
    CommitmentSink,
    HopTiming,
    InferenceSession,
    Presign,
    StandingTab,
    TabSource,
)
from shardmarket.engine.head import Head
from shardmarket.engine.openmp import PASSIVE_OPENMP
from shardmarket.engine.sampling import CONFIRM, LAYERS, SamplingParams, generate, generation_steps
from shardmarket.engine.speculation import Drafter, PromptLookup, SpeculationStats, Speculator
from shardmarket.net.channel import ChannelPool

if TYPE_CHECKING:
    from shardmarket.chain.contracts import Market
    from shardmarket.client.audit import Auditor
    from shardmarket.client.directory import Discovery
    from shardmarket.client.payer import Payer

_DONE = object()
PROMPT_STEP = 256  # the engine's prefill step
PUSHED_PROMPT_STEP = 1024  # a node's default max_step_tokens


class GenerationCancelled(Exception):
    """The caller stopped reading; the generation thread stops at its next step."""


@dataclass
class Completion:
    """What one generation produced, for usage and finish reasons."""

    prompt_tokens: int
    tokens: list[int] = field(default_factory=list)
    failovers: int = 0
    cost: int = 0  # token units promised to the nodes for this request
    hop_timings: list[HopTiming] = field(default_factory=list)
    computed_positions: int = 0  # positions each hop computed (and billed): the prompt, kept tokens and rejected drafts
    speculation: SpeculationStats | None = None  # when the request drafted tokens


@dataclass(frozen=True)
class Privacy:
    """Who may see a request and whether nodes may see this client's address: the client's defaults, which a request can
    raise but not lower.

    `trusted` operators (addresses) alone serve a private request; `relay` (host:port of a relay that forwards) carries
    every connection to the nodes of a hidden request, so that no node sees where it came from."""

    trusted: frozenset[str] = frozenset()
    relay: str = ""
    private: bool = False  # every request is private
    hidden: bool = False  # every request goes through the relay

    @classmethod
    def of(cls, trusted: list[str], relay: str = "", private: bool = False, hidden: bool = False) -> Privacy:
        if hidden and not relay:
            raise ValueError("hiding this client's address needs a relay: set client.relay or pass --relay HOST:PORT")
        return cls(frozenset(address.lower() for address in trusted), relay, private, hidden)

    def session_options(self, private: bool | None, hidden: bool | None) -> dict:
        """The InferenceSession options of one request asking for `private` and `hidden` (None, False: the default)."""
        hidden = self.hidden or bool(hidden)
        if hidden and not self.relay:
            raise RouteError("this request asks to hide the client's address, but no relay is set (client.relay, --relay)")
        private = self.private or bool(private)
        return {"trusted": self.trusted if private else None, "relay": self.relay if hidden else None}


class RemoteModel:
    """Generates with a local Head and a remote pipeline chosen by routing over the known nodes."""

    def __init__(
        self,
        head: Head,
        model_id: str,
        nodes: list[NodeInfo],
        domain: Domain,
        *,
        transport: str = "tcp",
        step_timeout_s: float = 60.0,
        tab_source: TabSource | None = None,
        on_commitment: CommitmentSink | None = None,
        on_finished: Callable[[InferenceSession], None] | None = None,
        presign: Presign | None = None,
        standing_tab: StandingTab | None = None,
        push: bool = False,
        privacy: Privacy | None = None,
        max_draft: int = 0,
        drafter: Callable[[], Drafter] = PromptLookup,
    ) -> None:
        self.head, self.model_id, self.nodes, self.domain = head, model_id, nodes, domain
        self.push = push  # nodes send their outputs straight to the next hop (see InferenceSession)
        self.privacy = privacy or Privacy()
        # speculative decoding: up to `max_draft` tokens proposed by a fresh `drafter()` per request (0: none)
        if not 0 <= max_draft < MAX_DRAFT_STEP:
            raise ValueError(f"max_draft must be within 0..{MAX_DRAFT_STEP - 1} (0 turns speculation off), got {max_draft}")
        self.max_draft, self.drafter = max_draft, drafter
        self.transport, self.step_timeout_s, self.tab_source, self.presign = transport, step_timeout_s, tab_source, presign
        self.standing_tab = standing_tab
        self.on_commitment, self.on_finished = on_commitment, on_finished
        self.request_costs: dict[bytes, int] | None = None  # filled per request by a payer, when there is one
        self.failed = RecentFailures()
        self.channels = ChannelPool()  # connections to the nodes kept between requests
        self._threads = ThreadPoolExecutor(max_workers=64, thread_name_prefix="generate")
        self._streams = 0  # streams generating now
        # a paid model's payer, market and auditor (shardmarket.client.market.connect_paid sets them)
        self.payer: Payer | None = None
        self.market: Market | None = None
        self.auditor: Auditor | None = None
        # reads the nodes again (the chain's registry): a node that moved or joined is found when no route works
        self.refresh_nodes: Callable[[], Awaitable[list[NodeInfo]]] | None = None
        self.discovery: Discovery | None = None  # a paid model's, still probing nodes after the first route was found
        self.background: list[asyncio.Task] = []  # the client's own work beside the requests (reserves for new nodes)

    @classmethod
    async def connect(
        cls, checkpoint: Path, urls: list[str], domain: Domain, *, model_id: str | None = None, **kwargs
    ) -> RemoteModel:
        """Load the Head, measure the nodes, and check that some route covers every layer."""
        head = await in_passing_thread(Head.load, checkpoint)
        model_id = model_id or checkpoint.name
        privacy = kwargs.get("privacy")
        nodes = await discover(urls, model_id, relay=privacy.relay if privacy is not None else "")
        mismatched = [n.url for n in nodes if n.num_layers != head.num_layers]
        if mismatched:
            raise RouteError(f"nodes {mismatched} serve a model with a different layer count than {checkpoint}")
        model = cls(head, model_id, nodes, domain, **kwargs)
        plan_route(nodes, 0, head.num_layers, head.config.hidden_size * 4)
        return model

    async def aclose(self) -> None:
        """Stop the work in the background and close the connections kept to the nodes."""
        if self.discovery is not None:
            await self.discovery.aclose()
        for task in self.background:
            task.cancel()
        await asyncio.gather(*self.background, return_exceptions=True)
        await self.channels.close()

    def prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of a plain completion prompt."""
        return self.head.tokenizer.encode(prompt)

    def chat_ids(self, messages: list[dict]) -> list[int]:
        """Token ids of a chat, rendered with the model's chat template."""
        text = self.head.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        return self.head.tokenizer.encode(text, add_special_tokens=False)

    async def stream(
        self,
        prompt_ids: list[int],
        params: SamplingParams,
        completion: Completion,
        *,
        private: bool | None = None,
        hidden: bool | None = None,
    ) -> AsyncGenerator[int, None]:
        """Yield generated token ids as they come; the pipeline session is closed at the end. When no route works before
        the first token, the nodes are read again (`refresh_nodes`) and the request tried once more. `private` and
        `hidden` ask more of this request than `privacy`'s defaults."""
        options = self.privacy.session_options(private, hidden)
        try:
            async with aclosing(self._stream(prompt_ids, params, completion, options)) as tokens:
                async for token in tokens:
                    yield token
        except RouteError:
            if completion.tokens or self.refresh_nodes is None:
                raise
            self.nodes, self.failed = await self.refresh_nodes(), RecentFailures()
            async with aclosing(self._stream(prompt_ids, params, completion, options)) as tokens:
                async for token in tokens:
                    yield token

    async def _stream(
        self, prompt_ids: list[int], params: SamplingParams, completion: Completion, options: dict
    ) -> AsyncGenerator[int, None]:
        session = InferenceSession(
            self.nodes,
            self.head.num_layers,
            self.domain,
            max_length=len(prompt_ids) + params.max_tokens,
            transport=self.transport,
            step_timeout_s=self.step_timeout_s,
            tab_source=self.tab_source,
            failed=self.failed,
            on_commitment=self.on_commitment,
            presign=self.presign,
            pool=self.channels,
            standing_tab=self.standing_tab,
            push=self.push,
            **options,
        )
        here = PASSIVE_OPENMP and not self._streams  # a lone stream: its head runs on the event loop's thread
        speculator = Speculator(self.drafter(), self.max_draft) if self.max_draft else None
        self._streams += 1
        try:
            generating = self._generate_here if here else self._generate_in_thread
            async with aclosing(generating(session, prompt_ids, params, speculator)) as tokens:
                async for token in tokens:
                    completion.tokens.append(token)
                    yield token
        finally:
            self._streams -= 1
            completion.failovers = session.failovers
            if self.request_costs is not None:
                completion.cost = sum(self.request_costs.pop(request_id, 0) for request_id in session.request_ids)
            if self.on_finished is not None:
                self.on_finished(session)
            completion.hop_timings = session.timings
            completion.computed_positions = sum(hidden.shape[1] for _, hidden in session.hops[0].inputs) if session.hops else 0
            await session.close()
            if speculator is not None:
                completion.speculation = speculator.stats
                speculator.drafter.close()

    async def _generate_here(
        self, session: InferenceSession, prompt_ids: list[int], params: SamplingParams, speculator: Speculator | None
    ) -> AsyncGenerator[int, None]:
        """Generate on the event loop's thread: no hand-off to a generating thread and back per token (two thread
        wake-ups). The head then holds the loop for a few ms per token, which is fine while no other stream runs;
        OpenMP does not mind a second team with OMP_WAIT_POLICY=PASSIVE (see shardmarket/engine/openmp.py)."""
        steps = generation_steps(
            self.head, prompt_ids, params, chunk_size=self._prompt_step(), confirming=True, speculator=speculator
        )
        answer = None
        while True:
            try:
                step = steps.send(answer)
            except StopIteration:
                return
            if step[0] == LAYERS:
                answer = await session.start_layers(*step[1])
            elif step[0] == CONFIRM:  # the last hop's commitment is checked now (the head held the loop); a check
                answer = await session.confirm(step[1])  # already done is awaited without a turn of the loop
            else:
                answer = None
                yield step[1]

    async def _generate_in_thread(
        self, session: InferenceSession, prompt_ids: list[int], params: SamplingParams, speculator: Speculator | None
    ) -> AsyncGenerator[int, None]:
        """Generate on a thread of its own, so that concurrent streams' heads run side by side and never hold the loop."""
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def run_layers(hidden, positions):
            if cancelled.is_set():
                raise GenerationCancelled()
            return asyncio.run_coroutine_threadsafe(session.start_layers(hidden, positions), loop).result()

        def confirm(hidden):  # the last hop's commitment was checked while the head picked the token
            if session.confirmed():
                return hidden
            return asyncio.run_coroutine_threadsafe(session.confirm(hidden), loop).result()

        def produce() -> None:
            try:
                for token in generate(
                    self.head,
                    run_layers,
                    prompt_ids,
                    params,
                    chunk_size=self._prompt_step(),
                    confirm=confirm,
                    speculator=speculator,
                ):
                    loop.call_soon_threadsafe(queue.put_nowait, token)
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)
            except BaseException as exc:  # handed to the consumer, which re-raises it
                loop.call_soon_threadsafe(queue.put_nowait, exc)

        worker = loop.run_in_executor(self._threads, produce)
        try:
            while (item := await queue.get()) is not _DONE:
                if isinstance(item, BaseException):
                    raise item
                yield item
        finally:
            cancelled.set()
            await asyncio.shield(worker)

    def _prompt_step(self) -> int:
        """Prompt positions handed to the session at once: a pushing route takes a whole prompt up to the nodes' usual
        step limit and pipelines it in chunks of its own (see InferenceSession), a relaying one takes the engine's."""
        return PUSHED_PROMPT_STEP if self.push else PROMPT_STEP


async def in_passing_thread(fn, *args):
    """Run `fn` in a thread that ends afterwards: its OpenMP team goes with it, so that only the threads that generate
    hold one (see shardmarket/engine/openmp.py)."""
    executor = ThreadPoolExecutor(max_workers=1)
    try:
        return await asyncio.get_running_loop().run_in_executor(executor, fn, *args)
    finally:
        executor.shutdown(wait=True)
