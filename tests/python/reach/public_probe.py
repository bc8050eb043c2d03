"""A helper on the lab's public side that stays up for a test: reads one JSON request per line on stdin, answers one
JSON line on stdout. {"op": "node", "operator": A}: A's registration and earnings as the chain has them;
{"op": "chat", "api": URL, "key": K, "model": M}: a streamed chat completion through an OpenAI-compatible API."""

from __future__ import annotations

import itertools
import json
import statistics
import sys
import time

from openai import OpenAI

from shardmarket.chain.contracts import ChainError, Market
from shardmarket.config import load_config


def node(market: Market, operator: str) -> dict:
    try:
        entry = market.read(market.registry.functions.getNode(operator))
    except ChainError:
        return {"registered": False}
    return {
        "registered": True,
        "endpoints": list(entry.endpoints),
        "layers": [entry.layerStart, entry.layerEnd],
        "paused": entry.paused,
        "listed": market.read(market.registry.functions.isListed(operator)),
        "earnings": market.read(market.escrow.functions.earningsOf(operator)),
    }


def chat(api: str, key: str, model: str) -> dict:
    client = OpenAI(base_url=api, api_key=key, max_retries=0, timeout=60)
    started, stamps, text = time.monotonic(), [], ""
    stream = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": "Say hello."}], max_tokens=24, stream=True, temperature=0
    )
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            stamps.append(time.monotonic())
            text += chunk.choices[0].delta.content
    gaps = [(b - a) * 1e3 for a, b in itertools.pairwise(stamps)]
    return {
        "chunks": len(stamps),
        "text": text,
        "seconds": round(time.monotonic() - started, 3),
        "ms_per_token": round(statistics.median(gaps), 2) if gaps else None,
    }


def main() -> None:
    market = Market.connect(load_config().chain)
    for line in sys.stdin:
        request = json.loads(line)
        try:
            if request["op"] == "node":
                answer = node(market, request["operator"])
            else:
                answer = chat(request["api"], request["key"], request["model"])
        except Exception as exc:  # the test reads the error; this helper keeps serving
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        print(json.dumps(answer), flush=True)


if __name__ == "__main__":
    main()
