"""Load benchmark: what a 3-node pipeline and the OpenAI API in front of it hold, with and without a hostile peer.

A seeded random model (small, so that 2 cores can serve hundreds of streams) is split over three paid `node run`
processes, staked and registered on anvil; `client serve` fronts them and pays from its deposit (`--free`: free
nodes, no chain). The nodes run with the default limits, except that one address (the API's) may hold 256 connections
and sessions.
For each level of concurrency (10, 50, 200 streaming callers by default) every caller sends `--requests` streamed
completions one after the other, and the run is measured twice: alone, and while a hostile peer (a process of its
own, `--attack`) runs the denial-of-service patterns of a stranger on the internet against the same nodes, from 8
addresses (127.0.0.2-9) at once:

- session flood: completes the handshake and OPENs sessions it never uses, on many connections, and leaves the
  connections open or drops them with the sessions still open;
- half-open connections: TCP connections to the node's port that never send a byte;
- slowloris: a hello frame dribbled a byte at a time;
- huge frame: a length prefix of 256 MiB followed by junk, before any handshake;
- silent WebSocket: the upgrade to the session endpoint, then nothing.

Figures per level and mode: errors seen by callers, p50/p99 time to first token and inter-token latency (ms),
aggregate tokens/s, and each node's peak resident memory (MiB, sampled from /proc); the attacker reports what
it managed (sessions opened, connections the nodes dropped or refused). The goal is 0 errors for callers at 50
concurrent streams under attack, with node memory bounded.

This is a benchmark, not a test: it prints JSON on its last line and asserts nothing.

Usage: .venv/bin/python bench/load.py [--levels 10,50,200] [--tokens 16] [--requests 2] [--no-attack]
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shardmarket.cli.devmarket import DevMarket, node_command
from shardmarket.engine.models import random_checkpoint, tiny_config
from shardmarket.net import wire
from shardmarket.net.channel import SESSION_PATH, StreamTransport, client_handshake
from shardmarket.net.wire import Message

ROOT = Path(__file__).resolve().parents[1]
API_KEY = "load-bench"
ATTACKER_ADDRESSES = 8
PROMPT = "The lighthouse keeper climbed the stairs and"
MODEL = tiny_config(
    "llama", vocab_size=384, hidden_size=128, intermediate_size=352, num_hidden_layers=6, max_position_embeddings=1024
)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_http(url: str, process: subprocess.Popen, what: str, headers: dict | None = None, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}")
        try:
            urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=1).read()
            return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"{what} did not answer {url} within {timeout:.0f} s")


# The nodes' limits in this bench: defaults, except those that one address carrying every caller's sessions (the API,
# a session per connection) needs: a connection, a handshake and a session per concurrent caller.
NODE_SETTINGS = {
    "max_connections": 512,
    "max_connections_per_address": 256,
    "max_handshakes_per_address": 256,
    "max_sessions": 256,
    "max_sessions_per_address": 256,
}


@dataclass
class Market:
    """A paid market on anvil: three nodes over thirds of the model, staked and registered, and `client serve` in
    front of them, paying from a funded deposit; each a process of its own. With `paid=False`, free nodes instead."""

    home: Path
    paid: bool = True
    nodes: list[subprocess.Popen] = field(default_factory=list)
    urls: list[str] = field(default_factory=list)
    api: subprocess.Popen | None = None
    api_url: str = ""
    dev: DevMarket | None = None

    def start(self, checkpoint: Path, layers: int) -> None:
        bounds = [0, layers // 3, 2 * layers // 3, layers]
        ranges = [f"{bounds[i]}:{bounds[i + 1]}" for i in range(3)]
        settings = {f"SHARDMARKET_NODE_{name.upper()}": str(value) for name, value in NODE_SETTINGS.items()}
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **settings)
        env.pop("SHARDMARKET_CONFIG", None)
        api_argv = [sys.executable, "-m", "shardmarket", "client", "serve", "--checkpoint", str(checkpoint)]
        if self.paid:
            self.dev = dev = DevMarket(self.home / "market")
            dev.start_chain()
            dev.new_account("publisher")
            dev.cli("publisher", "model", "publish", "--checkpoint", str(checkpoint), "--name", checkpoint.name)
            names = [f"n{i}" for i in range(3)]
            for name, span in zip(names, ranges, strict=True):
                dev.new_account(name, tokens=100 * 10**18)
                dev.node_port(name)
                dev.cli(
                    name,
                    "node",
                    "register",
                    "--model",
                    checkpoint.name,
                    "--layers",
                    span,
                    "--price",
                    "1000raw",
                    "--stake",
                    "100e18",
                )
            os.environ.update(settings)  # the dev market starts its nodes with this process's environment
            for name in names:
                node = dev.start_node(name, wait=False)
                self.nodes.append(node.process)
                self.urls.append(node.url)
            for name in names:
                dev.wait_ready(dev.nodes[name])
            dev.new_account("caller", tokens=10**18)
            dev.cli("caller", "client", "deposit", "0.1")
            env |= dev.env("caller")
            api_argv += ["--model-id", checkpoint.name]
        else:
            env["SHARDMARKET_HOME"] = str(self.home)
            for i, span in enumerate(ranges):
                port = free_port()
                argv = node_command(checkpoint=checkpoint, layers=span, port=port, threads=1)
                log = (self.home / f"node{i}.log").open("w")
                self.nodes.append(self._spawn(argv, dict(env, SHARDMARKET_NODE_DATA_DIR=str(self.home / f"node{i}")), log))
                self.urls.append(f"http://127.0.0.1:{port}")
                wait_http(f"{self.urls[-1]}/health", self.nodes[-1], f"node {i}")
            api_argv += ["--nodes", ",".join(self.urls)]
        port = free_port()
        log = (self.home / "api.log").open("w")
        self.api = self._spawn([*api_argv, "--port", str(port)], dict(env, SHARDMARKET_CLIENT_API_KEY=API_KEY), log)
        self.api_url = f"http://127.0.0.1:{port}/v1"
        wait_http(f"{self.api_url}/models", self.api, "client serve", {"Authorization": f"Bearer {API_KEY}"})

    @staticmethod
    def _spawn(argv: list[str], env: dict, log) -> subprocess.Popen:
        return subprocess.Popen(argv, cwd=ROOT, env=env, stdout=log, stderr=subprocess.STDOUT)

    def stop(self) -> None:
        if self.api is not None and self.api.poll() is None:
            self.api.terminate()
            self.api.wait(15)
        if self.dev is not None:
            self.dev.stop()
            return
        for process in self.nodes:
            if process.poll() is None:
                process.terminate()
        for process in self.nodes:
            try:
                process.wait(15)
            except subprocess.TimeoutExpired:
                process.kill()


def rss_mib(pid: int) -> float:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    except OSError:
        pass
    return 0.0


@dataclass
class Stream:
    """One caller's request: when its chunks arrived, and how it ended."""

    first_token_s: float | None = None
    gaps_s: list[float] = field(default_factory=list)
    tokens: int = 0
    error: str | None = None


