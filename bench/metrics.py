"""Metrics figures, in one run on the default model (SmolLM2-135M-Instruct) served whole by free nodes:
- decode ms/token through a node counting every step (its /metrics and dashboard) against the same node with its step
  hook unset, both in this process, in interleaved rounds; the ratio is the median of each round's off/on (goal: >= 0.98);
- the cost of one /metrics scrape: ms per GET over HTTP (median of 200) and per generate_latest in-process.
The JSON figures are on the last line."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import aiohttp
from prometheus_client import generate_latest

from shardmarket.chain.commitment import commitment_domain
from shardmarket.chain.devchain import free_port
from shardmarket.client.generation import Completion, RemoteModel
from shardmarket.config import load_config
from shardmarket.engine.sampling import SamplingParams
from shardmarket.server.daemon import NodeDaemon, ServeOptions, build_daemon


async def _ms_per_token(model: RemoteModel, prompt: list[int], tokens: int) -> float:
    completion = Completion(prompt_tokens=len(prompt))
    stamps = [time.perf_counter() async for _ in model.stream(prompt, SamplingParams(max_tokens=tokens), completion)]
    return (stamps[-1] - stamps[0]) * 1000 / max(len(stamps) - 1, 1)


async def _scrape_ms(url: str, count: int) -> float:
    async with aiohttp.ClientSession() as http:
        times = []
        for _ in range(count):
            start = time.perf_counter()
            async with http.get(url) as response:
                await response.read()
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


async def run(rounds: int, tokens: int) -> dict:
    from shardmarket.cli.engine import default_checkpoint

    config = load_config()
    checkpoint = default_checkpoint()
    daemons: list[NodeDaemon] = []
    for _ in range(2):
        options = ServeOptions(layers=(0, 30), checkpoint=checkpoint, port=free_port(), threads=1, model_id=checkpoint.name)
        daemons.append(await asyncio.to_thread(build_daemon, options, config))
    on, off = daemons
    off.service.on_step = None  # the same node without its metrics
    ready = [asyncio.Event() for _ in daemons]
    serving = [asyncio.create_task(d.run(r)) for d, r in zip(daemons, ready, strict=True)]
    for r in ready:
        await r.wait()
    domain = commitment_domain(config.chain.chain_id, config.chain.deployments_dir)
    models = {
        name: await RemoteModel.connect(checkpoint, [f"http://127.0.0.1:{d.port}"], domain, model_id=checkpoint.name)
        for name, d in (("on", on), ("off", off))
    }
    prompt = models["on"].chat_ids([{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}])
    timings: dict[str, list[float]] = {"on": [], "off": []}
    try:
        for model in models.values():
            await _ms_per_token(model, prompt, 4)
        for k in range(rounds):
            for name in ("on", "off") if k % 2 == 0 else ("off", "on"):
                timings[name].append(await _ms_per_token(models[name], prompt, tokens))
        http_ms = await _scrape_ms(f"http://127.0.0.1:{on.port}/metrics", 200)
        assert on.dashboard is not None
        start = time.perf_counter()
        for _ in range(200):
            generate_latest(on.dashboard.metrics.registry)
        inprocess_ms = (time.perf_counter() - start) * 1000 / 200
    finally:
        await asyncio.gather(*(m.aclose() for m in models.values()))
        for d in daemons:
            d.stop()
        await asyncio.gather(*serving)
    ratios = [o / n for o, n in zip(timings["off"], timings["on"], strict=True)]
    return {
        "model": checkpoint.name,
        "rounds": rounds,
        "tokens": tokens,
        "decode_ms_per_token_metrics_on": round(statistics.median(timings["on"]), 3),
        "decode_ms_per_token_metrics_off": round(statistics.median(timings["off"]), 3),
        "off_over_on_median_of_rounds": round(statistics.median(ratios), 4),
        "steps_counted": on.service.steps_served,
        "scrape_ms_http_median": round(http_ms, 3),
        "scrape_ms_generate_latest": round(inprocess_ms, 3),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=10)
    parser.add_argument("--tokens", type=int, default=64)
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")
    with tempfile.TemporaryDirectory(prefix="bench-metrics-") as home:
        os.environ.setdefault("SHARDMARKET_HOME", home)
        figures = asyncio.run(run(args.rounds, args.tokens))
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
