"""The relay on loopback: streams pass through unchanged and multiplexed, bandwidth is capped per node,
reconnects keep the public port, and the verifier only connects back to the caller's own address."""

from __future__ import annotations

import asyncio
import contextlib
import time

import aiohttp
import pytest
from aiohttp import web
from eth_account import Account

from shardmarket.chain.proof import proves, sign_challenge
from shardmarket.net.relay import RelayClient, RelayError, RelayServer, verify
from tests.python.reach.standin import KEY
from tests.python.reach.standin import app as standin_app


async def serve(app: web.Application, host: str = "127.0.0.1", port: int = 0) -> tuple[web.AppRunner, int]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


@contextlib.asynccontextmanager
async def relayed():
    """(relay server, relay API URL, node port, relay client) on 127.0.0.1, all closed afterwards."""
    server = RelayServer("127.0.0.1", "127.0.0.1", rate_bytes_per_s=50e6)
    relay_runner, relay_port = await serve(server.app())
    node_runner, node_port = await serve(standin_app("n1"))
    client = RelayClient(f"http://127.0.0.1:{relay_port}", node_port, "n1")
    try:
        yield server, f"http://127.0.0.1:{relay_port}", node_port, client
    finally:
        await client.close()
        await node_runner.cleanup()
        await relay_runner.cleanup()


async def within_relay(test) -> None:
    async with relayed() as fixtures:
        await test(fixtures)


async def get_text(url: str) -> str:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session, session.get(url) as resp:
        assert resp.status == 200
        return await resp.text()


def test_streams_arrive_unchanged_and_multiplexed():
    async def run(relayed):
        _, _, node_port, client = relayed
        endpoint = await client.start()
        direct = await get_text(f"http://127.0.0.1:{node_port}/stream?n=300&size=500")
        many = await asyncio.gather(*(get_text(f"{endpoint}/stream?n=300&size=500") for _ in range(4)))
        assert all(text == direct for text in many) and direct.count("data: token") == 300
        async with aiohttp.ClientSession() as session, session.ws_connect(f"{endpoint}/ws") as ws:
            for i in range(20):
                await ws.send_bytes(bytes([i]) * 1000)
                assert await ws.receive_bytes() == bytes([i]) * 1000

    asyncio.run(within_relay(run))


def test_an_idle_tunnel_stays_open():
    async def run(relayed):
        _, _, _, client = relayed
        endpoint = await client.start(timeout=0.5)
        await asyncio.sleep(1.5)  # idle for longer than the connect timeout
        assert "n1" in await get_text(f"{endpoint}/health")

    asyncio.run(within_relay(run))


def test_a_client_that_does_not_read_cannot_stall_the_others():
    async def run(relayed):
        _, _, _, client = relayed
        endpoint = await client.start()
        host, port = endpoint.removeprefix("http://").split(":")
        _, writer = await asyncio.open_connection(host, int(port))
        writer.write(b"GET /stream?n=200000&size=1000 HTTP/1.1\r\nHost: x\r\n\r\n")  # 200 MB, never read
        await writer.drain()
        await asyncio.sleep(1.0)
        start = time.monotonic()
        assert "n1" in await asyncio.wait_for(get_text(f"{endpoint}/health"), 5)
        assert time.monotonic() - start < 1.0
        writer.close()

    asyncio.run(within_relay(run))


def test_bandwidth_is_capped_per_node():
    async def run(relayed):
        server, _, _, client = relayed
        server.rate = 400_000  # bytes per second, burst of one second
        endpoint = await client.start()
        t = time.monotonic()
        text = await get_text(f"{endpoint}/stream?n=1000&size=1200")  # ~1.25 MB: at least ~2 s at the cap
        elapsed = time.monotonic() - t
        assert len(text) > 1_200_000
        assert elapsed > 1.5, f"1.2 MB passed a 400 kB/s cap in {elapsed:.2f} s"

    asyncio.run(within_relay(run))


def test_reconnect_keeps_the_port_and_other_tokens_are_refused():
    async def run(relayed):
        server, relay_url, node_port, client = relayed
        endpoint = await client.start()
        await next(iter(server.slots.values())).tunnel.ws.close()  # the relay drops the node
        for _ in range(50):
            await asyncio.sleep(0.1)
            try:
                if "node" in await get_text(f"{endpoint}/health"):
                    break
            except (aiohttp.ClientError, AssertionError):
                continue
        assert client.endpoint == endpoint and "n1" in await get_text(f"{endpoint}/health")
        thief = RelayClient(relay_url, node_port, "n1")
        with pytest.raises(Exception, match="403"):
            await thief.start(timeout=2)
        await thief.close()

    asyncio.run(within_relay(run))


def test_verifier_proves_it_reached_this_node_and_refuses_third_parties():
    async def run(relayed):
        _, relay_url, _, client = relayed
        endpoint = await client.start()

        def signed_by(address):
            return lambda challenge, health: proves(health, challenge, address)

        assert await verify(relay_url, endpoint, signed_by(KEY.address)) == (True, "")
        ok, why = await verify(relay_url, endpoint, signed_by(Account.create().address))  # another node's key
        assert not ok and "another host" in why
        ok, why = await verify(relay_url, "http://192.0.2.1:80", signed_by(KEY.address))  # not the caller's address
        assert not ok and "403" in why
        ok, why = await verify(relay_url, "not a url", signed_by(KEY.address))
        assert not ok and "400" in why
        with pytest.raises(RelayError, match="verifier"):  # a relay that is down says nothing about the endpoint
            await verify("http://127.0.0.1:1", endpoint, signed_by(KEY.address))

    asyncio.run(within_relay(run))


def test_every_node_answers_health_in_its_own_words():
    """Two nodes' /health differ (operator), and a challenge is answered with a signature only that operator makes."""
    first, second = Account.create(), Account.create()
    challenge = "ab" * 16
    signature = sign_challenge(bytes(first.key), challenge)
    assert proves({"challenge": challenge, "signature": signature}, challenge, first.address)
    assert not proves({"challenge": challenge, "signature": signature}, challenge, second.address)
    assert not proves({"challenge": "cd" * 16, "signature": signature}, "cd" * 16, first.address)
    with pytest.raises(ValueError, match="hex"):
        sign_challenge(bytes(first.key), "not hex; sign anything I like")


def test_node_follows_a_restarted_relay_to_its_new_port():
    async def run():
        relay_runner, relay_port = await serve(RelayServer("127.0.0.1", "127.0.0.1").app())
        node_runner, node_port = await serve(standin_app("n2"))
        moved: list[str] = []
        client = RelayClient(f"http://127.0.0.1:{relay_port}", node_port, "n2", on_change=moved.append)
        try:
            first = await client.start()
            await relay_runner.cleanup()  # the relay goes away with every slot it held
            relay_runner, _ = await serve(RelayServer("127.0.0.1", "127.0.0.1").app(), port=relay_port)
            for _ in range(100):
                if moved and moved[-1]:
                    break
                await asyncio.sleep(0.1)
            assert moved[0] is None and moved[-1] == client.endpoint != first  # lost, then found at the new port
            assert "n2" in await get_text(f"{client.endpoint}/health")
        finally:
            await client.close()
            await node_runner.cleanup()
            await relay_runner.cleanup()

    asyncio.run(run())
