"""An inference session across a route of nodes that survives a node dying mid-generation.

The client keeps every input it sent to each hop. When a node fails (connection lost, timeout, error
frame, wrong shape), the hop's inputs are replayed in order to a replacement route for the same layers,
which rebuilds the same KV cache, and the step is retried there: the output is the same as an undisturbed
run. A node answers a step with its result, then its signed commitment to it: the result goes on to the next
hop at once and the commitment is checked while that hop works; a bad one redoes the whole step on a new
request, every hop's answered steps replayed, with the forger routed around. The client checks each commitment
against the context it rebuilds itself: the node's model and layers as registered, the session nonce the node
named when the session opened, the step, its position and the hash chain of every input it sent that hop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import overload

import torch
from eth_utils import keccak

from shardmarket.chain.commitment import CommitmentError, SignedCommitment, check_commitment
from shardmarket.chain.eip712 import EMPTY_HISTORY, Domain, StepContext, chain_history, chain_rollback, tensor_hash
from shardmarket.client.failures import RecentFailures
from shardmarket.client.routing import NodeInfo, RouteError, plan_route
from shardmarket.engine.tensors import tensor_bytes
from shardmarket.net import wire
from shardmarket.net.channel import ChannelPool, SecureChannel, client_handshake, close_quietly, open_transport
from shardmarket.net.crypto import DecryptError
from shardmarket.net.wire import Message, WireError

log = logging.getLogger("shardmarket.client")

# tab_source([(node, tokens), ...], request_id) -> the client's signed tab raising each node's entry by its cost, or None
TabSource = Callable[[list[tuple[NodeInfo, int]], bytes], bytes | None]
# presign([(node, tokens), ...]): sign ahead the tab that tab_source would sign for those charges (see Payer.presign)
Presign = Callable[[list[tuple[NodeInfo, int]]], None]
# on_commitment(node, signed commitment, tokens): called for every verified answer (usage records, spot checks)
CommitmentSink = Callable[[NodeInfo, SignedCommitment, int], None]
# standing_tab(node) -> the client's newest signed tab, promising nothing new: it rides on OPEN to name who pays
StandingTab = Callable[[NodeInfo], bytes]


class NodeFailure(Exception):
    """A node did not answer a step correctly; the session replaces it."""


class RequestRefused(NodeFailure):
    """A node refused the request itself (wire.REQUEST_FAULTS: too long for the model's context, a step larger than it
    takes, a wrong shape). No node is at fault, so none is avoided by other requests; this one tries the other nodes
    (a node could blame good requests to shed them) and raises this once none is left."""

    def __init__(self, node: NodeInfo, code: str, message: str) -> None:
        super().__init__(f"node {node.url} refused the request ({code}): {message}")
        self.code = code


def _refusal(node: NodeInfo, reply: Message, what: str) -> NodeFailure:
    """The exception for an error frame: RequestRefused when it names the request as the cause, else NodeFailure."""
    code, message = reply.fields.get("code"), reply.fields.get("message")
    if isinstance(code, str) and code in wire.REQUEST_FAULTS:
        return RequestRefused(node, code, str(message))
    return NodeFailure(f"node {node.url} refused {what}: {message}")


class CommitmentFailure(Exception):
    """A hop's answer was passed on before its commitment was checked, and the commitment is bad."""

    def __init__(self, node: NodeInfo, message: str) -> None:
        super().__init__(message)
        self.node = node


KEPT_OPEN_TIMEOUT_S = 5.0  # for OPEN on a kept channel; then a new connection is tried
MAX_DRAFT_STEP = 16  # positions of the longest speculative step (the last token and its draft)

# everything that means "this node failed this step": the session routes around the node
HOP_ERRORS = (NodeFailure, ConnectionError, OSError, asyncio.TimeoutError, WireError, DecryptError)


@dataclass(frozen=True)
class HopTiming:
    """One step through one node: wall time seen by the client and the node's reported compute time."""

    url: str
    tokens: int
    wall_s: float
    compute_s: float


