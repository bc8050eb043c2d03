"""An inference session across a route of nodes that survives a node dying mid-generation.

The client keeps every input it sent to each hop. When a node fails (connection lost, timeout, error
frame, wrong shape), the hop's inputs are replayed in order to a replacement route for the same layers,
which rebuilds the same KV cache, and the step is retried there: the output is the same as an undisturbed
run. A node answers a step with its result, then its signed commitment to it: the result goes on to the next
hop at once and the commitment is checked while that hop works; a bad one redoes the whole step on a new
request, every hop's answered steps replayed, with the forger routed around. The client checks each commitment
against the context it rebuilds itself: the node's model and layers as registered, the session nonce the node
named when the session opened, the step, its position and the hash chain of every input it sent that hop.

With `push`, each node is told the next one when its session opens and sends its output there itself; the client sends
a step to the first hop and reads every hop's result as it comes (the input hash of each hop is that of the result its
predecessor sent the client), and relays where a node says it could not push.
"""

from __future__ import annotations

import asyncio
import itertools
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
from shardmarket.client.routing import FULL_FOR_S, NodeInfo, RouteError, plan_route, trusted_nodes
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


class PrivateRouteError(RouteError):
    """A private request found no route served by trusted operators alone; it is never sent to anyone else."""


class NodeFailure(Exception):
    """A node did not answer a step correctly; the session replaces it."""


class RequestRefused(NodeFailure):
    """A node refused the request itself (wire.REQUEST_FAULTS: too long for the model's context, a step larger than it
    takes, a wrong shape) or declined it for now (wire.DECLINES: full, or not paid enough). No node is at fault, so none
    is avoided by other requests; this one tries the other nodes (a node could blame good requests to shed them) and
    raises this once none is left."""

    def __init__(self, node: NodeInfo, code: str, message: str) -> None:
        super().__init__(f"node {node.url} refused the request ({code}): {message}")
        self.code = code


def _refusal(node: NodeInfo, reply: Message, what: str) -> NodeFailure:
    """The exception for an error frame: RequestRefused when it names the request as the cause or the node declines it
    for now (full, or not paid enough: wire.DECLINES), else NodeFailure. A full node is left out of routes a while."""
    code, message = reply.fields.get("code"), reply.fields.get("message")
    if isinstance(reply.fields.get("load"), dict):
        node.report(reply.fields["load"])
    if code == "capacity":
        node.full_until = time.monotonic() + FULL_FOR_S
    if isinstance(code, str) and code in wire.REQUEST_FAULTS | wire.DECLINES:
        return RequestRefused(node, code, str(message))
    return NodeFailure(f"node {node.url} refused {what}: {message}")


class CommitmentFailure(Exception):
    """A hop's answer was passed on before its commitment was checked, and the commitment is bad."""

    def __init__(self, node: NodeInfo, message: str) -> None:
        super().__init__(message)
        self.node = node


