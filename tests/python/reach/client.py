"""The lab's client on the public side: reads a streamed answer or times WebSocket round trips; prints JSON."""

from __future__ import annotations

import asyncio
import json
import statistics
import sys
import time

import aiohttp


async def stream(url: str, n: int) -> dict:
    """GET <url>/stream?n=..: how many SSE events arrived, time to the first and to the last."""
    t0 = time.perf_counter()
    events, first = [], None
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=20)) as session,
        session.get(f"{url}/stream", params={"n": n}) as resp,
    ):
        async for line in resp.content:
            if line.startswith(b"data: "):
                first = first or time.perf_counter()
                events.append(line[6:].decode().strip())
    end = time.perf_counter()
    return {
        "status": resp.status,
        "events": events,
        "first_ms": (first - t0) * 1e3 if first else None,
        "total_ms": (end - t0) * 1e3,
    }


async def echo(url: str, rounds: int) -> dict:
    """Median and p90 round trip of a 64-byte message over a WebSocket to <url>/ws."""
    times = []
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=30)) as session, session.ws_connect(f"{url}/ws") as ws:
        for i in range(rounds):
            t = time.perf_counter()
            await ws.send_bytes(i.to_bytes(64, "big"))
            reply = await ws.receive_bytes()
            times.append((time.perf_counter() - t) * 1e3)
            assert int.from_bytes(reply, "big") == i
    times.sort()
    return {"rtt_ms_median": statistics.median(times), "rtt_ms_p90": times[int(len(times) * 0.9)]}


async def health(url: str, timeout: float) -> dict:
    """Does <url>/health answer within `timeout` seconds?"""
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=timeout)) as session,
            session.get(f"{url}/health") as resp,
        ):
            return {"ok": resp.status == 200, "body": await resp.text()}
    except (aiohttp.ClientError, TimeoutError, OSError) as exc:
        return {"ok": False, "error": str(exc) or type(exc).__name__}


if __name__ == "__main__":
    mode, url, count = sys.argv[1], sys.argv[2], int(sys.argv[3])
    runs = {"stream": stream, "echo": echo, "health": health}
    print(json.dumps(asyncio.run(runs[mode](url, count))))
