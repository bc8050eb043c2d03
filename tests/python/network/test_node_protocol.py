"""A real node process on loopback, spoken to frame by frame: bad frames get error frames, the node survives,
retries return the same signed commitment, a request id opened again is a new session whose commitments never
look like equivocation, the wrong key is refused, shutdown finishes the running step, and channels kept between
requests carry new sessions for a while."""

from __future__ import annotations

import asyncio
import os
import signal
import struct
import time

import pytest
import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from eth_utils import keccak

from shardmarket.chain.eip712 import (
    EMPTY_HISTORY,
    Commitment,
    Domain,
    StepContext,
    chain_history,
    context_hash,
    recover_commitment_signer,
    tensor_hash,
)
from shardmarket.engine.tensors import tensor_bytes
from shardmarket.net import wire
from shardmarket.net.channel import ChannelClosed, ChannelPool, KeyMismatch, SecureChannel, client_handshake, open_transport
from shardmarket.net.crypto import public_bytes
from shardmarket.net.wire import Message

from network_processes import get_json, running, start_node, wait_ready

HIDDEN = 64  # tiny_config's hidden size


@pytest.fixture(scope="module")
def node(tiny, tmp_path_factory):
    process = start_node(tiny, "0:2", tmp_path_factory.mktemp("protocol-node"))
    with running(process):
        yield process


@pytest.fixture
def info(node) -> dict:
    return node.info()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def connect(node, info, kind: str = "tcp") -> SecureChannel:
    transport = await open_transport(node.url, kind, node.port, wire.DEFAULT_LIMITS, 10)
    return await client_handshake(transport, bytes.fromhex(info["x25519_public_key"]))


async def open_session(channel: SecureChannel, request_id: bytes, max_length: int = 64) -> bytes:
    """Open `request_id`; returns the session nonce the node chose."""
    await channel.send(Message(wire.OPEN, request_id, 0, {"max_length": max_length}))
    reply = await channel.recv()
    assert reply.type == wire.OPENED, reply.fields
    assert isinstance(reply.fields["nonce"], bytes) and len(reply.fields["nonce"]) == 32
    return reply.fields["nonce"]


def step(request_id: bytes, number: int, position: int, hidden: torch.Tensor, **fields) -> Message:
    return Message(wire.STEP, request_id, number, {"position": position, **fields}, hidden)


