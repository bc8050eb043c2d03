"""Keeps this node's registration true while it runs: the endpoint it is reachable at, its layer range, price and stake
on the NodeRegistry, and its listing paused while it cannot be reached (`node up` runs it beside the daemon)."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

from shardmarket.chain.contracts import ChainError, Market
from shardmarket.chain.registry import registration_of
from shardmarket.net.reachability import Reachability, Report
from shardmarket.server.app import NodeListing
from shardmarket.server.identity import NodeIdentity

RETRY_S = 5.0  # a registry update the chain refused or did not answer is tried again this soon


def say(line: str) -> None:
    print(line, flush=True)


@dataclass(frozen=True)
class Wanted:
    """What the node serves and wants on chain; `stake` is what it keeps bonded at least (0: the registry's minimum)."""

    model: str
    start: int
    end: int
    price: int
    stake: int = 0


def describe(report: Report) -> str:
    """One line on how the node became reachable."""
    how = f"by {report.method}" + ("" if report.method == "relay" else f" ({report.nat_type})")
    check = "verified from outside" if report.verified else "NOT verified from outside: no relay answered ([reach] relays)"
    return f"reachable: {report.endpoint} {how}, {check}, in {report.seconds:.2f} s"


class RegistryUpkeep:
    """Registers, updates, pauses and unpauses this operator's entry; one transaction at a time."""

    def __init__(self, market: Market, identity: NodeIdentity, wanted: Wanted) -> None:
        self.market, self.identity, self.wanted = market, identity, wanted
        self.lock = threading.Lock()  # a cancelled update may still run in its thread: never two nonces at once

    def _tx(self, call, what: str) -> str:
        return self.market.transact(call, what)["transactionHash"].hex()

    def _stake(self) -> None:
        market, me = self.market, self.market.address
        target = max(self.wanted.stake, market.read(market.registry.functions.minStake()))
        bonded = market.read(market.stake.functions.bondedOf(me))
        if bonded >= target:
            return
        need, fmt = target - bonded, market.units().format
        held = market.read(market.token.functions.balanceOf(me))
        if held < need:
            raise ChainError(
                f"{me} holds {fmt(held)} and must stake {fmt(need)} more (to {fmt(target)}); send it tokens, then retry"
            )
        self._tx(market.token.functions.approve(market.addresses["StakeManager"], need), "approving the stake")
        tx = self._tx(market.stake.functions.stake(need), "staking")
        say(f"staked: {fmt(need)} more, {fmt(target)} bonded (tx {tx})")

    def list_at(self, endpoint: str) -> None:
        """Make the registration say `endpoint` and what is wanted, with enough stake, and listed (blocking)."""
        with self.lock:
            market, wanted, key = self.market, self.wanted, self.identity.x25519_public
            current = registration_of(market, self.identity.operator)
            self._stake()
            args = (market.model_id(wanted.model), wanted.start, wanted.end, wanted.price, key, [endpoint])
            price = market.units().format(wanted.price)
            what = f"layers {wanted.start}:{wanted.end} of {wanted.model} at {price} per token on {endpoint}"
            if current is None:
                say(f"registered: {what} (tx {self._tx(market.registry.functions.register(*args), 'registering')})")
            elif (current.model, current.start, current.end, current.price, current.key, current.endpoints) != (
                wanted.model,
                *args[1:],
            ):
                say(f"updated: {what} (tx {self._tx(market.registry.functions.update(*args), 'updating the registration')})")
            if current is not None and current.paused:
                say(f"listed again (tx {self._tx(market.registry.functions.unpause(), 'unpausing')})")

    def pause(self, why: str) -> None:
        """Stop being listed (blocking); nothing to do when paused already."""
        with self.lock:
            current = registration_of(self.market, self.identity.operator)
            if current is not None and not current.paused:
                say(f"paused: {why} (tx {self._tx(self.market.registry.functions.pause(), 'pausing')})")

    async def _retrying(self, action: Callable[[], None]) -> None:
        while True:
            try:
                await asyncio.to_thread(action)
                return
            except ChainError as exc:
                say(f"registry not updated: {exc}; retrying in {RETRY_S:.0f} s")
                await asyncio.sleep(RETRY_S)

    async def _follow(self, endpoint: str | None, listing: NodeListing, unreachable_s: float) -> None:
        if endpoint is None:
            say(f"unreachable: {listing.endpoint} does not answer from outside; pausing in {unreachable_s:g} s unless it does")
            await asyncio.sleep(unreachable_s)
            await self._retrying(lambda: self.pause(f"unreachable for {unreachable_s:g} s"))
            return
        if endpoint != listing.endpoint:
            say(f"moved: now reachable at {endpoint}")
        await self._retrying(lambda: self.list_at(endpoint))
        listing.endpoint = endpoint

    async def keep(self, reach: Reachability, listing: NodeListing, unreachable_s: float) -> None:
        """Follow `reach` for as long as the node runs: each new endpoint is registered (and the listing resumed),
        an endpoint unreachable for `unreachable_s` gets the listing paused."""
        following: asyncio.Task | None = None
        try:
            async for endpoint in reach.watch():
                if following is not None:
                    following.cancel()
                following = asyncio.create_task(self._follow(endpoint, listing, unreachable_s))
        finally:
            if following is not None:
                following.cancel()


async def stay_listed(
    reach: Reachability,
    upkeep: RegistryUpkeep,
    listing: NodeListing,
    ready: asyncio.Event,
    stopping: asyncio.Event,
    give_up: Callable[[], None],
    unreachable_s: float,
) -> None:
    """Once the daemon serves (`ready`): become reachable, register, then keep both true until `stopping`, when the
    listing is paused at once (before the steps in progress finish). A node that cannot be reached or registered says
    what to do and calls `give_up`."""
    await ready.wait()
    began = time.monotonic()
    report = await reach.establish()
    if report.endpoint is None:
        tried = "; ".join(f"{a.method}: {a.detail}" for a in report.attempts if not a.ok)
        say(
            f"error: not reachable from outside ({tried or 'nothing to try'}): configure a relay (--relay URL or [reach] "
            f"relays) or forward TCP port {reach.port} on your router to this machine"
        )
        give_up()
        return
    say(describe(report))
    try:
        await asyncio.to_thread(upkeep.list_at, report.endpoint)
    except ChainError as exc:
        say(f"error: {exc}")
        give_up()
        return
    listing.endpoint = report.endpoint
    say(
        f"listed: serving paying clients at {report.endpoint}, {time.monotonic() - began:.2f} s after serving began "
        "(Ctrl-C stops and pauses the listing)"
    )
    keeping = asyncio.create_task(upkeep.keep(reach, listing, unreachable_s))
    try:
        await stopping.wait()
    finally:
        keeping.cancel()
    await asyncio.to_thread(upkeep.pause, "the node stops")