async def one_stream(http: aiohttp.ClientSession, api_url: str, tokens: int) -> Stream:
    body = {"prompt": PROMPT, "max_tokens": tokens, "temperature": 0, "stream": True}
    result = Stream()
    started = last = time.perf_counter()
    try:
        async with http.post(f"{api_url}/completions", json=body) as response:
            if response.status != 200:
                result.error = f"status {response.status}: {(await response.text())[:200]}"
                return result
            done = False
            async for raw in response.content:
                line = raw.decode().strip()
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    done = True
                    break
                chunk = json.loads(data)
                if "error" in chunk:
                    result.error = chunk["error"].get("message", "error")
                    return result
                if chunk["choices"] and chunk["choices"][0]["text"]:
                    now = time.perf_counter()
                    if result.first_token_s is None:
                        result.first_token_s = now - started
                    else:
                        result.gaps_s.append(now - last)
                    last = now
                    result.tokens += 1
            if not done:
                result.error = "the stream ended without [DONE]"
    except (TimeoutError, aiohttp.ClientError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
    return result


async def callers(api_url: str, concurrency: int, requests: int, tokens: int) -> tuple[list[Stream], float]:
    connector = aiohttp.TCPConnector(limit=0)
    headers = {"Authorization": f"Bearer {API_KEY}"}
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(connector=connector, headers=headers, timeout=timeout) as http:

        async def caller() -> list[Stream]:
            return [await one_stream(http, api_url, tokens) for _ in range(requests)]

        started = time.perf_counter()
        results = await asyncio.gather(*(caller() for _ in range(concurrency)))
        return [s for streams in results for s in streams], time.perf_counter() - started


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return round(1000 * ordered[min(len(ordered) - 1, int(q * len(ordered)))], 2)


def measure(market: Market, concurrency: int, requests: int, tokens: int, attack: bool) -> dict:
    attacker = None
    if attack:
        attacker = subprocess.Popen(
            [sys.executable, __file__, "--attack", ",".join(market.urls)], cwd=ROOT, stdout=subprocess.PIPE, text=True
        )
        assert attacker.stdout is not None
        attacker.stdout.readline()  # "started": its first wave is under way
    peaks = [0.0] * len(market.nodes)
    stop = False

    async def sample() -> None:
        while not stop:
            for i, process in enumerate(market.nodes):
                peaks[i] = max(peaks[i], rss_mib(process.pid))
            await asyncio.sleep(0.25)

    async def run() -> tuple[list[Stream], float]:
        nonlocal stop
        sampler = asyncio.create_task(sample())
        try:
            return await callers(market.api_url, concurrency, requests, tokens)
        finally:
            stop = True
            await sampler

    streams, wall_s = asyncio.run(run())
    figures: dict = {}
    if attacker is not None:
        attacker.send_signal(signal.SIGINT)
        out, _ = attacker.communicate(timeout=60)
        figures["attacker"] = json.loads(out.strip().splitlines()[-1])
    errors = [s.error for s in streams if s.error]
    gaps = [g for s in streams for g in s.gaps_s]
    firsts = [s.first_token_s for s in streams if s.first_token_s is not None]
    figures |= {
        "requests": len(streams),
        "errors": len(errors),
        "error_examples": sorted(set(errors))[:3],
        "ttft_p50_ms": percentile(firsts, 0.5),
        "ttft_p99_ms": percentile(firsts, 0.99),
        "inter_token_p50_ms": percentile(gaps, 0.5),
        "inter_token_p99_ms": percentile(gaps, 0.99),
        "tokens_per_s": round(sum(s.tokens for s in streams) / wall_s, 1),
        "node_peak_rss_mib": [round(p, 1) for p in peaks],
        "nodes_alive": all(p.poll() is None for p in market.nodes),
    }
    return figures


# --- the hostile peer --------------------------------------------------------------------------------------------


@dataclass
class AttackTally:
    sessions_opened: int = 0
    sessions_refused: int = 0
    handshakes_refused: int = 0
    connections_opened: int = 0
    connections_dropped_by_node: int = 0
    connect_refused: int = 0


async def attack(urls: list[str]) -> None:
    """Run every pattern against every node until SIGINT, then print the tally as JSON."""
    tally = AttackTally()
    held: list = []
    async with aiohttp.ClientSession() as http:
        infos = []
        for url in urls:
            async with http.get(f"{url}/info") as response:
                infos.append((url, await response.json()))

        async def session_flood(url: str, info: dict, source: str) -> None:
            key = bytes.fromhex(info["x25519_public_key"].removeprefix("0x"))
            port = int(url.rsplit(":", 1)[1])  # raw TCP sessions share the node's one port
            while True:
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
                    channel = await asyncio.wait_for(client_handshake(StreamTransport(reader, writer), key), 5)
                except (OSError, ConnectionError, TimeoutError, wire.WireError):
                    tally.handshakes_refused += 1
                    await asyncio.sleep(0.2)
                    continue
                try:
                    for _ in range(16):
                        await channel.send(Message(wire.OPEN, secrets.token_bytes(32), 0, {"max_length": 512}))
                        reply = await asyncio.wait_for(channel.recv(), 5)
                        if reply.type == wire.OPENED:
                            tally.sessions_opened += 1
                        else:
                            tally.sessions_refused += 1
                except (OSError, ConnectionError, TimeoutError, wire.WireError):
                    tally.connections_dropped_by_node += 1
                if secrets.randbelow(2):
                    held.append(channel)  # keep it open, its sessions idle
                else:
                    await channel.close()  # leave, sessions and all
                await asyncio.sleep(0.05)

        async def raw_connection(port: int, payload: bytes, dribble: bytes, source: str) -> None:
            """Connect, send `payload`, then `dribble` a byte a second; count how the node ends it."""
            while True:
                try:
                    reader, writer = await asyncio.open_connection("127.0.0.1", port, local_addr=(source, 0))
                except OSError:
                    tally.connect_refused += 1
                    await asyncio.sleep(0.5)
                    continue
                tally.connections_opened += 1
                try:
                    writer.write(payload)
                    await writer.drain()
                    for byte in dribble:
                        writer.write(bytes([byte]))
                        await writer.drain()
                        if await _closed_within(reader, 1.0):
                            break
                    while not await _closed_within(reader, 5.0):
                        pass
                except OSError:
                    pass
                tally.connections_dropped_by_node += 1
                writer.close()

        async def silent_websocket(url: str, source: str) -> None:
            connector = aiohttp.TCPConnector(local_addr=(source, 0))
            async with aiohttp.ClientSession(connector=connector) as own:
                await _silent_websocket(own, url)

        async def _silent_websocket(own: aiohttp.ClientSession, url: str) -> None:
            while True:
                try:
                    async with own.ws_connect(f"{url}{SESSION_PATH}") as ws:
                        tally.connections_opened += 1
                        await ws.receive()  # the node's close, whenever it comes
                    tally.connections_dropped_by_node += 1
                except (aiohttp.ClientError, OSError):
                    tally.connect_refused += 1
                    await asyncio.sleep(0.5)

        tasks = []
        sources = [f"127.0.0.{2 + i}" for i in range(ATTACKER_ADDRESSES)]  # loopback has a whole /8

        def spread(count: int, make) -> list:
            return [make(sources[i % len(sources)]) for i in range(count)]

        for url, info in infos:
            port = int(url.rsplit(":", 1)[1])  # HTTP, WebSocket and raw TCP sessions share it
            slow = (4096).to_bytes(4, "big") + b"\x00" * 4096
            huge = (256 * 2**20).to_bytes(4, "big") + os.urandom(2**20)
            tasks += [session_flood(url, info, source) for source in sources]
            tasks += spread(150, functools.partial(raw_connection, port, b"", b""))  # half-open
            tasks += spread(20, functools.partial(raw_connection, port, b"", slow))  # slowloris hello
            tasks += spread(4, functools.partial(raw_connection, port, huge, b""))  # a 256 MiB frame's first MiB
            tasks += spread(20, lambda source, url=url: silent_websocket(url, source))

        stopped = asyncio.Event()
        asyncio.get_running_loop().add_signal_handler(signal.SIGINT, stopped.set)
        _running = [asyncio.create_task(t) for t in tasks]  # referenced: the loop keeps only weak references
        await asyncio.sleep(1.0)
        print("started", flush=True)
        await stopped.wait()
        print(json.dumps(tally.__dict__), flush=True)
        os._exit(0)  # its hundreds of sockets die with it: tearing each down politely is not the bench's business


async def _closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """Whether the peer closed the connection within `seconds` (anything it sends is read and dropped)."""
    try:
        data = await asyncio.wait_for(reader.read(65536), seconds)
    except TimeoutError:
        return False
    except OSError:
        return True
    return not data


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--levels", default="10,50,200", help="concurrent streaming callers, comma separated")
    parser.add_argument("--tokens", type=int, default=16, help="tokens each request generates")
    parser.add_argument("--requests", type=int, default=2, help="requests each caller sends, one after the other")
    parser.add_argument("--no-attack", action="store_true", help="measure without the hostile peer only")
    parser.add_argument("--free", action="store_true", help="free nodes (no chain) instead of a paid market")
    parser.add_argument("--attack", help=argparse.SUPPRESS)  # the hostile peer's own process
    args = parser.parse_args()
    if args.attack:
        asyncio.run(attack(args.attack.split(",")))
        return
    levels = [int(n) for n in args.levels.split(",")]
    with tempfile.TemporaryDirectory(prefix="shardmarket-load-") as tmp:
        home = Path(tmp)
        checkpoint = random_checkpoint(MODEL, home / "model", seed=0)
        market = Market(home, paid=not args.free)
        results: dict = {}
        try:
            market.start(checkpoint, MODEL["num_hidden_layers"])
            idle = [round(rss_mib(p.pid), 1) for p in market.nodes]
            print(f"market up: 3 nodes ({idle} MiB resident) and the API at {market.api_url}", file=sys.stderr)
            for level in levels:
                for attacked in [False] if args.no_attack else [False, True]:
                    mode = "under_attack" if attacked else "alone"
                    print(f"{level} callers, {mode} ...", file=sys.stderr)
                    results[f"{level}_{mode}"] = measure(market, level, args.requests, args.tokens, attacked)
                    print(f"  {json.dumps(results[f'{level}_{mode}'])}", file=sys.stderr)
        finally:
            market.stop()
    goal = results.get("50_under_attack", {})
    print(
        json.dumps(
            {
                "market": "free" if args.free else "paid",
                "node_settings": NODE_SETTINGS,
                "model": f"random llama {MODEL['num_hidden_layers']} layers, hidden {MODEL['hidden_size']}",
                "tokens_per_request": args.tokens,
                "node_idle_rss_mib": idle,
                "errors_at_50_under_attack": goal.get("errors"),
                "levels": results,
            }
        )
    )


if __name__ == "__main__":
    main()
