"""The node's inference sessions: handshake, open/step/close, cached answers and signed commitments per step.

Each session gets a random nonce when it opens, and a step's commitment names it with the hash of every earlier
input of the session: two commitments of this node for the same context come from one computation, so the node never
signs two answers that look like equivocation, whatever request ids a client reuses and however often the node
restarts.

A step is answered with two frames: the result, sent as soon as the layers are done, then the signed commitment
to it (the client passes the result on to the next hop while the node signs, and checks the signature while
that hop works). A paid session's later steps run on the client's credit: their tab is checked and stored while
the commitment is signed, and a bad tab gets an error frame in the commitment's place; the commitment is the
node's acknowledgement, so a tab it acknowledged is always on disk.

A client may name the next node of its route when it opens a session (server/push.py): the node then also sends each
step's output to that node as its step, before the result goes back to the client. A step pushed that way carries the
token the client gave both nodes, and its answers go to the client that holds the session."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from shardmarket.chain.commitment import SignedCommitment, commit
from shardmarket.chain.eip712 import (
    EMPTY_HISTORY,
    ENTRY_BYTES,
    MAX_ENTRIES,
    TAB_HEADER_BYTES,
    Domain,
    StepContext,
    chain_history,
    chain_rollback,
    tensor_hash,
)
from shardmarket.engine.errors import CapacityError, EngineError, ShapeError, UnknownSession
from shardmarket.engine.tensors import tensor_bytes
from shardmarket.net import wire
from shardmarket.net.channel import HANDSHAKE_CONFIRM, ChannelClosed, SecureChannel, Transport
from shardmarket.net.crypto import SEAL_OVERHEAD, DecryptError, node_handshake
from shardmarket.net.doorman import Peer
from shardmarket.net.ratelog import RateLimitedLog
from shardmarket.net.wire import Limits, Message, StreamDesync, WireError
from shardmarket.server.identity import NodeIdentity
from shardmarket.server.payments import Credit, PaymentGate, PaymentRefused
from shardmarket.server.push import Successor, Successors
from shardmarket.server.worker import StageWorker

log = logging.getLogger("shardmarket.node")
CACHED_STEPS = 4  # answers kept per session for retries
MAX_BAD_FRAMES = 8  # frames failing authentication before the node hangs up
# a client sends its OPENs and the first step back to back, so a step pushed by the previous node may come before its
# session's OPEN (which travelled on the client's own connection): it waits this long for that OPEN to be answered
PUSHED_OPEN_WAIT_S = 2.0
MAX_TAB_BYTES = TAB_HEADER_BYTES + ENTRY_BYTES * MAX_ENTRIES  # the client's signed tab riding on a step, naming every node


@dataclass(frozen=True)
class SessionLimits:
    """What one peer may hold of the node's sessions, the largest step, and how long a connection holding no session
    may idle (sessions themselves expire after `idle_timeout_s`); every field is a [node] setting of the same name."""

    max_sessions_per_connection: int = 4
    max_sessions_per_address: int = 32
    unpaid_sessions_per_address: int = 2  # a paid node's sessions opened without a tab, until a step's tab pays them
    idle_connection_s: float = 60.0
    max_step_tokens: int = 1024  # positions per step: with the hidden size, it bounds every frame the node reads


def step_limits(hidden_size: int, dtype: torch.dtype, max_step_tokens: int) -> Limits:
    """Frame limits of a node computing `hidden_size`-wide hidden states in `dtype`: a step of up to `max_step_tokens`
    positions, its header (a tab naming every node fits in it) and the cipher's tag."""
    header = wire.DEFAULT_LIMITS.max_header_bytes
    elements = max_step_tokens * hidden_size
    return Limits(
        max_frame_bytes=4 + header + elements * dtype.itemsize + SEAL_OVERHEAD, max_header_bytes=header, max_elements=elements
    )


