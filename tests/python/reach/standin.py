"""A light stand-in for the node daemon in the lab (no model to load): /health, a streamed answer and a WebSocket echo,
made reachable by shardmarket.net.reachability, proving who it is with a key of its own. Prints the report as one JSON
line, then serves until SIGTERM, when it removes its port mapping or leaves the relay."""

from __future__ import annotations

import argparse
import asyncio
import json
import signal
import sys

from aiohttp import web
from eth_account import Account

from shardmarket.chain.proof import proves, sign_challenge
from shardmarket.net.reachability import Reachability
from shardmarket.net.relay import RelayClient

KEY = Account.create()


def app(node_id: str) -> web.Application:
    async def stream(request: web.Request) -> web.StreamResponse:
        """A chat-like answer: `n` chunks of `size` bytes, each flushed on its own."""
        n, size = int(request.query.get("n", "16")), int(request.query.get("size", "16"))
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for i in range(n):
            await resp.write(f"data: token {i} {'x' * size}\n\n".encode())
        await resp.write_eof()
        return resp

    async def echo(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            await ws.send_bytes(msg.data if isinstance(msg.data, bytes) else msg.data.encode())
        return ws

    async def health(request: web.Request) -> web.Response:
        body = {"node": node_id}
        if "challenge" in request.query:
            body |= {
                "challenge": request.query["challenge"],
                "signature": sign_challenge(bytes(KEY.key), request.query["challenge"]),
            }
        return web.json_response(body)

    application = web.Application()
    application.router.add_get("/health", health)
    application.router.add_get("/stream", stream)
    application.router.add_get("/ws", echo)
    return application


async def main(args: argparse.Namespace) -> None:
    runner = web.AppRunner(app(args.node_id))
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", args.port).start()
    reach = Reachability(
        args.port,
        lambda challenge, health: proves(health, challenge, KEY.address),
        stun_servers=args.stun,
        relays=args.relay,
        methods=args.methods.split(","),
        refresh_s=args.refresh_s,
        lease_s=args.lease_s,
        node_id=args.node_id,
    )
    report = await reach.establish()
    result = report.to_dict()
    extra_relay = None
    if args.also_relay and report.method != "relay":  # a second path, to compare latency with the direct one
        extra_relay = RelayClient(args.relay[0], args.port, f"{args.node_id}-extra")
        result["relay_endpoint"] = await extra_relay.start()
    print(json.dumps(result), flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await reach.close()
    if extra_relay:
        await extra_relay.close()
    await runner.cleanup()
    print(json.dumps({"closed": True}), flush=True)


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, default=7300)
    parser.add_argument("--stun", action="append", default=[])
    parser.add_argument("--relay", action="append", default=[])
    parser.add_argument("--methods", default="pcp,natpmp,upnp")
    parser.add_argument("--refresh-s", type=float, default=10.0)
    parser.add_argument("--lease-s", type=int, default=3600)
    parser.add_argument("--node-id", default="standin")
    parser.add_argument("--also-relay", action="store_true", help="also hold a relayed endpoint (for benchmarks)")
    asyncio.run(main(parser.parse_args(sys.argv[1:])))
