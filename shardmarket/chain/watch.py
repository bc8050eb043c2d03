"""The node's view of the chain head: one small async eth_blockNumber per tick (aiohttp, on the event loop, no thread),
shared by the duties, which do their threaded web3 work only when a new block came (or a timer is due). While the
node serves steps, a read up to `busy_age_s` old will do: the duties' deadlines are hours and days (withdrawal
timelock, dispute phases), and on a busy machine each read's CPU is taken from the layers
of whichever node computes at that moment."""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import aiohttp

from shardmarket.chain.contracts import ChainError

_REQUEST = json.dumps({"jsonrpc": "2.0", "method": "eth_blockNumber", "params": [], "id": 1}).encode()


class BlockWatch:
    """The latest block number at `rpc_url`; `latest(max_age_s)` answers from a read younger than that, or younger
    than `busy_age_s` while `steps_served()` has moved in the last `busy_s` seconds."""

    def __init__(
        self,
        rpc_url: str,
        *,
        steps_served: Callable[[], int] = lambda: 0,
        busy_s: float = 2.0,
        busy_age_s: float = 10.0,
        timeout_s: float = 10.0,
    ) -> None:
        self.rpc_url, self.steps_served, self.timeout_s = rpc_url, steps_served, timeout_s
        self.busy_s, self.busy_age_s = busy_s, busy_age_s
        self._session: aiohttp.ClientSession | None = None
        self._read: tuple[float, int] | None = None  # (when, number)
        self._steps = (float("-inf"), steps_served())  # (when the count last moved, the count)

    async def latest(self, max_age_s: float = 0.0) -> int:
        """The chain's newest block number; raises ChainError when the chain cannot be read."""
        now = time.monotonic()
        steps = self.steps_served()
        if steps != self._steps[1]:
            self._steps = (now, steps)
        if now - self._steps[0] < self.busy_s:
            max_age_s = max(max_age_s, self.busy_age_s)
        if self._read is not None and now - self._read[0] < max_age_s:
            return self._read[1]
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=self.timeout_s))
        try:
            async with self._session.post(self.rpc_url, data=_REQUEST, headers={"Content-Type": "application/json"}) as reply:
                answer = json.loads(await reply.read())
        except (TimeoutError, aiohttp.ClientError, ValueError) as exc:
            raise ChainError(f"cannot read the newest block at {self.rpc_url} ({type(exc).__name__}: {exc})") from None
        result = answer.get("result") if isinstance(answer, dict) else None
        if not isinstance(result, str):
            raise ChainError(
                f"eth_blockNumber at {self.rpc_url} failed: {answer.get('error', answer) if isinstance(answer, dict) else answer}"
            )
        self._read = (now, int(result, 16))
        return self._read[1]

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None
