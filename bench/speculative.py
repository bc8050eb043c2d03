"""Speculative decoding benchmark: decode tokens/s of SmolLM2 over a 3-node pipeline with and without prompt-lookup
drafts, on a workload where drafts help (rewriting a given text with a few corrections: the answer repeats the prompt)
and one where they do not (a story from a one-line prompt), greedy, in interleaved rounds whose order turns each round
(the speedup is the median of each round's ratio). Also: the drafts' acceptance rate, tokens per pass through the
route, positions computed per kept token, and whether the text is the same (it must be).

Round trips are real loopback ones, and with `--rtt-ms` also SIMULATED ones: each node is reached through a delaying
TCP proxy (one process on this machine, holding every chunk for half the RTT in each direction), so one hop costs
that RTT as in the client-relayed route. bench/wan.py's lab (namespaces, user-space delays) measures the real thing by
calling `compare(model, workload)` with its own route.

Usage: .venv/bin/python bench/speculative.py [--tokens 64] [--runs 3] [--rtt-ms 0,50] [--max-draft 8]
Prints JSON on its last line.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

import torch
from network import DOMAIN, Run, _free_port, start_nodes, thirds

from shardmarket.cli.engine import default_checkpoint
from shardmarket.client.generation import Completion, RemoteModel
from shardmarket.engine.sampling import SamplingParams

ROOT = Path(__file__).resolve().parents[1]
TEXT = (
    "The old lighthouse stood at the edge of the cliff for more then a hundred years. Every night its lamp turned "
    "slowly, throwing a long white beam across the water so that fishing boats could find there way home. The keeper, "
    "a quiet man named Elias, climbed the hundred and twelve steps each evening to trim the wick and polish the glass. "
    "In winter the storms were fierce and the waves broke against the rocks below with a sound like thunder, but the "
    "light never failed. When the harbour board decided to replace the lamp with an automatic one, the people of the "
    "village signed a letter asking them to let Elias stay untill he retired."
)


@dataclass(frozen=True)
class Workload:
    """A chat prompt and what it stands for."""

    name: str
    prompt: str
    about: str


REWRITE = Workload(
    "rewrite",
    f"Correct the spelling mistakes in this text and write it out in full, changing nothing else:\n\n{TEXT}",
    "rewriting a given 120-word text with three corrections: the answer repeats the prompt (drafts help)",
)
STORY = Workload(
    "story",
    "Write a long story about a lighthouse keeper.",
    "a story from a one-line prompt: little to look up (drafts rarely help)",
)


async def timed(model: RemoteModel, ids: list[int], params: SamplingParams) -> tuple[Run, Completion]:
    """One request through the route, with when each token arrived."""
    completion = Completion(len(ids))
    loop = asyncio.get_running_loop()
    started = loop.time()
    tokens, arrivals = [], []
    async for token in model.stream(ids, params, completion):
        arrivals.append(loop.time() - started)
        tokens.append(token)
    return Run(tokens, arrivals, loop.time() - started), completion


async def compare(model: RemoteModel, workload: Workload, *, max_draft: int = 8, tokens: int = 64, runs: int = 3) -> dict:
    """Greedy decode of `workload` on `model`'s route without and with speculation (`max_draft` tokens), `runs` rounds
    interleaved; returns the figures (keys prefixed with the workload's name). `model.max_draft` is restored."""
    ids = model.chat_ids([{"role": "user", "content": workload.prompt}])
    params = SamplingParams(max_tokens=tokens)
    saved = model.max_draft
    timed_runs: dict[int, list[tuple[Run, Completion]]] = {0: [], max_draft: []}
    try:
        for round_ in range(runs):
            for draft in (0, max_draft) if round_ % 2 == 0 else (max_draft, 0):
                model.max_draft = draft
                timed_runs[draft].append(await timed(model, ids, params))
    finally:
        model.max_draft = saved
    plain, spec = timed_runs[0], timed_runs[max_draft]
    stats = [c.speculation for _, c in spec if c.speculation is not None]
    drafted, accepted, passes = (sum(getattr(s, k) for s in stats) for k in ("drafted", "accepted", "passes"))
    kept = sum(len(run.tokens) for run, _ in spec)
    name = workload.name
    return {
        f"{name}_tokens": statistics.median(len(run.tokens) for run, _ in spec),
        f"{name}_same_text": all(a.tokens == b.tokens for (a, _), (b, _) in zip(plain, spec, strict=True)),
        f"{name}_plain_tokens_per_s": round(1000 / statistics.median(run.decode_ms_per_token for run, _ in plain), 2),
        f"{name}_speculative_tokens_per_s": round(1000 / statistics.median(run.decode_ms_per_token for run, _ in spec), 2),
        f"{name}_speedup": round(
            statistics.median(a.decode_ms_per_token / b.decode_ms_per_token for (a, _), (b, _) in zip(plain, spec, strict=True)),
            3,
        ),
        f"{name}_acceptance_rate": round(accepted / drafted, 3) if drafted else 0.0,
        f"{name}_tokens_per_pass": round((accepted + passes) / passes, 3) if passes else 1.0,
        f"{name}_positions_per_kept_token": round(sum(c.computed_positions - c.prompt_tokens for _, c in spec) / kept, 3),
    }


class DelayProxies:
    """A delaying TCP proxy in front of each URL's port, in a process of its own (SIMULATED round trips)."""

    def __init__(self, urls: list[str], rtt_ms: float) -> None:
        self.ports = [_free_port() for _ in urls]
        routes = ",".join(f"{port}:{url.rsplit(':', 1)[1]}" for port, url in zip(self.ports, urls, strict=True))
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--proxy", routes, "--one-way-ms", str(rtt_ms / 2)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            text=True,
        )
        if self.process.stdout is None or self.process.stdout.readline().strip() != "ready":
            raise RuntimeError("the delay proxies did not start")
        self.urls = [f"http://127.0.0.1:{port}" for port in self.ports]

    def close(self) -> None:
        self.process.terminate()
        self.process.wait()


