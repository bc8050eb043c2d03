"""The node's dashboard: its summary (JSON, the HTML page, `node status`), its earnings per hour as CSV and JSON, a
market view of its model's nodes by layer span, and /metrics. Served only to local addresses, or with [node]
dashboard_key to whoever presents the key (shardmarket.net.dashboard.guard)."""

from __future__ import annotations

import asyncio
import csv
import io
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING

import aiohttp
from aiohttp import web
from eth_utils import to_checksum_address
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from shardmarket.chain.contracts import Market
from shardmarket.chain.registry import listed_nodes
from shardmarket.chain.units import TokenUnits
from shardmarket.net.dashboard import cards, chart, page, table
from shardmarket.net.reachability import Reachability
from shardmarket.server.metrics import EarningsLedger, NodeMetrics, StateCollector
from shardmarket.server.service import NodeService
from shardmarket.server.settlement import Settler
from shardmarket.server.tabs import TabStore
from shardmarket.server.verifier import VerifierDuty

if TYPE_CHECKING:
    from shardmarket.server.app import NodeListing

log = logging.getLogger("shardmarket.node")
DASHBOARD_PATHS = ("/dashboard", "/metrics")
CHAIN_REFRESH_S = 15.0  # disputes take minutes; the settlement loop reads the chain every second already
NAV = {"node": "/dashboard", "market": "/dashboard/market", "earnings CSV": "/dashboard/earnings.csv", "metrics": "/metrics"}


@dataclass
class Reach:
    """How the node is reachable: what `node up`'s Reachability last found (a `node run` node is reached where it
    listens, unchecked)."""

    source: Reachability | None = None

    def to_dict(self, listen: str) -> dict:
        if self.source is None:
            return {"method": "direct", "endpoint": listen, "verified": False, "checked_at": None, "nat_type": "not checked"}
        r = self.source.report
        return {
            "method": r.method,
            "endpoint": r.endpoint,
            "verified": r.verified,
            "checked_at": self.source.checked_at,
            "nat_type": r.nat_type,
        }


@dataclass
class NodeBooks:
    """A paid node's money: its tabs, settlement loop and verifier duty, and the chain they live on."""

    market: Market
    tabs: TabStore
    settler: Settler
    duty: VerifierDuty
    ledger: EarningsLedger
    units: TokenUnits = field(default_factory=TokenUnits)
    accused: int = 0  # disputes opened against this node, as of the last chain read
    scanned: int = -1  # the last block read for them

    def refresh(self, operator: str) -> None:
        """Read the new blocks' disputes against this node (blocking: run it on a thread)."""
        head = self.market.w3.eth.block_number
        if head <= self.scanned:
            return
        events = self.market.disputes.events.DisputeOpened.get_logs(
            from_block=self.scanned + 1, to_block=head, argument_filters={"node": to_checksum_address(operator)}
        )
        self.accused += len(events)
        self.scanned = head