class StepRefused(Exception):
    """A step the node will not run; `code` and the message go back in an error frame."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass
class _Answer:
    context: StepContext
    output: torch.Tensor
    payload: bytes
    compute_us: int
    signed: SignedCommitment | None = None  # signed once, after the result went out; a retry gets the same one
    credit: Credit | None = None  # a step run before its tab was checked: checked before the commitment goes out

    @property
    def request_id(self) -> bytes:
        return self.context.request_id

    @property
    def step(self) -> int:
        return self.context.step


@dataclass(eq=False)
class _Connection:
    """A connection's peer and the request ids of the sessions it holds (claimed before an OPEN's first await, so that
    concurrent opens count them); they close with it."""

    peer: Peer
    sessions: set[bytes] = field(default_factory=set)
    channel: SecureChannel | None = None  # where the answers to its sessions' pushed steps go


@dataclass
class _Session:
    request_id: bytes
    max_length: int
    owner: _Connection
    nonce: bytes = field(default_factory=lambda: os.urandom(32))  # names this session in every commitment
    history: bytes = EMPTY_HISTORY  # chain_history over every input answered so far
    next_step: int = 0
    next_position: int = 0
    last_start: int = -1  # where the last step started: a step may roll the cache back to just after it
    answers: OrderedDict[int, _Answer] = field(default_factory=OrderedDict)
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    last_used: float = field(default_factory=time.monotonic)
    successor: Successor | None = None  # the next node of the client's route, when this node pushes its outputs there
    previous_token: bytes | None = None  # what the previous node's pushed steps must carry

    @property
    def stage_id(self) -> str:
        return self.request_id.hex()


class NodeService:
    """Everything a node does per connection; transports (TCP, WebSocket) hand it their frames."""

    def __init__(
        self,
        worker: StageWorker,
        identity: NodeIdentity,
        domain: Domain,
        *,
        model_id: bytes,
        idle_timeout_s: float = 300.0,
        payments: PaymentGate | None = None,
        session_limits: SessionLimits = SessionLimits(),
        successors: Successors | None = None,
    ) -> None:
        self.worker, self.identity, self.domain = worker, identity, domain
        self.stage = worker.stage
        self.limits = step_limits(self.stage.hidden_size, self.stage.dtype, session_limits.max_step_tokens)
        self.session_limits = session_limits
        self.model_id = model_id  # keccak256 of the model's name, as the ModelRegistry names it: every commitment carries it
        self.idle_timeout_s = idle_timeout_s
        self.payments = payments
        self.successors = successors  # None: this node never pushes (the client relays its outputs)
        self.sessions: dict[bytes, _Session] = {}
        self._opening: dict[bytes, asyncio.Event] = {}  # request ids that pushed steps wait on, set once their OPEN is answered
        self._live: set[_Connection] = set()  # connections past their handshake
        self._warn = RateLimitedLog(log).warning
        self.draining = False
        self.steps_in_flight = 0  # frames being answered
        self.steps_served = 0
        self.on_step: Callable[[bytes, int, int, float], None] | None = None  # (request id, tokens, position, compute s)
        self.frames_received = 0  # session frames decrypted (open, step, close): what this node saw of any request
        self._idle = asyncio.Event()
        self._idle.set()
        self._connections: set[Transport] = set()  # until their sessions are closed
        self._no_connections = asyncio.Event()
        self._no_connections.set()

    def load(self) -> dict:
        """How busy the node is now, as /info and every answer report it: sessions open and the room for more, steps
        waiting for the compute thread, and a decode step's recent compute time."""
        stage = self.stage
        return {
            "sessions": len(self.sessions),
            "free_slots": max(stage.max_sessions - len(stage.session_ids()), 0),
            "queued": self.worker.queued,
            "decode_ms": round(self.worker.decode_ms, 3),
        }

    async def serve(self, transport: Transport, peer: Peer | None = None) -> None:
        """Serve one connection until it closes, then close the sessions it holds; never raises on bad input."""
        connection = _Connection(peer or Peer())
        self._connections.add(transport)
        self._no_connections.clear()
        try:
            channel = await self._handshake(transport)
            if channel is not None:
                connection.channel = channel
                connection.peer.handshaken()
                self._live.add(connection)
                await self._serve_channel(channel, connection)
        except ChannelClosed:
            pass
        except Exception:  # a bug must not take the node down; log it and drop this connection
            log.exception("connection failed unexpectedly")
        finally:
            self._live.discard(connection)
            try:
                await transport.close()
                await self._end_sessions(connection)
            finally:
                self._connections.discard(transport)
                if not self._connections:
                    self._no_connections.set()

    async def _handshake(self, transport: Transport) -> SecureChannel | None:
        try:
            hello = wire.decode(await transport.recv(wire.HANDSHAKE_LIMITS), wire.HANDSHAKE_LIMITS)
            key = hello.fields.get("key")
            if hello.type != wire.HELLO or not isinstance(key, bytes):
                raise WireError("a session starts with a hello frame carrying the client's X25519 key")
            node_eph, cipher = node_handshake(self.identity.x25519, key)
        except (WireError, ValueError) as exc:
            code = exc.code if isinstance(exc, WireError) else "bad_handshake"
            await transport.send(wire.encode(wire.error_message(code, f"handshake failed: {exc}")))
            return None
        await transport.send(
            wire.encode(Message(wire.WELCOME, fields={"key": node_eph, "confirm": cipher.seal(HANDSHAKE_CONFIRM)}))
        )
        return SecureChannel(transport, cipher, self.limits)

    async def _serve_channel(self, channel: SecureChannel, connection: _Connection) -> None:
        bad_frames = 0
        while True:
            idle_s = self.idle_timeout_s if connection.sessions else self.session_limits.idle_connection_s
            try:
                async with asyncio.timeout(idle_s):
                    message = await channel.recv()
            except TimeoutError:
                setting = "idle_timeout_s; its sessions close with it" if connection.sessions else "idle_connection_s"
                self._warn(
                    "idle_connection", "closed a connection from %s: idle for %g s (%s)", connection.peer.address, idle_s, setting
                )
                return
            except DecryptError as exc:
                bad_frames += 1
                await channel.send(wire.error_message("auth_failed", str(exc)))
                if bad_frames >= MAX_BAD_FRAMES:
                    return
                continue
            except StreamDesync as exc:
                await channel.send(wire.error_message(exc.code, str(exc)))
                return
            except WireError as exc:
                await channel.send(wire.error_message(exc.code, f"{exc}; fix the frame and send it again"))
                continue
            self.frames_received += 1
            self.steps_in_flight += 1
            self._idle.clear()
            try:
                reply, answer = await self._answer(message, connection)
                out = self._answer_channel(message, channel)
                if answer is not None and reply.type == wire.RESULT and message.fields.get("push"):
                    reply.fields["pushed"] = await self._push(answer, message)
                try:
                    await out.send(reply)
                    if answer is not None:
                        await out.send(await self._acknowledge(answer))
                except ChannelClosed:
                    if out is channel:
                        raise
            finally:
                self.steps_in_flight -= 1
                if not self.steps_in_flight:
                    self._idle.set()

    def _answer_channel(self, message: Message, channel: SecureChannel) -> SecureChannel:
        """Where the answer to `message` goes: a step pushed by the previous node is answered to the client that holds the
        session; everything else on the channel it came on."""
        via = message.fields.get("via") if message.type == wire.STEP else None
        session = self.sessions.get(message.session) if via is not None else None
        if session is not None and session.owner.channel is not None and _token_matches(via, session.previous_token):
            return session.owner.channel
        return channel

    async def _push(self, answer: _Answer, message: Message) -> bool:
        """Send `answer`'s output on to the session's next node as its step (the client's fields ride along); False when
        there is none or it cannot be reached (the client then relays)."""
        session = self.sessions.get(answer.request_id)
        hops = message.fields.get("push")
        if session is None or session.successor is None or self.successors is None or not isinstance(hops, int) or hops < 1:
            return False
        successor = session.successor
        channel = await self.successors.channel(successor.key)
        if channel is None:
            session.successor = None
            return False
        fields = {"position": message.fields.get("position"), "push": hops - 1, "via": successor.token}
        if "tab" in message.fields:
            fields["tab"] = message.fields["tab"]
        try:
            await channel.send(Message(wire.STEP, answer.request_id, answer.step, fields, answer.output, answer.payload))
        except ChannelClosed:
            self.successors.forget(successor.key, channel)
            session.successor = None
            return False
        return True

    async def _answer(self, message: Message, connection: _Connection) -> tuple[Message, _Answer | None]:
        """The reply to `message` and, for a step, the answer whose commitment follows it."""
        try:
            if message.type == wire.OPEN:
                try:
                    return await self._open(message, connection), None
                finally:  # opened or refused: a pushed step waiting for it goes on (and finds the session or not)
                    if (opening := self._opening.pop(message.session, None)) is not None:
                        opening.set()
            if message.type == wire.STEP:
                answer = await self._step(message)
                fields = {"compute_us": answer.compute_us, "load": self.load()}
                reply = Message(wire.RESULT, answer.request_id, answer.step, fields, answer.output, answer.payload)
                return reply, answer
            if message.type == wire.CLOSE:
                return await self._close(message), None
            raise StepRefused("bad_type", f"a node does not accept {message.type!r} frames; send open, step or close")
        except StepRefused as exc:
            refusal = wire.error_message(exc.code, str(exc), message.session, message.step)
            if exc.code in wire.DECLINES:
                refusal.fields["load"] = self.load()
            return refusal, None

    async def _acknowledge(self, answer: _Answer) -> Message:
        """The frame that follows a step's result: its commitment, once the payment gate has the step's tab checked and
        stored; an error frame if the gate refuses a tab the step ran on credit with."""
        if self.payments is None or answer.credit is None:  # nothing left to check: no coroutine on the hot path
            return self._commitment(answer)
        try:
            commitment = await self.payments.acknowledge(answer.credit, lambda: self._commitment(answer))
        except PaymentRefused as exc:
            session = self._forget(answer.request_id)
            if session is not None:
                async with session.lock:
                    await self._close_stage_session(session)
            return wire.error_message(
                exc.code, f"{exc}; this step's answer stands unpaid against your credit", answer.request_id, answer.step
            )
        answer.credit = None
        return commitment

    def _commitment(self, answer: _Answer) -> Message:
        """The commitment frame of `answer`, signed on first use."""
        if answer.signed is None:
            answer.signed = commit(self.identity.signer, answer.context, answer.payload, self.domain)
        return Message(wire.COMMIT, answer.request_id, answer.step, answer.signed.to_fields())

    def _check_request_id(self, message: Message) -> bytes:
        if len(message.session) != 32:
            raise StepRefused("bad_session", "the session field must be the 32-byte request id")
        return message.session

    async def _open(self, message: Message, connection: _Connection) -> Message:
        request_id = self._check_request_id(message)
        if self.draining:
            raise StepRefused("shutting_down", "this node is shutting down; use another node for this range")
        existing = self.sessions.get(request_id)
        if existing is not None:  # a reconnect before the old connection was noticed gone: the session moves here
            if existing.owner is not connection:
                self._move(existing, connection)
            fields = {"position": existing.next_position, "nonce": existing.nonce, "push": existing.successor is not None}
            return Message(wire.OPENED, request_id, existing.next_step, fields)
        max_length = message.fields.get("max_length")
        if not isinstance(max_length, int) or isinstance(max_length, bool) or not 0 < max_length <= 1 << 20:
            raise StepRefused("bad_open", "open needs max_length, a positive integer")
        tab = message.fields.get("tab")
        successor, previous_token = self._links(message)
        self._check_room(connection, unpaid=self.payments is not None and tab is None)
        connection.sessions.add(request_id)  # claimed before the first await, so that concurrent opens count it
        try:
            session = await self._new_session(request_id, max_length, tab, connection)
        except BaseException:
            connection.sessions.discard(request_id)
            if self.payments is not None:
                self.payments.release(request_id)
            raise
        session.successor, session.previous_token = successor, previous_token
        self.sessions[request_id] = session
        if successor is not None and self.successors is not None:
            self.successors.warm(successor.key)  # connected while the client sends its first step
        return Message(wire.OPENED, request_id, 0, {"position": 0, "nonce": session.nonce, "push": successor is not None})

    def _links(self, message: Message) -> tuple[Successor | None, bytes | None]:
        """The next node an OPEN asks this node to push to (none if this node does not push) and the token the previous
        node's pushed steps will carry."""
        successor, previous = message.fields.get("next"), message.fields.get("previous")
        if previous is not None and (not isinstance(previous, bytes) or len(previous) != 32):
            raise StepRefused("bad_open", "previous must be the 32-byte token the previous node's pushed steps carry")
        if successor is None or self.successors is None:
            return None, previous
        key, token = (successor.get("key"), successor.get("token")) if isinstance(successor, dict) else (None, None)
        if not (isinstance(key, bytes) and len(key) == 32 and isinstance(token, bytes) and len(token) == 32):
            raise StepRefused("bad_open", "next must name the next node's 32-byte X25519 key and a 32-byte token")
        return Successor(key, token), previous

    async def _new_session(self, request_id: bytes, max_length: int, tab: object, connection: _Connection) -> _Session:
        """A session with its KV cache reserved; on a paid node, `tab` (if any) names its payer first."""
        if self.payments is not None and tab is not None:
            try:
                await self.payments.bind(request_id, tab)
            except PaymentRefused as exc:
                raise StepRefused(exc.code, str(exc)) from None
        session = _Session(request_id, max_length, connection)
        try:
            await self.worker.call(self.stage.open_session, session.stage_id, max_length)
        except CapacityError as exc:
            raise StepRefused("capacity", f"{exc}; try another node or later") from None
        except ShapeError as exc:  # a length past the model's context
            raise StepRefused("too_long", str(exc)) from None
        except EngineError as exc:
            raise StepRefused("bad_open", str(exc)) from None
        return session

    def _check_room(self, connection: _Connection, unpaid: bool) -> None:
        """Refuse a new session beyond what one connection or one address may hold and, for a session no tab pays yet on
        a paid node, beyond the few such sessions an address may hold."""
        limits, address = self.session_limits, connection.peer.address
        held = [request_id for other in self._live if other.peer.address == address for request_id in other.sessions]
        if len(connection.sessions) >= limits.max_sessions_per_connection:
            setting, why = "max_sessions_per_connection", f"this connection holds {len(connection.sessions)} sessions already"
        elif len(held) >= limits.max_sessions_per_address:
            setting, why = "max_sessions_per_address", f"your address holds {len(held)} sessions on this node already"
        elif unpaid and (count := self._unpaid(held)) >= limits.unpaid_sessions_per_address:
            setting, why = "unpaid_sessions_per_address", f"your address holds {count} sessions that no tab paid yet"
        else:
            return
        self._warn(setting, "refused a session to %s: %s (%s)", address, why.replace("your address", "it"), setting)
        if setting == "unpaid_sessions_per_address":
            raise StepRefused("payment_required", f"this node charges for its layers and {why}: send your signed tab with open")
        raise StepRefused("too_many_sessions", f"{why} ({setting}); close one first")

    def _unpaid(self, request_ids: list[bytes]) -> int:
        payments = self.payments
        return 0 if payments is None else sum(1 for request_id in request_ids if payments.payer(request_id) is None)

    def _move(self, session: _Session, connection: _Connection) -> None:
        """Hand `session` to `connection`, within that connection's and its address's limits."""
        session.owner.sessions.discard(session.request_id)
        try:
            self._check_room(connection, unpaid=False)
        except StepRefused:
            session.owner.sessions.add(session.request_id)
            raise
        connection.sessions.add(session.request_id)
        session.owner = connection

    def _forget(self, request_id: bytes) -> _Session | None:
        """Take a request's session off the books (its KV cache is the caller's to close); returns it (None if it was not
        open). Opening the request id again starts a new session, with a new nonce: its commitments never collide with
        this one's."""
        if self.payments is not None:
            self.payments.release(request_id)
        session = self.sessions.pop(request_id, None)
        if session is not None:
            session.owner.sessions.discard(request_id)
        return session

    async def _close(self, message: Message) -> Message:
        session = self._forget(self._check_request_id(message))
        if session is not None:
            async with session.lock:
                await self._close_stage_session(session)
        return Message(wire.CLOSED, message.session)

    async def _end_sessions(self, connection: _Connection) -> None:
        """Close the sessions of a connection that closed (opening one of them again starts a new session)."""
        for request_id in list(connection.sessions):
            session = self.sessions.get(request_id)
            if session is None or session.owner is not connection:
                continue
            self._forget(request_id)
            async with session.lock:
                await self._close_stage_session(session)

    async def _step(self, message: Message) -> _Answer:
        request_id = self._check_request_id(message)
        session = self.sessions.get(request_id)
        if session is None and message.fields.get("via") is not None:
            session = await self._pushed_before_open(request_id)
        if session is None:
            raise StepRefused("unknown_session", "no open session with this request id (expired or never opened); open it again")
        session.last_used = time.monotonic()
        via = message.fields.get("via")
        if via is not None and not _token_matches(via, session.previous_token):
            raise StepRefused("bad_push", "a pushed step must carry the token the client gave this session's previous node")
        async with session.lock:
            answer = self._cached(session, message)
            if answer is None:
                if self.draining:
                    raise StepRefused("shutting_down", "this node is shutting down; use another node for this range")
                answer = await (
                    self._run(session, message) if self.payments is None else self._run_paid(self.payments, session, message)
                )
        return answer

    async def _pushed_before_open(self, request_id: bytes) -> _Session | None:
        """The session of a pushed step that came before its OPEN, once that OPEN is answered (None if it was refused or
        did not come within PUSHED_OPEN_WAIT_S)."""
        opening = self._opening.setdefault(request_id, asyncio.Event())
        try:
            async with asyncio.timeout(PUSHED_OPEN_WAIT_S):
                await opening.wait()
        except TimeoutError:
            if self._opening.get(request_id) is opening:
                del self._opening[request_id]
        return self.sessions.get(request_id)

    async def _run_paid(self, payments: PaymentGate, session: _Session, message: Message) -> _Answer:
        """Run the step as the payment gate admits it; a refused step's answer never goes out (its session is dropped,
        so a retry cannot fetch it from the cache)."""
        tokens = message.tensor.shape[1] if message.tensor is not None and message.tensor.dim() == 3 else 0
        try:
            answer, credit = await payments.admit(session.request_id, tokens, message.fields, lambda: self._run(session, message))
        except PaymentRefused as exc:
            self._forget(session.request_id)
            await self._close_stage_session(session)
            raise StepRefused(exc.code, str(exc)) from None
        answer.credit = credit
        return answer

    def _cached(self, session: _Session, message: Message) -> _Answer | None:
        """The earlier answer to a retried step; refuses steps out of order or with a different input."""
        if message.step == session.next_step:
            return None
        if message.step > session.next_step:
            raise StepRefused("out_of_order", f"step {message.step} arrived but step {session.next_step} is next")
        answer = session.answers.get(message.step)
        if answer is None:
            raise StepRefused("step_too_old", f"step {message.step} was answered and is no longer cached; open a new session")
        if message.tensor is None or tensor_hash(message.payload) != answer.context.input_hash:
            raise StepRefused("conflict", f"step {message.step} was already answered for a different input; open a new session")
        return answer

    def _check_input(self, session: _Session, message: Message) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, size = message.tensor, self.stage.hidden_size
        if hidden is None or hidden.dim() != 3 or hidden.shape[0] != 1 or hidden.shape[2] != size:
            got = None if hidden is None else list(hidden.shape)
            raise StepRefused("bad_tensor", f"a step carries hidden states of shape [1, T, {size}], got {got}")
        if hidden.dtype != self.stage.dtype:
            raise StepRefused("bad_tensor", f"this node computes in {self.stage.dtype}, got {hidden.dtype}")
        tab = message.fields.get("tab")
        if tab is not None and (not isinstance(tab, bytes) or len(tab) > MAX_TAB_BYTES):
            raise StepRefused("bad_tab", f"the tab field must be at most {MAX_TAB_BYTES} bytes")
        position = message.fields.get("position")
        lowest = session.last_start + 1  # a rollback drops positions of the last step only (its rejected draft tokens)
        if not isinstance(position, int) or isinstance(position, bool) or not lowest <= position <= session.next_position:
            raise StepRefused(
                "bad_position",
                f"step starts at position {position!r}; expected {session.next_position}, or from {lowest} on to drop "
                "positions of the last step",
            )
        if position + hidden.shape[1] > session.max_length:
            raise StepRefused(
                "too_long", f"positions up to {position + hidden.shape[1]} exceed the session's max_length {session.max_length}"
            )
        positions = torch.arange(position, position + hidden.shape[1], dtype=torch.int64).unsqueeze(0)
        return hidden, positions

    async def _run(self, session: _Session, message: Message) -> _Answer:
        hidden, positions = self._check_input(session, message)
        try:
            output, compute_s = await self.worker.step(session.stage_id, hidden, positions)
        except UnknownSession:
            self._forget(session.request_id)
            raise StepRefused("unknown_session", "the session expired on this node; open it again and replay") from None
        except (ShapeError, EngineError) as exc:
            raise StepRefused("engine", f"the engine refused the step: {exc}") from None
        output = output.contiguous()
        payload = tensor_bytes(output)
        input_hash = tensor_hash(message.payload)
        position = int(positions[0, 0])
        # a step starting early drops the positions after it: the history says so, for disputes and spot checks
        history = session.history if position == session.next_position else chain_rollback(session.history, position)
        context = StepContext(
            self.model_id,
            self.stage.start,
            self.stage.end,
            session.request_id,
            session.nonce,
            message.step,
            position,
            history,
            input_hash,
        )
        answer = _Answer(context, output, payload, int(compute_s * 1e6))
        session.answers[message.step] = answer
        while len(session.answers) > CACHED_STEPS:
            session.answers.popitem(last=False)
        session.next_step += 1
        session.last_start, session.next_position = position, position + hidden.shape[1]
        session.history = chain_history(history, input_hash)
        self.steps_served += 1
        if self.on_step is not None:
            self.on_step(session.request_id, hidden.shape[1], context.position, compute_s)
        return answer

    async def expire_idle(self) -> None:
        """Close sessions idle for longer than the idle timeout (runs every few seconds)."""
        while True:
            await asyncio.sleep(min(30.0, self.idle_timeout_s / 4))
            cutoff = time.monotonic() - self.idle_timeout_s
            for request_id, session in list(self.sessions.items()):
                if session.last_used < cutoff and not session.lock.locked():
                    self._forget(request_id)
                    await self._close_stage_session(session)

    async def _close_stage_session(self, session: _Session) -> None:
        with contextlib.suppress(UnknownSession):  # the engine expired it already
            await self.worker.call(self.stage.close_session, session.stage_id)

    async def drain(self, timeout: float) -> None:
        """Refuse new work, let steps already running finish (up to `timeout`), then hang up and close every session."""
        self.draining = True
        try:
            await asyncio.wait_for(self._idle.wait(), timeout)
        except TimeoutError:
            log.warning("shutting down with %d step(s) still running after %.0f s", self.steps_in_flight, timeout)
        for transport in list(self._connections):
            await transport.close()
        with contextlib.suppress(TimeoutError):  # their sessions close on the compute thread, which stops next
            await asyncio.wait_for(self._no_connections.wait(), 5.0)


def _token_matches(given: object, expected: bytes | None) -> bool:
    """Whether a pushed step's token is the one the client gave this session's previous node."""
    return expected is not None and isinstance(given, bytes) and hmac.compare_digest(given, expected)
