"""The lab's chat client for benchmarks: greedy tokens from a node endpoint, timed per token; prints JSON.

Run on the public side of the lab.
"""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time
from itertools import pairwise
from pathlib import Path

from shardmarket.chain.commitment import commitment_domain
from shardmarket.client.generation import Completion, RemoteModel
from shardmarket.config import load_config
from shardmarket.engine.sampling import SamplingParams


async def timed_tokens(checkpoint: Path, url: str, max_tokens: int) -> dict:
    config = load_config()
    model = await RemoteModel.connect(
        checkpoint, [url], commitment_domain(config.chain.chain_id, config.chain.deployments_dir), transport="ws"
    )
    ids = model.chat_ids([{"role": "user", "content": "Name three colours of the rainbow."}])
    stamps = [time.perf_counter()]
    tokens = []
    params = SamplingParams(max_tokens=max_tokens, temperature=0.0)
    async for token in model.stream(ids, params, Completion(prompt_tokens=len(ids))):
        tokens.append(token)
        stamps.append(time.perf_counter())
    gaps = [(b - a) * 1e3 for a, b in pairwise(stamps[1:])]
    return {
        "tokens": tokens,
        "first_token_ms": (stamps[1] - stamps[0]) * 1e3,
        "ms_per_token_median": statistics.median(gaps) if gaps else None,
    }


if __name__ == "__main__":
    print(json.dumps(asyncio.run(timed_tokens(Path(sys.argv[1]), sys.argv[2], int(sys.argv[3])))))