async def serve_proxies(routes: str, one_way_s: float) -> None:
    """`--proxy`: listen on each `port:target` pair and forward both ways, each chunk held `one_way_s`."""

    async def pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def deliver() -> None:
            while True:
                due, data = await queue.get()
                if not data:
                    break
                if (wait := due - loop.time()) > 0:
                    await asyncio.sleep(wait)
                writer.write(data)
                await writer.drain()
            writer.close()

        delivering = asyncio.create_task(deliver())
        try:
            while data := await reader.read(1 << 16):
                queue.put_nowait((loop.time() + one_way_s, data))
        except ConnectionError:
            pass
        queue.put_nowait((0.0, b""))
        await delivering

    def handler(target: int):
        async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", target)
            except OSError:
                writer.close()
                return
            await asyncio.gather(pump(reader, upstream_writer), pump(upstream_reader, writer), return_exceptions=True)

        return handle

    for pair in routes.split(","):
        port, target = (int(x) for x in pair.split(":"))
        await asyncio.start_server(handler(target), "127.0.0.1", port)
    print("ready", flush=True)
    await asyncio.Event().wait()


async def main(args: argparse.Namespace) -> dict:
    checkpoint = default_checkpoint()
    result: dict = {
        "model": checkpoint.name,
        "route": "3 nodes on loopback (TCP, encryption and signed commitments on, no payment)",
        "max_draft": args.max_draft,
        "tokens": args.tokens,
        "runs": args.runs,
        "workloads": {w.name: w.about for w in (REWRITE, STORY)},
        "simulated_rtt": "a delaying TCP proxy per node on this machine: every hop costs the RTT (client-relayed route)",
    }
    with tempfile.TemporaryDirectory() as home:
        layers = json.loads((checkpoint / "config.json").read_text())["num_hidden_layers"]
        processes, urls, _ = start_nodes(checkpoint, thirds(layers), Path(home), torch.get_num_threads())
        try:
            for rtt in args.rtt_ms:
                proxies = DelayProxies(urls, rtt) if rtt else None
                model = await RemoteModel.connect(checkpoint, proxies.urls if proxies else urls, DOMAIN)
                try:
                    for workload in (REWRITE, STORY):
                        figures = await compare(model, workload, max_draft=args.max_draft, tokens=args.tokens, runs=args.runs)
                        label = "loopback" if not rtt else f"simulated_rtt_{rtt:g}ms"
                        result.update({f"{label}_{k}": v for k, v in figures.items()})
                        print(json.dumps({label: figures}), file=sys.stderr, flush=True)
                finally:
                    await model.aclose()
                    if proxies is not None:
                        proxies.close()
        finally:
            for process in processes:
                process.terminate()
                process.wait()
    return result


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--max-draft", type=int, default=8)
    parser.add_argument("--rtt-ms", type=lambda s: [float(x) for x in s.split(",")], default=[0.0, 50.0])
    parser.add_argument("--proxy", help=argparse.SUPPRESS)
    parser.add_argument("--one-way-ms", type=float, default=0.0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.proxy:
        asyncio.run(serve_proxies(args.proxy, args.one_way_ms / 1000))
    elif os.environ.get("OMP_WAIT_POLICY") != "PASSIVE":  # as every shardmarket process runs (see bench/network.py)
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
    else:
        print(json.dumps(asyncio.run(main(args))))
