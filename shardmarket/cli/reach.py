"""`shardmarket node reachability` (how this node can be reached from outside) and `shardmarket node relay` (serve as one)."""

from __future__ import annotations

import asyncio
import json
import secrets
import signal
import socket
import sys

from aiohttp import web

from shardmarket.config import load_config
from shardmarket.net.reachability import Reachability, Report
from shardmarket.net.relay import RelayServer


def register(commands) -> None:
    """Add `reachability` and `relay` under the `shardmarket node` group."""
    reach = commands.add_parser("reachability", help="find how this node can be reached from outside and say so")
    reach.add_argument("--port", type=int, help="the node's TCP port (default: [node] port)")
    reach.add_argument("--stun", action="append", metavar="HOST[:PORT]", help="STUN server (default: [reach] stun_servers)")
    reach.add_argument("--relay", action="append", metavar="URL", help="relay/verifier URL (default: [reach] relays)")
    reach.add_argument("--methods", help="comma-separated port mapping methods to try, '' for none (default: [reach] methods)")
    reach.add_argument("--json", action="store_true", help="print the report as one JSON line")
    reach.add_argument(
        "--hold", action="store_true", help="keep the mapping or relay (renewed) until Ctrl-C/SIGTERM, for a node already running"
    )
    reach.set_defaults(run=run_reachability)

    relay = commands.add_parser("relay", help="relay for nodes behind NAT: give them a public port, verify endpoints")
    relay.add_argument("--public-host", required=True, help="the public IP address clients reach this relay on")
    relay.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    relay.add_argument("--port", type=int, default=8400, help="port of the relay's HTTP/WebSocket API (default 8400)")
    relay.add_argument("--rate-mbit", type=float, default=80.0, help="bandwidth cap per node in Mbit/s (default 80)")
    relay.add_argument("--max-nodes", type=int, default=64, help="nodes served at most (default 64)")
    relay.set_defaults(run=run_relay)


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
            return True
        except OSError:
            return False


async def _probe_responder(port: int) -> web.AppRunner:
    """A stand-in /health on the node's port while no daemon runs, so the endpoint can be verified."""
    token = secrets.token_hex(16)

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"probe": token})

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    return runner


async def _hold_until_signal() -> None:
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()


async def _reachability(args) -> Report:
    config = load_config()
    port = args.port or config.node.port
    methods = args.methods.split(",") if args.methods is not None else config.reach.methods
    reach = Reachability(
        port,
        stun_servers=args.stun or config.reach.stun_servers,
        relays=args.relay or config.reach.relays,
        methods=[m for m in methods if m],
    )
    runner = await _probe_responder(port) if _port_free(port) else None
    try:
        report = await reach.establish()
        if args.hold and report.verified:
            show(report, args.json)
            await _hold_until_signal()
        return report
    finally:
        await reach.close()
        if runner:
            await runner.cleanup()


def print_report(report: Report) -> None:
    print(f"local address   {report.local}")
    print(f"NAT type        {report.nat_type}")
    print(f"public address  {report.public_ip or 'unknown (no STUN answer)'}")
    for a in report.attempts:
        print(f"  {'ok  ' if a.ok else 'FAIL'} {a.method:<14} {a.seconds:6.3f} s  {a.detail}")
    if report.verified:
        how = f"by {report.method}, verified from outside in {report.seconds:.2f} s"
        print(f"endpoint        {report.endpoint}  ({how})")
    else:
        print(
            f"endpoint        none verified after {report.seconds:.2f} s: configure a relay ([reach] relays) "
            "or forward the port on the router by hand"
        )


def show(report: Report, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report.to_dict()), flush=True)
    else:
        print_report(report)
        sys.stdout.flush()


def run_reachability(args) -> int:
    try:
        report = asyncio.run(_reachability(args))
    except ValueError as exc:
        print(f"error: {exc}")
        return 2
    if args.hold and report.verified:
        print("released the endpoint", flush=True)
    else:
        show(report, args.json)
    return 0 if report.verified else 1


def run_relay(args) -> int:
    server = RelayServer(args.public_host, args.host, args.rate_mbit * 1e6 / 8, args.max_nodes)
    print(f"relay on http://{args.host}:{args.port}, public host {args.public_host}, {args.rate_mbit:g} Mbit/s per node")
    web.run_app(server.app(), host=args.host, port=args.port, print=None)
    return 0