PREFILL_CHUNK = 128  # positions per step of a long prompt on a pushing route: hop A computes chunk 2 while B has chunk 1
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
    pushes: bool = False  # the node sends its outputs straight to the next hop (which it was told when it opened)
    next_position: int = 0  # where the node's KV cache ends
    held: bool = True  # counted in the node's `held` sessions (from when its route was planned) until closed or dropped
    opening: asyncio.Future[None] | None = None  # reads the answer to an OPEN sent without waiting (the nonce comes with it)

    async def ready(self) -> None:
        """Wait for the answer to this hop's OPEN, if it was sent pipelined: read it before anything else on the channel."""
        if self.opening is not None:
            await self.opening

    async def send(self, message: Message) -> None:
        """Send on this hop's channel; where that fails because the node refused a pipelined OPEN (and hung up), raise
        that refusal."""
        try:
            await self.channel.send(message)
        except HOP_ERRORS:
            await self.ready()
            raise

    def release(self) -> None:
        """The session on this node is closed or dropped: it no longer counts in the node's load."""
        if self.held:
            self.held = False
            self.node.held -= 1

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

    # the first step follows the OPENs without waiting for their answers (False: after every node answered, one more
    # round trip; bench/wan.py --open compares the two)
    pipelined_open = True

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
        push: bool = False,
        trusted: frozenset[str] | None = None,
        relay: str | None = None,
    ) -> None:
        self.nodes, self.num_layers, self.domain = nodes, num_layers, domain
        self.push = push  # ask each node to push its outputs to the next hop (the client still gets every result)
        # a private request: only nodes of these operators (lowercase addresses) ever see one of its frames
        self.trusted = trusted
        self.relay = relay  # a relay every hop is reached through, so that no node sees this client's address
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
        when none is left and some node refused the request, that refusal is the answer. A private request plans over
        the trusted operators' nodes alone, and fails with PrivateRouteError rather than use anyone else's."""
        nodes = self.nodes if self.trusted is None else trusted_nodes(self.nodes, self.trusted)
        try:
            return plan_route(nodes, start, end, self._payload_bytes(), self.failed.current() | self.refusals.keys())
        except RouteError as exc:
            if self.refusals:
                raise next(iter(self.refusals.values())) from None
            if self.trusted is not None:
                raise PrivateRouteError(
                    f"private request: no route of trusted operators covers layers [{start}, {end}) ({exc}); it is sent to "
                    "no other node. Trust more operators (client.trusted_operators or --trust) or send it without private"
                ) from None
            raise

    async def open(self, pipelined: bool = False) -> None:
        """Plan the route over live nodes and open a session on each hop; `pipelined`, without waiting for the nodes'
        answers (each hop's is read before its first result: a refusal then fails that hop's step)."""
        while True:
            route = self._plan(0, self.num_layers)
            try:
                self.hops = await self._open_hops(route, pipelined)
                return
            except NodeFailure:
                continue  # the failing node is now excluded; plan again

    async def _open_hops(self, route: list[NodeInfo], pipelined: bool = False) -> list[Hop]:
        """Open a session on every node of `route` at once (one round of connects and handshakes, not one per hop);
        if any fails, the sessions opened on the others are closed and every failed node is marked. Each node counts the
        session from now on, before the first await: concurrent requests planning meanwhile see it."""
        for node in route:
            node.held += 1
        links = self._links(route)
        results = await asyncio.gather(
            *(self._open_hop(node, link, pipelined) for node, link in zip(route, links, strict=True)), return_exceptions=True
        )
        hops = [result for result in results if isinstance(result, Hop)]
        failed = [(node, result) for node, result in zip(route, results, strict=True) if not isinstance(result, Hop)]
        for node, _ in failed:
            node.held -= 1
        if not failed:
            return hops
        await self._close_sessions(hops)
        for node, exc in failed:
            if not isinstance(exc, HOP_ERRORS):
                raise exc
            self._mark_failed(node, exc)
        node, exc = failed[0]
        raise NodeFailure(f"cannot open a session on {node.url}: {exc}")

    def _links(self, route: list[NodeInfo]) -> list[dict]:
        """The OPEN fields linking each hop of `route` to the next when pushing: the next node's key and a fresh token that
        the next node will expect on the steps pushed to it (nodes of different hidden states are not linked)."""
        links: list[dict] = [{} for _ in route]
        if not self.push:
            return links
        for i, (node, following) in enumerate(itertools.pairwise(route)):
            if node.dtype == following.dtype and node.hidden_size == following.hidden_size:
                token = os.urandom(32)
                links[i]["next"] = {"key": following.x25519_public_key, "token": token}
                links[i + 1]["previous"] = token
        return links

    async def _open_hop(self, node: NodeInfo, link: dict | None = None, pipelined: bool = False) -> Hop:
        link = link or {}
        if self.pool is not None:
            while (channel := await self.pool.take(self._pool_key(node))) is not None:
                try:  # a kept connection that went dead without a word must not cost a whole step timeout
                    if pipelined:
                        hop = await self._send_open(node, channel, link, kept=True)
                    else:
                        hop = await self._open_session(node, channel, min(self.step_timeout_s, KEPT_OPEN_TIMEOUT_S), link)
                    self.reused_channels += 1
                    return hop
                except (TimeoutError, ConnectionError, OSError, WireError, DecryptError):
                    await close_quietly(channel)  # the node dropped this kept connection meanwhile
        transport = await open_transport(
            node.url, self.transport, node.tcp_port, wire.DEFAULT_LIMITS, self.step_timeout_s, relay=self.relay
        )
        try:
            channel = await asyncio.wait_for(client_handshake(transport, node.x25519_public_key), self.step_timeout_s)
        except BaseException:
            await transport.close()
            raise
        if pipelined:
            return await self._send_open(node, channel, link, kept=False)
        return await self._open_session(node, channel, self.step_timeout_s, link)

    def _open_message(self, node: NodeInfo, link: dict) -> Message:
        fields: dict = {"max_length": self.max_length, **link}
        tab = self.tab or (self.standing_tab(node) if self.standing_tab is not None else None)
        if tab is not None:  # names who pays: a paid node opens sessions for strangers only sparingly
            fields["tab"] = tab
        return Message(wire.OPEN, self.request_id, 0, fields)

    async def _send_open(self, node: NodeInfo, channel: SecureChannel, link: dict, kept: bool) -> Hop:
        """A hop whose OPEN is sent but not answered yet: the first step follows straight away (the node answers a
        channel's frames in order, and waits a little for an OPEN that a pushed step overtook)."""
        try:
            await channel.send(self._open_message(node, link))
        except BaseException:
            await channel.close()
            raise
        hop = Hop(node, channel, b"", pushes="next" in link)

        async def opened() -> None:
            try:  # a kept connection that went dead without a word must not cost a whole step timeout
                async with asyncio.timeout(min(self.step_timeout_s, KEPT_OPEN_TIMEOUT_S) if kept else self.step_timeout_s):
                    reply = await channel.recv()
            except (ConnectionError, OSError, WireError, DecryptError) as exc:
                if kept:  # the node dropped this kept connection meanwhile: no fault of the node
                    raise _KeptChannelDead(f"kept connection to {node.url} is gone: {exc}") from None
                raise
            hop.nonce = await self._check_opened(node, channel, reply)
            hop.pushes = hop.pushes and reply.fields.get("push") is True

        hop.opening = asyncio.ensure_future(opened())
        return hop

    async def _open_session(self, node: NodeInfo, channel: SecureChannel, timeout_s: float, link: dict) -> Hop:
        try:
            await channel.send(self._open_message(node, link))
            reply = await asyncio.wait_for(channel.recv(), timeout_s)
        except BaseException:
            await channel.close()
            raise
        nonce = await self._check_opened(node, channel, reply)
        return Hop(node, channel, nonce, pushes="next" in link and reply.fields.get("push") is True)

    async def _check_opened(self, node: NodeInfo, channel: SecureChannel, reply: Message) -> bytes:
        """The session nonce of a node's answer to OPEN; raises (the channel closed) if it is not an OPENED."""
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
        return nonce

    def _pool_key(self, node: NodeInfo) -> tuple:
        return node.url, self.transport, node.tcp_port, node.x25519_public_key, self.relay

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
            await self.open(pipelined=self.pipelined_open)
        position = int(positions[0, 0])
        if position == 0 and hidden.shape[1] > PREFILL_CHUNK and self._linked() and not self.hops[0].inputs:
            prefilled = await self._prefill_chunked(hidden)
            if prefilled is not None:
                output, unchecked = prefilled
                self._unconfirmed = (asyncio.ensure_future(self._after_step(unchecked, hidden.shape[1])), hidden, positions, 0)
                return output
        while True:
            answered = len(self.hops[0].inputs)
            try:
                if any(hop.pushes for hop in self.hops):
                    output, unchecked = await self._run_step_pushed(hidden, position)
                else:
                    output, last = await self._run_step(hidden, position)
                    unchecked = [] if last is None else [last]
            except CommitmentFailure as exc:
                await self._restart(answered, exc)
                continue
            check = (
                None
                if not unchecked and self.presign is None
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

    async def _after_step(self, unchecked: list[_CommitmentCheck], tokens: int) -> None:
        """What follows a step of `tokens` positions while its output is being used: the next decode step's tab is signed
        ahead (while the last node signs its commitment), then the commitments not checked yet are. A speculative step is
        guessed to be followed by one as long; a prefill chunk by a one-token step."""
        if self.presign is not None:
            self.presign([(hop.node, tokens if tokens <= MAX_DRAFT_STEP else 1) for hop in self.hops])
        for check in unchecked:
            await check()

    def _linked(self) -> bool:
        """Whether every hop but the last pushes to the next."""
        return all(hop.pushes for hop in self.hops[:-1])

    async def _prefill_chunked(self, hidden: torch.Tensor) -> tuple[torch.Tensor, list[_CommitmentCheck]] | None:
        """Prefill a long prompt on a fully linked route as a train of chunks, one step each, all sent to the first hop at
        once, so that every hop works on one chunk while the next hop works on the one before. Each hop's results are
        read as they come (their commitments checked, the last chunk's after the output is returned). On any failure the
        route is opened again on a new request id, around a failed node, and None returned: the caller prefills in one
        step as usual."""
        chunks = hidden.split(PREFILL_CHUNK, dim=1)
        self.pay([(hop.node, hidden.shape[1]) for hop in self.hops])  # one tab for the whole prompt rides on each chunk
        dtype = wire.DTYPES[self.hops[0].node.dtype]
        loop = asyncio.get_running_loop()
        feeds = [[loop.create_future() for _ in chunks] for _ in self.hops]  # (hidden, payload, tensor sent) per chunk
        offsets = [sum(c.shape[1] for c in chunks[:i]) for i in range(len(chunks))]
        last_checks: list[_CommitmentCheck] = []
        started = time.perf_counter()
        try:
            for step, chunk in enumerate(chunks):
                sent = chunk.to(dtype).contiguous()
                payload = tensor_bytes(sent)
                feeds[0][step].set_result((chunk, payload, sent))
                fields = self._fields(offsets[step]) | {"push": len(self.hops) - 1}
                await self.hops[0].send(Message(wire.STEP, self.request_id, step, fields, sent, payload))
        except HOP_ERRORS as exc:
            await self._prefill_failed(0, exc)
            return None

        async def read(index: int) -> list[torch.Tensor]:
            hop, outputs = self.hops[index], []
            for step in range(len(chunks)):
                try:
                    await hop.ready()
                    async with asyncio.timeout(self.step_timeout_s):
                        reply = await hop.channel.recv()
                    given, payload, sent = await feeds[index][step]
                    output = self._check_answer(hop, reply, step, sent)
                    if index + 1 < len(self.hops) and reply.fields.get("pushed") is not True:
                        raise _NotPushed(f"node {hop.node.url} could not push to the next hop")
                except (CommitmentFailure, *HOP_ERRORS) as exc:
                    raise _HopFailed(index, exc, hidden) from None
                context = hop.context(self.request_id, step, offsets[step], tensor_hash(payload))
                hop.answered(context, given.shape[1])
                hop.inputs.append((offsets[step], given))
                hop.outputs.append(output)
                compute_s = reply.fields.get("compute_us", 0) / 1e6
                self.timings.append(HopTiming(hop.node.url, given.shape[1], time.perf_counter() - started, compute_s))
                if index + 1 < len(self.hops):
                    feeds[index + 1][step].set_result((output, reply.payload, reply.tensor))
                check = _CommitmentCheck(self, hop, reply, context, given.shape[1])
                if step + 1 < len(chunks):
                    try:
                        await check()
                    except CommitmentFailure as exc:
                        raise _HopFailed(index, exc, hidden) from None
                else:
                    last_checks.append(check)
                outputs.append(output)
            return outputs

        readers = [asyncio.ensure_future(read(index)) for index in range(len(self.hops))]
        await asyncio.wait(readers, return_when=asyncio.FIRST_EXCEPTION)
        for reader in readers:  # a hop after a failed one would wait for its input forever
            reader.cancel()
        await asyncio.gather(*readers, return_exceptions=True)
        for reader in readers:
            failure = None if reader.cancelled() else reader.exception()
            if isinstance(failure, _HopFailed):
                await self._prefill_failed(failure.index, failure.cause)
                return None
            if failure is not None:
                raise failure
        return torch.cat(readers[-1].result(), dim=1), last_checks

    async def _prefill_failed(self, index: int, cause: BaseException) -> None:
        """Give up a chunked prefill: hang up on every hop and open the route again on a new request id (the node at
        `index` routed around, unless all it did was fail to push)."""
        if not isinstance(cause, _NotPushed):
            self._mark_failed(self.hops[index].node, cause)
            self.failovers += 1
        await self._drop_hops(self.hops)
        self.hops = []
        self.request_id = os.urandom(32)
        self.request_ids.append(self.request_id)
        await self.open()

    async def _run_step_pushed(self, hidden: torch.Tensor, position: int) -> tuple[torch.Tensor, list[_CommitmentCheck]]:
        """One step through a route whose nodes push to each other: the client sends the step to the first hop of each
        run of linked hops and reads every hop's result as it comes (the last one is the step's output); every
        commitment is checked after the output was returned. A hop that could not push is relayed to by the client."""
        tokens = hidden.shape[1]
        self.pay([(hop.node, tokens) for hop in self.hops])
        index, checks = 0, list[_CommitmentCheck]()
        while index < len(self.hops):
            last, step = index, len(self.hops[index].inputs)
            while last + 1 < len(self.hops) and self.hops[last].pushes and len(self.hops[last + 1].inputs) == step:
                last += 1
            try:
                hidden, index = await self._run_linked(index, last, step, position, hidden, checks)
            except _HopFailed as exc:
                await self._replace(exc.index, exc.cause, tokens)
                if exc.index > 0:  # it was told to push to the node just replaced
                    self.hops[exc.index - 1].pushes = False
                index, hidden = exc.index, exc.hidden
        return hidden, checks

    async def _run_linked(
        self, first: int, last: int, step: int, position: int, hidden: torch.Tensor, checks: list[_CommitmentCheck]
    ) -> tuple[torch.Tensor, int]:
        """Send the step to hop `first`, which pushes it on through hop `last`; read each hop's result in turn. Returns the
        last output read and the index of the next hop the client must send to."""
        hop = self.hops[first]
        dtype = wire.DTYPES[hop.node.dtype]
        sent = hidden if hidden.dtype == dtype else hidden.to(dtype)
        payload = tensor_bytes(sent)
        fields = self._fields(position) | ({"push": last - first} if last > first else {})
        started = time.perf_counter()
        try:
            await hop.send(Message(wire.STEP, self.request_id, step, fields, sent, payload))
        except HOP_ERRORS as exc:
            raise _HopFailed(first, exc, hidden) from None
        for index in range(first, last + 1):
            hop = self.hops[index]
            try:
                await hop.ready()
                context = hop.context(self.request_id, step, position, tensor_hash(payload))
                async with asyncio.timeout(self.step_timeout_s):
                    reply = await hop.channel.recv()
                output = self._check_answer(hop, reply, step, sent)
            except HOP_ERRORS as exc:
                raise _HopFailed(index, exc, hidden) from None
            hop.answered(context, hidden.shape[1])
            hop.inputs.append((position, hidden))
            hop.outputs.append(output)
            compute_s = reply.fields.get("compute_us", 0) / 1e6
            self.timings.append(HopTiming(hop.node.url, hidden.shape[1], time.perf_counter() - started, compute_s))
            checks.append(_CommitmentCheck(self, hop, reply, context, hidden.shape[1]))
            hidden, sent, payload = output, reply.tensor if reply.tensor is not None else sent, reply.payload
            if index < last and reply.fields.get("pushed") is not True:
                hop.pushes = False  # it could not reach the next hop: the client relays from now on
                return hidden, index + 1
        return hidden, last + 1

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
        await hop.send(Message(wire.STEP, self.request_id, step, fields, sent, payload))
        await hop.ready()
        context = hop.context(self.request_id, step, position, tensor_hash(payload))
        if previous is not None:
            await previous()
        async with asyncio.timeout(self.step_timeout_s):
            reply = await hop.channel.recv()
        output = self._check_answer(hop, reply, step, sent)
        hop.answered(context, sent.shape[1])
        if isinstance(reply.fields.get("load"), dict):
            node.report(reply.fields["load"])
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
        if isinstance(reason, _KeptChannelDead):
            return
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
            hop.release()
            try:
                await hop.ready()
                await hop.channel.send(Message(wire.CLOSE, self.request_id))
                reply = await asyncio.wait_for(hop.channel.recv(), 2.0)
            except (*HOP_ERRORS, ValueError):
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
        for hop in hops:
            hop.release()
            if hop.opening is not None:
                hop.opening.cancel()
        await asyncio.gather(*(close_quietly(hop.channel) for hop in hops))
        await asyncio.gather(*(hop.opening for hop in hops if hop.opening is not None), return_exceptions=True)


class _KeptChannelDead(NodeFailure):
    """A kept connection went dead before a pipelined OPEN's answer came: the node is tried again on a new connection."""


class _NotPushed(NodeFailure):
    """A node answered a step but could not push it on to the next hop."""


class _HopFailed(Exception):
    """Hop `index` of a pushed step failed (`cause`); `hidden` was its input."""

    def __init__(self, index: int, cause: BaseException, hidden: torch.Tensor) -> None:
        super().__init__(str(cause))
        self.index, self.cause, self.hidden = index, cause, hidden


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