@dataclass
class Hop:
    """One node of the route, its open channel and session, and every input sent to it (for replay)."""

    node: NodeInfo
    channel: SecureChannel
    nonce: bytes  # the session nonce the node chose: every commitment of this session names it
    inputs: list[tuple[int, torch.Tensor]] = field(default_factory=list)  # (position, hidden) per step
    outputs: list[torch.Tensor] = field(default_factory=list)  # the node's answer per step (for spot checks)
    history: bytes = EMPTY_HISTORY  # chain_history over the hashes of every input answered so far
    next_position: int = 0  # where the node's KV cache ends

    def context(self, request_id: bytes, step: int, position: int, input_hash: bytes) -> StepContext:
        """The context the node must commit to for the next step: its model and layers, this session, its history (with
        the rollback a step starting before `next_position` makes)."""
        node = self.node
        history = self.history if position >= self.next_position else chain_rollback(self.history, position)
        return StepContext(
            keccak(text=node.model_id), node.start, node.end, request_id, self.nonce, step, position, history, input_hash
        )

    def answered(self, context: StepContext, tokens: int) -> None:
        """Take an answered step of `tokens` positions into the session's history."""
        self.history = chain_history(context.history_hash, context.input_hash)
        self.next_position = context.position + tokens


class InferenceSession:
    """One request's pipeline: `run_layers(hidden, positions)` runs every layer on the remote route."""

    def __init__(
        self,
        nodes: list[NodeInfo],
        num_layers: int,
        domain: Domain,
        *,
        max_length: int,
        transport: str = "tcp",
        step_timeout_s: float = 60.0,
        max_failovers: int = 4,
        tab_source: TabSource | None = None,
        failed: RecentFailures | None = None,
        on_commitment: CommitmentSink | None = None,
        presign: Presign | None = None,
        pool: ChannelPool | None = None,
        standing_tab: StandingTab | None = None,
    ) -> None:
        self.nodes, self.num_layers, self.domain = nodes, num_layers, domain
        self.pool = pool  # channels kept open between requests (shared between sessions)
        self.reused_channels = 0  # hops opened on a kept channel
        self.max_length, self.transport, self.step_timeout_s = max_length, transport, step_timeout_s
        self.max_failovers, self.tab_source, self.on_commitment = max_failovers, tab_source, on_commitment
        self.presign, self.standing_tab = presign, standing_tab
        self.failed = failed if failed is not None else RecentFailures()  # shared between sessions
        self.refusals: dict[str, RequestRefused] = {}  # node URL -> its refusal of this request (set aside for it alone)
        self.request_id = os.urandom(32)
        self.request_ids = [self.request_id]  # a new one per restart after a bad commitment
        self.hops: list[Hop] = []
        self.commitments: list[tuple[str, SignedCommitment]] = []  # (node URL, commitment): evidence for disputes
        self.failovers = 0
        self.timings: list[HopTiming] = []
        self.tab: bytes | None = None  # the client's newest signed tab: it rides on every step of every hop
        # the step `start_layers` returned before its last commitment was checked: (check, hidden, positions, answered)
        self._unconfirmed: tuple[asyncio.Future | None, torch.Tensor, torch.Tensor, int] | None = None

    def _payload_bytes(self) -> int:
        return self.nodes[0].hidden_size * 4 if self.nodes else 0

    def _plan(self, start: int, end: int) -> list[NodeInfo]:
        """The cheapest route over [start, end) around the nodes that failed lately and those that refused this request;
        when none is left and some node refused the request, that refusal is the answer."""
        try:
            return plan_route(self.nodes, start, end, self._payload_bytes(), self.failed.current() | self.refusals.keys())
        except RouteError:
            if self.refusals:
                raise next(iter(self.refusals.values())) from None
            raise

    async def open(self) -> None:
        """Plan the route over live nodes and open a session on each hop."""
        while True:
            route = self._plan(0, self.num_layers)
            try:
                self.hops = await self._open_hops(route)
                return
            except NodeFailure:
                continue  # the failing node is now excluded; plan again

    async def _open_hops(self, route: list[NodeInfo]) -> list[Hop]:
        """Open a session on every node of `route` at once (one round of connects and handshakes, not one per hop);
        if any fails, the sessions opened on the others are closed and every failed node is marked."""
        results = await asyncio.gather(*(self._open_hop(node) for node in route), return_exceptions=True)
        hops = [result for result in results if isinstance(result, Hop)]
        failed = [(node, result) for node, result in zip(route, results, strict=True) if not isinstance(result, Hop)]
        if not failed:
            return hops
        await self._close_sessions(hops)
        for node, exc in failed:
            if not isinstance(exc, HOP_ERRORS):
                raise exc
            self._mark_failed(node, exc)
        node, exc = failed[0]
        raise NodeFailure(f"cannot open a session on {node.url}: {exc}")

    async def _open_hop(self, node: NodeInfo) -> Hop:
        if self.pool is not None:
            while (channel := await self.pool.take(self._pool_key(node))) is not None:
                try:  # a kept connection that went dead without a word must not cost a whole step timeout
                    hop = await self._open_session(node, channel, min(self.step_timeout_s, KEPT_OPEN_TIMEOUT_S))
                    self.reused_channels += 1
                    return hop
                except (TimeoutError, ConnectionError, OSError, WireError, DecryptError):
                    await close_quietly(channel)  # the node dropped this kept connection meanwhile
        transport = await open_transport(node.url, self.transport, node.tcp_port, wire.DEFAULT_LIMITS, self.step_timeout_s)
        try:
            channel = await asyncio.wait_for(client_handshake(transport, node.x25519_public_key), self.step_timeout_s)
        except BaseException:
            await transport.close()
            raise
        return await self._open_session(node, channel, self.step_timeout_s)

    async def _open_session(self, node: NodeInfo, channel: SecureChannel, timeout_s: float) -> Hop:
        fields: dict = {"max_length": self.max_length}
        tab = self.tab or (self.standing_tab(node) if self.standing_tab is not None else None)
        if tab is not None:  # names who pays: a paid node opens sessions for strangers only sparingly
            fields["tab"] = tab
        try:
            await channel.send(Message(wire.OPEN, self.request_id, 0, fields))
            reply = await asyncio.wait_for(channel.recv(), timeout_s)
        except BaseException:
            await channel.close()
            raise
        if reply.type == wire.ERROR:
            await channel.close()
            raise _refusal(node, reply, "the session")
        if reply.type != wire.OPENED:
            await channel.close()
            raise NodeFailure(f"node {node.url} answered open with a {reply.type} frame")
        nonce = reply.fields.get("nonce")
        if not isinstance(nonce, bytes) or len(nonce) != 32:
            await channel.close()
            raise NodeFailure(f"node {node.url} opened the session without a 32-byte session nonce")
        return Hop(node, channel, nonce)

    def _pool_key(self, node: NodeInfo) -> tuple:
        return node.url, self.transport, node.tcp_port, node.x25519_public_key

    async def run_layers(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Send `hidden` [1, T, H] at absolute `positions` [1, T] through every hop; returns the last hop's output,
        every commitment checked."""
        return await self.confirm(await self.start_layers(hidden, positions))

    async def start_layers(self, hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """`run_layers`, returning as soon as the last hop's output is in: its commitment is checked meanwhile, and
        `confirm` must follow before the output is used for anything that cannot be taken back (an earlier step
        still unconfirmed is confirmed first)."""
        if self._unconfirmed is not None:
            await self.confirm(None)
        if not self.hops:
            await self.open()
        position = int(positions[0, 0])
        while True:
            answered = len(self.hops[0].inputs)
            try:
                output, unchecked = await self._run_step(hidden, position)
            except CommitmentFailure as exc:
                await self._restart(answered, exc)
                continue
            check = (
                None
                if unchecked is None and self.presign is None
                else asyncio.ensure_future(self._after_step(unchecked, hidden.shape[1]))
            )
            self._unconfirmed = (check, hidden, positions, answered)
            return output

    @overload
    async def confirm(self, output: torch.Tensor) -> torch.Tensor: ...

    @overload
    async def confirm(self, output: None) -> torch.Tensor | None: ...

    async def confirm(self, output: torch.Tensor | None) -> torch.Tensor | None:
        """The output of the step `start_layers` returned, once the last hop's commitment checks out: `output` itself,
        or, when the commitment is bad, the output of the step redone on a route around that node."""
        if self._unconfirmed is None:
            return output
        check, hidden, positions, answered = self._unconfirmed
        self._unconfirmed = None
        if check is None:
            return output
        try:
            await check
            return output
        except CommitmentFailure as exc:
            await self._restart(answered, exc)
            return await self.run_layers(hidden, positions)

    def confirmed(self) -> bool:
        """Whether the step `start_layers` returned is confirmed already (its check passed while its output was being
        used): then `confirm` is not needed, and the generating thread saves a turn of the event loop. Safe from that
        thread: only the loop finishes the check, and only that thread drives steps."""
        if self._unconfirmed is None:
            return True
        check = self._unconfirmed[0]
        if check is None or (check.done() and not check.cancelled() and check.exception() is None):
            self._unconfirmed = None
            return True
        return False

    async def _run_step(self, hidden: torch.Tensor, position: int) -> tuple[torch.Tensor, _CommitmentCheck | None]:
        self.pay([(hop.node, hidden.shape[1]) for hop in self.hops])
        index, unchecked = 0, None
        while index < len(self.hops):
            hop = self.hops[index]
            try:
                output, check = await self._step(hop, len(hop.inputs), position, hidden, unchecked)
            except HOP_ERRORS as exc:
                await self._replace(index, exc, hidden.shape[1])
                continue  # retry this step on the replacement hop(s)
            hop.inputs.append((position, hidden))
            hop.outputs.append(output)
            hidden, unchecked = output, check
            index += 1
        return hidden, unchecked  # the last hop's commitment: checked before the output is used (`confirm`)

    async def _after_step(self, unchecked: _CommitmentCheck | None, tokens: int) -> None:
        """What follows a step of `tokens` positions while its output is being used: the next decode step's tab is signed
        ahead (while the last node signs its commitment), then the last hop's commitment is checked. A speculative
        step is guessed to be followed by one as long; a prefill chunk by a one-token step."""
        if self.presign is not None:
            self.presign([(hop.node, tokens if tokens <= MAX_DRAFT_STEP else 1) for hop in self.hops])
        if unchecked is not None:
            await unchecked()

    async def _step(
        self, hop: Hop, step: int, position: int, hidden: torch.Tensor, previous: _CommitmentCheck | None
    ) -> tuple[torch.Tensor, _CommitmentCheck]:
        """Run one step on `hop`; the previous hop's commitment is checked while this node works."""
        node = hop.node
        dtype = wire.DTYPES[node.dtype]
        if previous is not None and previous.reply.tensor is not None and previous.reply.tensor.dtype == dtype:
            # `hidden` came as these bytes: send them on
            sent, payload = previous.reply.tensor, previous.reply.payload
        else:
            sent = hidden if hidden.dtype == dtype else hidden.to(dtype)
            payload = tensor_bytes(sent)
        fields = self._fields(position)
        started = time.perf_counter()
        await hop.channel.send(Message(wire.STEP, self.request_id, step, fields, sent, payload))
        context = hop.context(self.request_id, step, position, tensor_hash(payload))
        if previous is not None:
            await previous()
        async with asyncio.timeout(self.step_timeout_s):
            reply = await hop.channel.recv()
        output = self._check_answer(hop, reply, step, sent)
        hop.answered(context, sent.shape[1])
        self.timings.append(
            HopTiming(node.url, hidden.shape[1], time.perf_counter() - started, reply.fields.get("compute_us", 0) / 1e6)
        )
        return output, _CommitmentCheck(self, hop, reply, context, hidden.shape[1])

    def pay(self, charges: list[tuple[NodeInfo, int]]) -> None:
        """Sign the tab that raises each (node, tokens) of `charges` by its cost, before those steps are sent."""
        if self.tab_source is not None:
            self.tab = self.tab_source(charges, self.request_id) or self.tab

    def _fields(self, position: int) -> dict:
        """A step's fields: its position and, when the client pays, its newest tab."""
        return {"position": position} if self.tab is None else {"position": position, "tab": self.tab}

    def _check_answer(self, hop: Hop, reply: Message, step: int, sent: torch.Tensor) -> torch.Tensor:
        """The answer's tensor, if the frame is the result of this step with the right shape (the commitment aside)."""
        node = hop.node
        if reply.type == wire.ERROR:
            raise _refusal(node, reply, f"step {step}")
        if reply.type != wire.RESULT or reply.step != step or reply.session != self.request_id:
            raise NodeFailure(f"node {node.url} answered step {step} with a {reply.type} frame for step {reply.step}")
        if reply.tensor is None or reply.tensor.shape != sent.shape or reply.tensor.dtype != sent.dtype:
            got = None if reply.tensor is None else (list(reply.tensor.shape), reply.tensor.dtype)
            raise NodeFailure(
                f"node {node.url} answered step {step} with a wrong shape: {got}, expected {list(sent.shape)} {sent.dtype}"
            )
        return reply.tensor if reply.tensor.dtype == torch.float32 else reply.tensor.to(torch.float32)

    def _mark_failed(self, node: NodeInfo, reason: BaseException) -> None:
        """Route around `node`: for every request a while, or for this one alone when it refused the request itself."""
        if isinstance(reason, RequestRefused):
            log.info("%s; trying another node for this request", reason)
            self.refusals[node.url] = reason
            return
        log.warning("node %s failed (%s); routing around it", node.url, reason or type(reason).__name__)
        self.failed.add(node.url)

    async def _replace(self, index: int, reason: BaseException, tokens: int) -> None:
        """Swap hop `index` for a new route over the same layers, replay its inputs there and pay the new hops for
        the current step (`tokens`)."""
        old = self.hops[index]
        self._mark_failed(old.node, reason)
        await self._drop_hops([old])
        self.failovers += 1
        new_hops = await self._rebuild(old, old.inputs, reason)
        log.info("replaced %s by %s after replaying %d step(s)", old.node.url, [h.node.url for h in new_hops], len(old.inputs))
        self.hops[index : index + 1] = new_hops
        self.pay([(hop.node, tokens) for hop in new_hops])

    async def _restart(self, answered: int, failure: CommitmentFailure) -> None:
        """Redo the current step on a new request id: every hop's `answered` steps replayed on a route around the
        node whose commitment was bad (the step's output already went on to the next hop, so all hops start over)."""
        self._mark_failed(failure.node, failure)
        old = self.hops
        await self._drop_hops(old)
        self.request_id = os.urandom(32)
        self.request_ids.append(self.request_id)
        self.failovers += 1
        hops: list[Hop] = []
        for hop in old:
            hops += await self._rebuild(hop, hop.inputs[:answered], failure)
        self.hops = hops
        log.info("restarted the request after a bad commitment from %s, replaying %d step(s)", failure.node.url, answered)

    async def _rebuild(self, old: Hop, inputs: list[tuple[int, torch.Tensor]], reason: BaseException) -> list[Hop]:
        """A new route over `old`'s layers, opened and with `inputs` replayed; retried while nodes fail."""
        while True:
            if self.failovers > self.max_failovers:
                if isinstance(reason, RequestRefused):
                    raise reason
                raise RouteError(f"gave up after {self.max_failovers} fail-overs; last failure: {reason}")
            try:
                route = self._plan(old.node.start, old.node.end)
            except RouteError as exc:
                raise RouteError(f"{exc}; the last failure: {reason}") from None
            try:
                new_hops = await self._open_hops(route)
                await self._replay(new_hops, inputs)
                return new_hops
            except NodeFailure as exc:
                reason = exc
                self.failovers += 1

    async def _replay(self, hops: list[Hop], inputs: list[tuple[int, torch.Tensor]]) -> None:
        """Send every earlier input through `hops`, pipelined per hop; a hop that fails is marked and all are closed."""
        for hop in hops:
            try:
                inputs = await self._replay_hop(hop, inputs)
            except HOP_ERRORS as exc:
                self._mark_failed(hop.node, exc)
                await asyncio.gather(self._drop_hops([hop]), self._close_sessions([h for h in hops if h is not hop]))
                if isinstance(exc, RequestRefused):
                    raise
                raise NodeFailure(f"replay on {hop.node.url} failed: {exc}") from None

    async def _replay_hop(self, hop: Hop, inputs: list[tuple[int, torch.Tensor]]) -> list[tuple[int, torch.Tensor]]:
        """Send `inputs` through `hop` pipelined, paid by one tab covering all of them."""
        self.pay([(hop.node, sum(hidden.shape[1] for _, hidden in inputs))])
        sent = []
        for step, (position, hidden) in enumerate(inputs):
            tensor = hidden.to(wire.DTYPES[hop.node.dtype]).contiguous()
            payload = tensor_bytes(tensor)
            fields = self._fields(position)
            await hop.channel.send(Message(wire.STEP, self.request_id, step, fields, tensor, payload))
            sent.append((tensor, payload))
        outputs = []
        for step, (tensor, payload) in enumerate(sent):
            async with asyncio.timeout(self.step_timeout_s):
                reply = await hop.channel.recv()
            output = self._check_answer(hop, reply, step, tensor)
            context = hop.context(self.request_id, step, inputs[step][0], tensor_hash(payload))
            hop.answered(context, tensor.shape[1])
            try:
                await _CommitmentCheck(self, hop, reply, context, tensor.shape[1])()
            except CommitmentFailure as exc:
                raise NodeFailure(str(exc)) from None
            outputs.append((inputs[step][0], output))
        hop.inputs = list(inputs)
        hop.outputs = [output for _, output in outputs]
        return outputs

    async def close(self) -> None:
        """Close the session on every hop (best effort); with a pool, a channel whose session closed cleanly is kept
        for the next request."""
        if self._unconfirmed is not None and self._unconfirmed[0] is not None:
            self._unconfirmed[0].cancel()  # nobody will use that output (its commitment frame may stay unread)
            await asyncio.gather(self._unconfirmed[0], return_exceptions=True)
        self._unconfirmed = None
        await self._close_sessions(self.hops)
        self.hops = []

    async def _close_sessions(self, hops: list[Hop]) -> None:
        """Close the session on each of `hops` with CLOSE, all at once; a channel whose session closed cleanly is kept in
        the pool (if any), others are closed."""

        async def close_session(hop: Hop) -> None:
            try:
                await hop.channel.send(Message(wire.CLOSE, self.request_id))
                reply = await asyncio.wait_for(hop.channel.recv(), 2.0)
            except (TimeoutError, ConnectionError, OSError, WireError, DecryptError, ValueError):
                reply = None
            # a node answers a channel's frames in order: after this CLOSED nothing more is on its way
            if self.pool is not None and reply is not None and reply.type == wire.CLOSED and reply.session == self.request_id:
                await self.pool.keep(self._pool_key(hop.node), hop.channel)
            else:
                await close_quietly(hop.channel)

        await asyncio.gather(*(close_session(hop) for hop in hops))

    @staticmethod
    async def _drop_hops(hops: list[Hop]) -> None:
        """Hang up on `hops` (nodes that failed): the node closes a connection's sessions with it."""
        await asyncio.gather(*(close_quietly(hop.channel) for hop in hops))


class _CommitmentCheck:
    """Reads the commitment frame that follows an answer and checks it (once), recording it; raises
    CommitmentFailure if it is missing or bad."""

    def __init__(self, session: InferenceSession, hop: Hop, reply: Message, context: StepContext, tokens: int) -> None:
        self.session, self.hop, self.reply, self.context, self.tokens = session, hop, reply, context, tokens
        self.done = False

    async def __call__(self) -> None:
        if self.done:
            return
        self.done = True
        session, node, step = self.session, self.hop.node, self.context.step
        try:
            async with asyncio.timeout(session.step_timeout_s):
                frame = await self.hop.channel.recv()
            if frame.type == wire.ERROR:  # e.g. the tab this step ran on credit with was refused
                raise CommitmentError(f"step {step} was refused after its answer: {frame.fields.get('message')}")
            if frame.type != wire.COMMIT or frame.step != step or frame.session != self.context.request_id:
                raise CommitmentError(f"step {step}: expected its commitment, got a {frame.type} frame for step {frame.step}")
            signed = check_commitment(frame.fields, self.context, self.reply.payload, node.operator, session.domain)
        except (CommitmentError, *HOP_ERRORS) as exc:
            raise CommitmentFailure(node, f"node {node.url}: {exc}") from None
        session.commitments.append((node.url, signed))
        if session.on_commitment is not None:
            session.on_commitment(node, signed, self.tokens)
