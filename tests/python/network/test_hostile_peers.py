"""A node on a public address, probed the way a stranger would: its sessions cost a stranger its limits (per
connection, per address) and close with its connections; until a connection completes the handshake it gets a few
KiB for a second on the node's one port, over raw TCP or HTTP, whatever it sends or dribbles; a connection that goes
silent after its handshake is dropped. Loopback has a whole /8, so peers at many addresses are sockets bound to
127.x.y.z."""

from __future__ import annotations

import asyncio
import os
import struct

import aiohttp
import pytest
import torch

from shardmarket.net import wire
from shardmarket.net.channel import SESSION_PATH, ChannelClosed, SecureChannel, StreamTransport, client_handshake
from shardmarket.net.wire import Message

from network_processes import get_json, running, start_node

HIDDEN = 64  # tiny_config's hidden size
SETTINGS = {
    "handshake_timeout_s": 1,
    "max_handshakes_per_address": 4,
    "max_connections": 400,
    "max_connections_per_address": 16,
    "idle_connection_s": 1.5,
    "max_sessions_per_connection": 2,
    "max_sessions_per_address": 4,
    "max_cache_mb": 1,  # a 64-position session of the tiny model reserves 80 KiB
}
WS_UPGRADE = (
    f"GET {SESSION_PATH} HTTP/1.1\r\nHost: node\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
    "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
).encode()


@pytest.fixture(scope="module")
def node(tiny, tmp_path_factory):
    process = start_node(tiny, "0:5", tmp_path_factory.mktemp("guarded"), settings=SETTINGS)
    with running(process):
        yield process


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 60))


async def connect_from(source: str, port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))


async def handshake_from(source: str, node) -> SecureChannel:
    reader, writer = await connect_from(source, node.port)
    key = bytes.fromhex((await asyncio.to_thread(node.info))["x25519_public_key"])
    return await client_handshake(StreamTransport(reader, writer), key)


async def open_reply(channel: SecureChannel, request_id: bytes) -> Message:
    await channel.send(Message(wire.OPEN, request_id, 0, {"max_length": 64}))
    return await channel.recv()


async def seconds_until_closed(reader: asyncio.StreamReader, limit: float = 8.0) -> float:
    """Read until the node hangs up (an end of stream or a reset); how long that took."""
    loop = asyncio.get_running_loop()
    started = loop.time()
    try:
        async with asyncio.timeout(limit):
            while await reader.read(65536):
                pass
    except ConnectionResetError:
        pass
    return loop.time() - started


async def wait_until(condition, timeout: float = 10.0) -> None:
    """Poll `condition` (run off the event loop) until it holds."""
    deadline = asyncio.get_running_loop().time() + timeout
    while not await asyncio.to_thread(condition):
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def sessions(node) -> int:
    return get_json(f"{node.url}/info")["load"]["sessions"]


def test_a_stranger_holds_a_few_sessions_and_they_close_with_its_connections(node):
    async def go():
        stranger = [await handshake_from("127.0.0.2", node) for _ in range(3)]
        replies = [await open_reply(channel, os.urandom(32)) for channel in stranger for _ in range(3)]
        held = await asyncio.to_thread(sessions, node)
        channel = await handshake_from("127.0.0.3", node)  # someone else is served meanwhile
        request_id = os.urandom(32)
        opened = await open_reply(channel, request_id)
        await channel.send(Message(wire.STEP, request_id, 0, {"position": 0}, torch.randn(1, 3, HIDDEN)))
        answer, _ = await channel.recv(), await channel.recv()  # the result, then its commitment
        await channel.send(Message(wire.OPEN, os.urandom(32), 0, {"max_length": 512}))  # 640 KiB: past the budget
        too_big = await channel.recv()
        await channel.close()
        for channel in stranger:
            await channel.close()
        await wait_until(lambda: sessions(node) == 0)
        return replies, held, opened, answer, too_big

    replies, held, opened, answer, too_big = run(go())
    outcome = [(r.type, r.fields.get("message", "").split("(")[-1].split(")")[0]) for r in replies]
    per_connection, per_address = ("error", "max_sessions_per_connection"), ("error", "max_sessions_per_address")
    assert outcome == [("opened", "")] * 2 + [per_connection] + [("opened", "")] * 2 + [per_connection] + [per_address] * 3
    assert all(r.fields["code"] == "too_many_sessions" for r in replies if r.type == wire.ERROR)
    assert held == 4
    assert opened.type == wire.OPENED and answer.type == wire.RESULT
    assert too_big.type == wire.ERROR and too_big.fields["code"] == "capacity"
    refusals = [line for line in node.log.read_text().splitlines() if "refused a session to 127.0.0.2" in line]
    assert 1 <= len(refusals) <= 2  # one line per kind of limit, not one per refusal


