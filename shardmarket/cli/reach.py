"""`shardmarket node reachability` (how this node can be reached from outside) and `shardmarket node relay` (serve as one)."""

from __future__ import annotations

import asyncio
import json
import sys

from aiohttp import web
from eth_account import Account

from shardmarket.chain.proof import proves, sign_challenge
from shardmarket.config import Config, load_config
from shardmarket.net.reachability import Reachability, Report
from shardmarket.net.relay import ForwardProxy, RelayServer


def register(commands) -> None:
    """Add `reachability` and `relay` under the `shardmarket node` group."""
    reach = commands.add_parser(
        "reachability", help="find how a node on this machine could be reached from outside, and say so (`node up` does it all)"
    )
    reach.add_argument("--port", type=int, help="the TCP port to make reachable (default: [node] port)")
    reach.add_argument("--stun", action="append", metavar="HOST[:PORT]", help="STUN server (default: [reach] stun_servers)")
    reach.add_argument("--relay", action="append", metavar="URL", help="relay/verifier URL (default: [reach] relays)")
    reach.add_argument("--methods", help="comma-separated port mapping methods to try, '' for none (default: [reach] methods)")
    reach.add_argument("--json", action="store_true", help="print the report as one JSON line")
    reach.set_defaults(run=run_reachability)

    relay = commands.add_parser("relay", help="relay for nodes behind NAT: give them a public port, verify endpoints")
    relay.add_argument("--public-host", required=True, help="the public IP address clients reach this relay on")
    relay.add_argument("--host", default="0.0.0.0", help="address to listen on (default 0.0.0.0)")
    relay.add_argument("--port", type=int, default=8400, help="port of the relay's HTTP/WebSocket API (default 8400)")
    relay.add_argument("--rate-mbit", type=float, default=80.0, help="bandwidth cap per node in Mbit/s (default 80)")
    relay.add_argument("--max-nodes", type=int, default=64, help="nodes served at most (default 64)")
    relay.add_argument(
        "--forward-port",
        type=int,
        help="also forward clients to nodes on this port (HTTP CONNECT), so that nodes never see the clients' addresses",
    )
    relay.add_argument(
        "--forward-local", action="store_true", help="forward to private and loopback addresses too (a LAN or a lab)"
    )
    relay.set_defaults(run=run_relay)


async def _probe_responder(port: int, key: bytes) -> web.AppRunner:
    """A stand-in /health on the port, answering challenges with a throwaway key, so the endpoint can be verified."""

    async def health(request: web.Request) -> web.Response:
        challenge = request.query.get("challenge", "")
        try:
            return web.json_response({"challenge": challenge, "signature": sign_challenge(key, challenge)})
        except ValueError as exc:
            raise web.HTTPBadRequest(text=str(exc)) from None

    app = web.Application()
    app.router.add_get("/health", health)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "0.0.0.0", port).start()
    return runner


def reachability_for(args, config: Config, port: int, operator: str) -> Reachability:
    """Reachability of `port`, from the command's --stun/--relay/--methods over the [reach] settings, verified as the
    node of `operator` (the address whose key answers the outside check's challenge)."""
    methods = args.methods.split(",") if args.methods is not None else config.reach.methods
    return Reachability(
        port,
        lambda challenge, health: proves(health, challenge, operator),
        stun_servers=args.stun or config.reach.stun_servers,
        relays=args.relay or config.reach.relays,
        methods=[m for m in methods if m],
        lease_s=config.reach.lease_s,
        refresh_s=config.reach.refresh_s,
        check_s=config.reach.check_s,
    )


async def _reachability(args) -> Report:
    config = load_config()
    port = args.port or config.node.port
    probe = Account.create()
    reach = reachability_for(args, config, port, probe.address)
    try:
        runner = await _probe_responder(port, bytes(probe.key))
    except OSError as exc:
        raise ValueError(f"cannot listen on port {port} ({exc.strerror}): a node runs there? pick a free --port") from None
    try:
        return await reach.establish()
    finally:
        await reach.close()
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
    elif report.endpoint:
        how = f"by {report.method} in {report.seconds:.2f} s, NOT verified from outside: set [reach] relays to check it"
        print(f"endpoint        {report.endpoint}  ({how})")
    else:
        print(
            f"endpoint        none found after {report.seconds:.2f} s: configure a relay ([reach] relays) "
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
    show(report, args.json)
    return 0 if report.endpoint else 1


def run_relay(args) -> int:
    server = RelayServer(args.public_host, args.host, args.rate_mbit * 1e6 / 8, args.max_nodes)
    print(f"relay on http://{args.host}:{args.port}, public host {args.public_host}, {args.rate_mbit:g} Mbit/s per node")
    app = server.app()
    if args.forward_port is not None:
        proxy = ForwardProxy(args.forward_local, args.rate_mbit * 1e6 / 8)

        async def start_forwarding(_app: web.Application) -> None:
            port = await proxy.start(args.host, args.forward_port)
            print(f'forwarding clients to nodes on {args.host}:{port} (client.relay = "{args.public_host}:{port}")', flush=True)

        async def stop_forwarding(_app: web.Application) -> None:
            await proxy.close()

        app.on_startup.append(start_forwarding)
        app.on_cleanup.append(stop_forwarding)
    web.run_app(app, host=args.host, port=args.port, print=None)
    return 0