@dataclass
class Dashboard:
    """What the node's dashboard and /metrics read."""

    service: NodeService
    listing: NodeListing
    metrics: NodeMetrics
    listen: str
    books: NodeBooks | None = None
    reach: Reach = field(default_factory=Reach)
    started: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        self.metrics.registry.register(StateCollector(self.metrics.model_name, self.summary))

    @property
    def units(self) -> TokenUnits:
        return self.books.units if self.books is not None else TokenUnits()

    def summary(self) -> dict:
        """Everything the dashboard shows, amounts in raw units (`units` says how to show them)."""
        service, stage = self.service, self.service.stage
        budget = stage.cache_budget_bytes
        kv = stage.cache_bytes() / budget if budget else len(stage.session_ids()) / max(stage.max_sessions, 1)
        steps_per_s, tokens_per_s = self.metrics.throughput()
        out: dict = {
            "model": self.metrics.model_name,
            "layers": [stage.start, stage.end],
            "num_layers": stage.config.num_hidden_layers,
            "operator": service.identity.operator,
            "price": self.listing.price,
            "units": {"symbol": self.units.symbol, "decimals": self.units.decimals},
            "uptime_s": round(time.time() - self.started, 1),
            "reachability": self.reach.to_dict(self.listing.endpoint or self.listen),
            "load": {
                "sessions": len(service.sessions),
                "queued": service.worker.queued,
                "in_flight": service.steps_in_flight,
                "steps_served": service.steps_served,
                "decode_ms": round(service.worker.decode_ms, 3),
                "kv_cache": round(kv, 4),
                "steps_per_s": round(steps_per_s, 3),
                "tokens_per_s": round(tokens_per_s, 3),
            },
        }
        books = self.books
        if books is None:
            return out
        rows = books.tabs.all()
        clients = [
            {"client": s.client, "tab": s.tab.seq, "promised": s.entry, "settled": s.redeemed, "pending": s.owed} for s in rows
        ]
        settler = books.settler
        out["earnings"] = {
            "promised": sum(c["promised"] for c in clients),
            "settled": sum(c["settled"] for c in clients),
            "pending": sum(c["pending"] for c in clients),
            "clients": clients,
        }
        out["settlement"] = {
            "interval_s": settler.interval_s,
            "min_value": settler.min_value,
            "next_check_at": settler.next_check_at,
            "gas": sum(s.gas for s in settler.settlements),
            "transactions": [{"tx": s.tx, "tabs": s.tabs, "gas": s.gas, "paid": s.paid} for s in settler.settlements],
        }
        out["disputes"] = {"accused": books.accused, "verifier": len(books.duty.ballots)}
        return out

    def earnings(self) -> list[dict]:
        """Earnings per hour, host (this node's operator) and model, per client; value in raw units and in tokens."""
        if self.books is None:
            return []
        host, model = self.service.identity.operator, self.metrics.model_name
        return [
            {
                "hour": datetime.fromtimestamp(r["hour"], UTC).strftime("%Y-%m-%dT%H:00Z"),
                "host": host,
                "model": model,
                "client": r["client"],
                "value_raw": r["value"],
                "value": self.units.tokens(r["value"]),
                "steps": r["steps"],
                "tokens": r["tokens"],
            }
            for r in self.books.ledger.rows()
        ]

    async def refresh_chain(self) -> None:
        """Keep the chain facts of the summary fresh (a duty of a paid node)."""
        while self.books is not None:
            try:
                await asyncio.to_thread(self.books.refresh, self.service.identity.operator)
                await asyncio.to_thread(self.books.ledger.flush)
            except Exception as exc:  # the chain away: the dashboard shows the last read
                log.warning("dashboard: chain read failed: %s", exc)
            await asyncio.sleep(CHAIN_REFRESH_S)

    async def market_view(self) -> list[dict]:
        """The model's listed nodes with what each one's /info says (throughput, load); unreachable ones say so."""
        if self.books is None:
            return []
        nodes = await asyncio.to_thread(listed_nodes, self.books.market, self.metrics.model_name)

        async def probe(session: aiohttp.ClientSession, node: dict) -> dict:
            row = {k: node[k] for k in ("operator", "url", "start", "end", "price")}
            try:
                async with session.get(f"{node['url']}/info", timeout=aiohttp.ClientTimeout(total=2)) as response:
                    load = (await response.json())["load"]
                row |= {"reachable": True, "decode_ms": load["decode_ms"], "sessions": load["sessions"]}
            except (aiohttp.ClientError, TimeoutError, KeyError, ValueError):
                row |= {"reachable": False, "decode_ms": None, "sessions": None}
            return row

        async with aiohttp.ClientSession() as session:
            return list(await asyncio.gather(*(probe(session, n) for n in nodes)))

    def routes(self) -> list[web.RouteDef]:
        return [
            web.get("/metrics", self._metrics),
            web.get("/dashboard", self._page),
            web.get("/dashboard/summary.json", self._summary),
            web.get("/dashboard/market", self._market),
            web.get("/dashboard/earnings.json", self._earnings_json),
            web.get("/dashboard/earnings.csv", self._earnings_csv),
        ]

    async def _metrics(self, request: web.Request) -> web.Response:
        body = generate_latest(self.metrics.registry)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _summary(self, request: web.Request) -> web.Response:
        return web.json_response(self.summary())

    async def _earnings_json(self, request: web.Request) -> web.Response:
        return web.json_response(self.earnings())

    async def _earnings_csv(self, request: web.Request) -> web.Response:
        out = io.StringIO()
        columns = ["hour", "host", "model", "client", "value_raw", "value", "steps", "tokens"]
        writer = csv.DictWriter(out, columns)
        writer.writeheader()
        writer.writerows(self.earnings())
        return web.Response(text=out.getvalue(), content_type="text/csv", headers={"Content-Disposition": "inline"})

    async def _page(self, request: web.Request) -> web.Response:
        s, fmt = self.summary(), self.units.format
        load, reach = s["load"], s["reachability"]
        checked = reach["checked_at"]
        body = cards(
            {
                "layers": (f"{s['layers'][0]}:{s['layers'][1]} of {s['num_layers']}", "layers"),
                "price per token": (fmt(s["price"]), "price"),
                "sessions": (str(load["sessions"]), "sessions"),
                "steps served": (str(load["steps_served"]), "steps-served"),
                "throughput": (f"{load['tokens_per_s']:.2f} tokens/s", "throughput"),
                "decode step": (f"{load['decode_ms']:.1f} ms", "decode-ms"),
                "KV cache in use": (f"{100 * load['kv_cache']:.1f} %", "kv-cache"),
            }
        )
        body += "<h2>Reachability</h2>" + table(
            ["method", "public endpoint", "verified from outside", "last outside check", "NAT"],
            [[reach["method"], reach["endpoint"], "yes" if reach["verified"] else "no", _when(checked), reach["nat_type"]]],
            "reachability",
        )
        if "earnings" in s:
            body += self._money(s)
        body += f"<p>operator {s['operator']}; up {s['uptime_s']:.0f} s</p>"
        return page(f"{s['model']} node", NAV, body)

    def _money(self, s: dict) -> str:
        fmt, money, settlement = self.units.format, s["earnings"], s["settlement"]
        body = "<h2>Earnings</h2>" + cards(
            {
                "earned (promised by tabs)": (fmt(money["promised"]), "earned"),
                "settled": (fmt(money["settled"]), "settled"),
                "pending": (fmt(money["pending"]), "pending"),
                "settlement gas": (str(settlement["gas"]), "gas"),
            }
        )
        hourly, scale = self.earnings(), 10**self.units.decimals
        per_hour: dict[int, float] = {}
        for r in self.books.ledger.rows() if self.books is not None else []:
            per_hour[r["hour"]] = per_hour.get(r["hour"], 0.0) + r["value"] / scale
        body += f"<h3>Earned per hour ({self.units.symbol})</h3>" + chart(
            "earnings-chart", per_hour, "all clients", self.units.symbol
        )
        body += table(
            ["hour (UTC)", "client", "earned", "steps", "tokens"],
            [[r["hour"], r["client"], fmt(r["value_raw"]), r["steps"], r["tokens"]] for r in hourly],
            "earnings-hourly",
            numeric=(2, 3, 4),
        )
        next_at = settlement["next_check_at"]
        body += (
            "<h2>Pending tabs</h2>"
            f"<p>Settled at the next check ({_when(next_at)}) when the total pending reaches "
            f"{fmt(settlement['min_value'])}, and at once when a client asks to withdraw.</p>"
        )
        body += table(
            ["client", "tab", "earned", "settled", "pending"],
            [[c["client"], c["tab"], fmt(c["promised"]), fmt(c["settled"]), fmt(c["pending"])] for c in money["clients"]],
            "clients",
            numeric=(1, 2, 3, 4),
        )
        body += "<h2>Settlements</h2>" + table(
            ["transaction", "tabs", "paid to this node", "gas"],
            [[t["tx"], t["tabs"], fmt(t["paid"]), t["gas"]] for t in settlement["transactions"]],
            "settlements",
            numeric=(1, 2, 3),
        )
        disputes = s["disputes"]
        body += "<h2>Disputes</h2>" + table(
            ["against this node", "on its verifier panel"], [[disputes["accused"], disputes["verifier"]]], "disputes"
        )
        return body

    async def _market(self, request: web.Request) -> web.Response:
        rows = await self.market_view()
        layers = self.service.stage.config.num_hidden_layers
        coverage = [sum(1 for r in rows if r["start"] <= k < r["end"] and r["reachable"]) for k in range(layers)]
        gaps = [k for k, n in enumerate(coverage) if n == 0]
        width = 600 / max(layers, 1)
        bars = "".join(
            f'<div>{r["start"]:>3}:{r["end"]:<3} <span class="gap" style="width:{r["start"] * width:.0f}px"></span>'
            f'<span class="span" style="width:{(r["end"] - r["start"]) * width:.0f}px"></span></div>'
            for r in sorted(rows, key=lambda r: (r["start"], r["end"]))
        )
        body = (
            f"<p data-testid='coverage'>{layers - len(gaps)} of {layers} layers served by a reachable node"
            + (f"; not covered: {', '.join(map(str, gaps))}" if gaps else "")
            + "</p>"
            + bars
        )
        body += table(
            ["layers", "operator", "endpoint", "price per token", "decode step", "sessions", "reachable"],
            [
                [
                    f"{r['start']}:{r['end']}",
                    r["operator"],
                    r["url"],
                    self.units.format(r["price"]),
                    "" if r["decode_ms"] is None else f"{r['decode_ms']:.1f} ms",
                    "" if r["sessions"] is None else r["sessions"],
                    "yes" if r["reachable"] else "no",
                ]
                for r in sorted(rows, key=lambda r: (r["start"], r["end"]))
            ],
            "market",
        )
        return page(f"{self.metrics.model_name}: the market by layer span", NAV, body)


def _when(unix: float | None) -> str:
    return "never" if unix is None else datetime.fromtimestamp(unix, UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def step_observer(dashboard: Dashboard) -> Callable[[bytes, int, int, float], None]:
    """What NodeService calls for every step it answers: count it, and on a paid node book it to its client."""
    metrics, payments = dashboard.metrics, dashboard.service.payments

    def observe(request_id: bytes, tokens: int, position: int, compute_s: float) -> None:
        client = payments.payer(request_id) if payments is not None else None
        metrics.step(tokens, position, compute_s, client, tokens * payments.price if payments is not None else 0)

    return observe