def test_half_open_connections_of_every_transport_are_dropped_at_the_handshake_deadline(node):
    """300 connections from 75 addresses to the node's one port, each silent, or stuck in its HTTP headers, or upgraded
    to a WebSocket that sends no frame, or dribbling a raw TCP hello a byte at a time: all are dropped a second after
    they connected."""

    async def stalled(index: int) -> float:
        source = f"127.0.1.{index // 4 + 1}"
        kind = index % 4
        reader, writer = await connect_from(source, node.port)
        if kind == 1:
            writer.write(b"GET /info HTTP/1.1\r\nHost: node\r\n")  # never ends its headers
        elif kind == 2:
            writer.write(WS_UPGRADE)  # upgraded, then never sends a frame

        async def dribble() -> None:
            hello = wire.stream_frame(wire.encode(Message(wire.HELLO, fields={"key": bytes(32)})))
            for byte in hello:
                writer.write(bytes([byte]))
                await asyncio.sleep(0.1)

        dribbling = asyncio.ensure_future(dribble()) if kind == 3 else None
        try:
            return await seconds_until_closed(reader)
        finally:
            if dribbling is not None:
                dribbling.cancel()
            writer.close()

    async def go() -> list[float]:
        return await asyncio.gather(*(stalled(i) for i in range(300)))

    lifetimes = run(go())
    assert max(lifetimes) < 6, "a stalled connection outlived the handshake deadline"
    assert min(lifetimes) > 0.5, "a connection was refused instead of admitted"
    deadline_lines = [
        line for line in node.log.read_text().splitlines() if "no handshake within 1 s (handshake_timeout_s)" in line
    ]
    assert 1 <= len(deadline_lines) <= 2  # rate-limited: a flood does not flood the log
    assert get_json(f"{node.url}/health")["status"] == "ok"


def test_before_its_handshake_a_peer_gets_a_few_connections_and_tiny_frames(node):
    async def go():
        silent = [await connect_from("127.0.2.1", node.port) for _ in range(6)]
        lifetimes = await asyncio.gather(*(seconds_until_closed(reader) for reader, _ in silent))
        for _, writer in silent:
            writer.close()
        reader, writer = await connect_from("127.0.2.2", node.port)
        writer.write(struct.pack(">I", 100_000) + b"hello")  # a hello claiming 100 kB: refused before it is read
        async with asyncio.timeout(5):
            refusal = await reader.read(65536)
        writer.close()
        async with aiohttp.ClientSession() as http, http.ws_connect(f"{node.url}{SESSION_PATH}") as ws:
            await ws.send_bytes(os.urandom(64 * 2**10))  # a first message of 64 KiB: over the handshake budget
            async with asyncio.timeout(5):
                closing = await ws.receive()
        channel = await handshake_from("127.0.2.3", node)  # the node still serves everyone else
        opened = await open_reply(channel, os.urandom(32))
        await channel.close()
        return lifetimes, refusal, closing, opened

    lifetimes, refusal, closing, opened = run(go())
    assert sorted(lifetimes)[:2] == [pytest.approx(0, abs=0.5)] * 2  # over max_handshakes_per_address: refused at once
    assert all(0.5 < t < 6 for t in sorted(lifetimes)[2:])  # the others: dropped at the deadline
    error = wire.decode(refusal[4:])
    assert error.type == wire.ERROR and error.fields["code"] == "too_large"
    assert closing.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR)
    assert opened.type == wire.OPENED


def test_a_connection_that_goes_silent_after_its_handshake_is_dropped(node):
    async def go() -> float:
        channel = await handshake_from("127.0.3.1", node)
        started = asyncio.get_running_loop().time()
        with pytest.raises(ChannelClosed):
            async with asyncio.timeout(8):
                await channel.recv()
        await channel.close()
        return asyncio.get_running_loop().time() - started

    assert 1.0 < run(go()) < 6  # idle_connection_s is 1.5 s


@pytest.fixture(scope="module")
def full_node(tiny, tmp_path_factory):
    """A node with few connection slots and a handshake deadline longer than the test, so only eviction frees a slot."""
    settings = {"max_connections": 12, "max_handshakes_per_address": 4, "handshake_timeout_s": 60}
    process = start_node(tiny, "0:5", tmp_path_factory.mktemp("full"), settings=settings)
    with running(process):
        yield process


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    try:
        return not await asyncio.wait_for(reader.read(65536), seconds)
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False


def test_a_half_open_flood_from_many_addresses_cannot_keep_a_client_from_its_handshake(full_node):
    key = bytes.fromhex(full_node.info()["x25519_public_key"])  # read before the flood takes every slot

    async def go():
        flood = [await connect_from(f"127.0.0.{4 + i % 4}", full_node.port) for i in range(12)]
        await asyncio.sleep(0.2)  # let the node accept them all
        reader, writer = await connect_from("127.0.0.9", full_node.port)
        channel = await asyncio.wait_for(client_handshake(StreamTransport(reader, writer), key), 5)
        opened = await open_reply(channel, os.urandom(32))
        closed = [await closed_within(r, 0.5) for r, _ in flood]
        await channel.close()
        for _, w in flood:
            w.close()
        return opened, closed

    opened, closed = run(go())
    assert opened.type == wire.OPENED
    assert sum(closed) == 1  # the newcomer took one flooder's slot, and only one