async def wait_until(condition, timeout: float = 10.0) -> None:
    """Poll `condition` (run off the event loop) until it holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await asyncio.to_thread(condition):
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def assert_alive(node) -> None:
    assert node.process.poll() is None
    assert get_json(f"{node.url}/health")["status"] == "ok"


def test_info_advertises_what_a_client_needs(info):
    assert info["layers"] == [0, 2] and info["model"]["num_layers"] == 5 and info["model"]["hidden_size"] == HIDDEN
    assert len(bytes.fromhex(info["x25519_public_key"])) == 32
    assert info["operator"].startswith("0x") and info["transports"] == {"tcp": "same-port", "ws": "/v1/session"}
    assert {"sessions", "queued", "decode_ms"} <= set(info["load"])


@pytest.mark.parametrize("kind", ["tcp", "ws"])
def test_steps_are_answered_with_a_commitment_signed_by_the_operator(node, info, kind):
    async def go():
        channel = await connect(node, info, kind)
        request_id = os.urandom(32)
        nonce = await open_session(channel, request_id)
        hidden = torch.randn(1, 4, HIDDEN)
        await channel.send(step(request_id, 0, 0, hidden, tab=b"ignored by a free node"))
        reply, signed = await channel.recv(), await channel.recv()
        await channel.close()
        return request_id, nonce, hidden, reply, signed

    request_id, nonce, hidden, reply, signed = run(go())
    assert reply.type == wire.RESULT and reply.tensor.shape == (1, 4, HIDDEN)
    assert not torch.equal(reply.tensor, hidden)
    assert "signature" not in reply.fields  # the result goes out first; its commitment follows
    assert signed.type == wire.COMMIT and (signed.session, signed.step) == (request_id, 0)
    # the node commits to its model and layers, this session, the step's position and history, and the input
    context = StepContext(
        keccak(text=info["model"]["id"]), 0, 2, request_id, nonce, 0, 0, EMPTY_HISTORY, tensor_hash(tensor_bytes(hidden))
    )
    commitment = Commitment(context, tensor_hash(reply.payload), signed.fields["issued_at"])
    assert (signed.fields["input_hash"], signed.fields["output_hash"]) == (context.input_hash, commitment.output_hash)
    assert abs(commitment.issued_at - time.time()) < 60
    domain = Domain(info["commitment_domain"]["chain_id"], info["commitment_domain"]["verifying_contract"])
    assert recover_commitment_signer(commitment, signed.fields["signature"], domain) == info["operator"]


def test_retried_step_returns_the_cached_answer_and_the_same_commitment(node, info):
    """A reconnect (as after a network blip the node has not noticed yet) moves the session to the new connection: a
    retried step gets the cached answer, the old connection's close leaves the session alone, the new one's ends it;
    the request id opened again is a new session with a new nonce."""

    async def go():
        old = await connect(node, info)
        request_id = os.urandom(32)
        nonce = await open_session(old, request_id)
        hidden = torch.randn(1, 3, HIDDEN)
        await old.send(step(request_id, 0, 0, hidden))
        first, first_signed = await old.recv(), await old.recv()
        channel = await connect(node, info)
        moved_nonce = await open_session(channel, request_id)
        await old.close()
        await channel.send(step(request_id, 0, 0, hidden))
        again, again_signed = await channel.recv(), await channel.recv()
        await channel.send(step(request_id, 0, 0, torch.randn(1, 3, HIDDEN)))
        conflict = await channel.recv()
        await channel.send(step(request_id, 5, 3, torch.randn(1, 1, HIDDEN)))
        ahead = await channel.recv()
        await channel.close()
        await wait_until(lambda: node.info()["load"]["sessions"] == 0)
        channel = await connect(node, info)
        await channel.send(Message(wire.OPEN, request_id, 0, {"max_length": 64}))
        reopened = await channel.recv()
        await channel.close()
        return first, again, conflict, ahead, first_signed, again_signed, reopened, nonce, moved_nonce

    first, again, conflict, ahead, first_signed, again_signed, reopened, nonce, moved_nonce = run(go())
    assert moved_nonce == nonce  # the reconnect carried on the same session
    assert again.type == wire.RESULT and again.payload == first.payload
    assert again_signed.type == wire.COMMIT and again_signed.fields["signature"] == first_signed.fields["signature"]
    assert conflict.type == wire.ERROR and conflict.fields["code"] == "conflict"
    assert ahead.type == wire.ERROR and ahead.fields["code"] == "out_of_order"
    # once ended, the request id opens a new session under a new nonce: its commitments never collide with the old ones
    assert reopened.type == wire.OPENED and reopened.fields["nonce"] != nonce


def test_a_free_node_honours_every_test_fault(tiny, tmp_path):
    """`node run --layers ... --test-fault equivocate`: the same builder makes free and paid nodes, so a free node
    started to equivocate answers a retried step with a different output, signed again."""
    node = start_node(tiny, "0:2", tmp_path / "equivocating", "--test-fault", "equivocate")
    try:
        wait_ready(node)
        info = node.info()

        async def go():
            channel = await connect(node, info)
            request_id = os.urandom(32)
            await open_session(channel, request_id)
            hidden = torch.randn(1, 3, HIDDEN)
            answers = []
            for _ in range(2):
                await channel.send(step(request_id, 0, 0, hidden))
                answers.append((await channel.recv(), await channel.recv()))
            await channel.close()
            return answers

        (first, first_signed), (again, again_signed) = run(go())
    finally:
        node.stop()
    assert first.type == again.type == wire.RESULT and again.payload != first.payload
    assert again_signed.fields["output_hash"] != first_signed.fields["output_hash"]
    # the same session, step, history and input: this pair is slashable equivocation
    assert (again_signed.fields["history_hash"], again_signed.fields["input_hash"]) == (
        first_signed.fields["history_hash"],
        first_signed.fields["input_hash"],
    )


def test_a_request_id_opened_again_is_a_new_session_whose_answers_never_look_like_equivocation(node, info):
    """Issue 18's attack without a restart: a client closes a request, opens the same id again, feeds another first
    step and then the same input at step 1. The node answers step 1 differently (its KV cache differs), honestly: the
    two commitments name different session nonces and histories, so they are no equivocation."""
    same = torch.randn(1, 1, HIDDEN)

    async def session(channel, request_id: bytes, first: torch.Tensor):
        nonce = await open_session(channel, request_id)
        await channel.send(step(request_id, 0, 0, first))
        await channel.recv(), await channel.recv()
        await channel.send(step(request_id, 1, 2, same))
        answer, signed = await channel.recv(), await channel.recv()
        await channel.send(Message(wire.CLOSE, request_id))
        assert (await channel.recv()).type == wire.CLOSED
        return nonce, first, answer, signed

    async def go():
        channel = await connect(node, info)
        request_id = os.urandom(32)
        sessions = [await session(channel, request_id, torch.randn(1, 2, HIDDEN)) for _ in range(2)]
        await channel.close()
        return request_id, sessions

    request_id, sessions = run(go())
    contexts = []
    for nonce, first, _, signed in sessions:
        history = chain_history(EMPTY_HISTORY, tensor_hash(tensor_bytes(first)))
        assert signed.fields["history_hash"] == history
        model = keccak(text=info["model"]["id"])
        contexts.append(StepContext(model, 0, 2, request_id, nonce, 1, 2, history, tensor_hash(tensor_bytes(same))))
    (_, _, a, a_signed), (_, _, b, b_signed) = sessions
    assert a.payload != b.payload and a_signed.fields["input_hash"] == b_signed.fields["input_hash"]
    assert context_hash(contexts[0]) != context_hash(contexts[1])
    domain = Domain(info["commitment_domain"]["chain_id"], info["commitment_domain"]["verifying_contract"])
    for context, answer, signed in zip(contexts, (a, b), (a_signed, b_signed), strict=True):
        commitment = Commitment(context, tensor_hash(answer.payload), signed.fields["issued_at"])
        assert recover_commitment_signer(commitment, signed.fields["signature"], domain) == info["operator"]


def test_bad_steps_get_error_frames_and_the_session_stays_usable(node, info):
    async def go():
        channel = await connect(node, info)
        request_id = os.urandom(32)
        await open_session(channel, request_id, max_length=8)
        answers = []
        for bad in (
            step(request_id, 0, 0, torch.randn(1, 2, HIDDEN - 1)),  # wrong hidden size
            step(request_id, 0, 0, torch.randn(1, 2, HIDDEN).half()),  # wrong dtype
            step(request_id, 0, 3, torch.randn(1, 2, HIDDEN)),  # wrong position
            step(request_id, 0, 0, torch.randn(1, 9, HIDDEN)),  # past max_length
            step(os.urandom(32), 0, 0, torch.randn(1, 2, HIDDEN)),  # never opened
            step(request_id, 0, 0, torch.randn(1, 2, HIDDEN), tab="not bytes"),
            Message(wire.RESULT, request_id),  # a type a node does not take
        ):
            await channel.send(bad)
            answers.append(await channel.recv())
        await channel.send(step(request_id, 0, 0, torch.randn(1, 2, HIDDEN)))
        answers.append(await channel.recv())
        await channel.close()
        return answers

    *errors, good = run(go())
    assert [e.fields["code"] for e in errors] == [
        "bad_tensor",
        "bad_tensor",
        "bad_position",
        "too_long",
        "unknown_session",
        "bad_tab",
        "bad_type",
    ]
    assert all(e.type == wire.ERROR and e.fields["message"] for e in errors)
    assert good.type == wire.RESULT
    assert_alive(node)


def test_malformed_oversized_replayed_and_tampered_frames_inside_the_session(node, info):
    async def go():
        channel = await connect(node, info)
        transport, cipher = channel.transport, channel.cipher
        request_id = os.urandom(32)
        await open_session(channel, request_id)
        codes = []
        await transport.send(cipher.seal(b"\x00\x00\x00\x05garbage"))  # authentic but malformed
        codes.append((await channel.recv()).fields["code"])
        huge = {
            "v": wire.WIRE_VERSION,
            "type": "step",
            "session": request_id,
            "dtype": "float32",
            "shape": [1, 2**20, 2**20],
            "nbytes": 2**42,
        }
        import msgpack

        packed = msgpack.packb(huge, use_bin_type=True)
        await transport.send(cipher.seal(struct.pack(">I", len(packed)) + packed))  # claims 4 TiB
        codes.append((await channel.recv()).fields["code"])
        sealed = cipher.seal(wire.encode(step(request_id, 0, 0, torch.randn(1, 1, HIDDEN))))
        await transport.send(sealed)
        codes += [(await channel.recv()).type, (await channel.recv()).type]
        await transport.send(sealed)  # replayed by someone on the path
        codes.append((await channel.recv()).fields["code"])
        await transport.send(sealed[:-1] + bytes([sealed[-1] ^ 1]))  # tampered
        codes.append((await channel.recv()).fields["code"])
        await channel.send(step(request_id, 1, 1, torch.randn(1, 1, HIDDEN)))
        codes += [(await channel.recv()).type, (await channel.recv()).type]
        transport.writer.write(struct.pack(">I", 2**31))  # a stream length over the limit: error, then hang up
        codes.append((await channel.recv()).fields["code"])
        try:
            await channel.recv()
        except ChannelClosed:
            codes.append("closed")
        await channel.close()
        return codes

    assert run(go()) == [
        "bad_frame",
        "too_large",
        wire.RESULT,
        wire.COMMIT,
        "auth_failed",
        "auth_failed",
        wire.RESULT,
        wire.COMMIT,
        "too_large",
        "closed",
    ]
    assert_alive(node)


def test_garbage_truncated_and_oversized_streams_leave_the_node_running(node, info):
    async def raw(data: bytes, read: bool = True) -> bytes:
        reader, writer = await asyncio.open_connection("127.0.0.1", node.port)
        writer.write(data)
        await writer.drain()
        answer = await asyncio.wait_for(reader.read(65536), 10) if read else b""
        writer.close()
        return answer

    garbage = run(raw(wire.stream_frame(b"\xff" * 40)))  # not a hello
    error = wire.decode(garbage[4:])
    assert error.type == wire.ERROR and "handshake" in error.fields["message"]
    oversized = wire.decode(run(raw(struct.pack(">I", 2**31)))[4:])  # a length over the limit: error, then hang up
    assert oversized.type == wire.ERROR and oversized.fields["code"] == "too_large"
    run(raw(struct.pack(">I", 1000) + b"short", read=False))  # truncated, then gone
    assert_alive(node)


def test_a_client_pinning_another_key_refuses_the_node(node, info):
    async def go():
        transport = await open_transport(node.url, "tcp", node.port, wire.DEFAULT_LIMITS, 10)
        try:
            await client_handshake(transport, public_bytes(X25519PrivateKey.generate()))
        finally:
            await transport.close()

    with pytest.raises(KeyMismatch, match="pinned"):
        run(go())
    assert_alive(node)


def test_the_channel_pool_keeps_a_few_channels_per_node_for_a_while(node, info):
    """A kept channel carries a new session; beyond `per_node` a channel is closed rather than kept, and one idle for
    longer than `idle_s` is closed rather than handed out."""

    async def scenario() -> None:
        pool, key = ChannelPool(idle_s=0.5, per_node=2), (node.url, "tcp")
        channels = [await connect(node, info) for _ in range(3)]
        for channel in channels:
            await pool.keep(key, channel)
        assert len(pool) == 2
        with pytest.raises(ChannelClosed):
            await channels[2].send(Message(wire.CLOSE, os.urandom(32)))  # the third was closed
        taken = await pool.take(key)
        assert taken is channels[1]  # the most recently kept
        await open_session(taken, os.urandom(32))
        await pool.keep(key, taken)
        await asyncio.sleep(0.6)
        assert await pool.take(key) is None and len(pool) == 0  # both idle too long
        for channel in channels[:2]:
            with pytest.raises(ChannelClosed):
                await channel.send(Message(wire.CLOSE, os.urandom(32)))

    run(scenario())
    assert_alive(node)


def test_graceful_shutdown_finishes_the_running_steps(tiny, tmp_path):
    node = start_node(tiny, "0:5", tmp_path / "draining")
    wait_ready(node)
    info = node.info()

    async def go():
        channels = [await connect(node, info) for _ in range(4)]
        for channel in channels:
            request_id = os.urandom(32)
            await open_session(channel, request_id, max_length=512)
            await channel.send(step(request_id, 0, 0, torch.randn(1, 500, HIDDEN)))
        await asyncio.sleep(0.01)
        node.process.send_signal(signal.SIGTERM)
        return await asyncio.gather(*(channel.recv() for channel in channels))

    try:
        answers = run(go())
        assert [a.type for a in answers] == [wire.RESULT] * 4
        assert all(a.tensor.shape == (1, 500, HIDDEN) for a in answers)
        assert node.process.wait(30) == 0
        assert "node stopped" in node.log.read_text()
    finally:
        node.stop()
