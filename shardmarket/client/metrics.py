"""`client serve`'s /metrics and dashboard: vLLM's request metrics under the `shardmarket:` prefix (the server
package's metrics module says why), what the client spent per node and hour, and a page showing both. Guarded like the
node's: local addresses, or [client] dashboard_key."""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from shardmarket.chain.units import TokenUnits
from shardmarket.client.routing import NodeInfo
from shardmarket.net.dashboard import cards, chart, page, table

PREFIX = "shardmarket:"
DASHBOARD_PATHS = ("/dashboard", "/metrics")
MAX_NODE_LABELS = 64  # the nodes are strangers too: past this many, new ones share the label "other"
LATENCY_BUCKETS = (0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0, 40.0, 80.0)
NAV = {"client": "/dashboard", "spending CSV": "/dashboard/spending.csv", "metrics": "/metrics"}


@dataclass
class ClientMetrics:
    """The client's request metrics, and its spending per hour and node (in memory: the payer's ledger keeps the tabs)."""

    model_name: str
    units: TokenUnits = field(default_factory=TokenUnits)
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    spending: dict[tuple[int, str], list[int]] = field(default_factory=dict)  # (hour, node) -> [raw units, tokens]
    requests_done: int = 0
    requests_running: int = 0
    tokens_generated: int = 0
    started: float = field(default_factory=time.time)

    def __post_init__(self) -> None:
        labels, r = ["model_name"], self.registry
        self.running = Gauge(f"{PREFIX}num_requests_running", "Requests generating now.", labels, registry=r).labels(
            self.model_name
        )
        self.prompt_tokens = Counter(f"{PREFIX}prompt_tokens", "Prompt tokens of the requests.", labels, registry=r).labels(
            self.model_name
        )
        self.generation_tokens = Counter(f"{PREFIX}generation_tokens", "Tokens generated.", labels, registry=r).labels(
            self.model_name
        )
        self.ttft = Histogram(
            f"{PREFIX}time_to_first_token_seconds", "From request to first token.", labels, buckets=LATENCY_BUCKETS, registry=r
        ).labels(self.model_name)
        self.itl = Histogram(
            f"{PREFIX}inter_token_latency_seconds", "Between consecutive tokens.", labels, buckets=LATENCY_BUCKETS, registry=r
        ).labels(self.model_name)
        self.e2e = Histogram(
            f"{PREFIX}e2e_request_latency_seconds", "From request to last token.", labels, buckets=LATENCY_BUCKETS, registry=r
        ).labels(self.model_name)
        self.spent = Counter(
            f"{PREFIX}spent_base_units", "Raw units of the token promised to each node.", ["model_name", "node"], registry=r
        )
        self._nodes: set[str] = set()

    def node_label(self, node: str) -> str:
        node = node.lower()
        if node in self._nodes or len(self._nodes) < MAX_NODE_LABELS:
            self._nodes.add(node)
            return node
        return "other"

    def paid(self, node: NodeInfo, tokens: int) -> None:
        """Book a step `node` answered: its price times the tokens."""
        value = node.price * tokens
        if not value:
            return
        label = self.node_label(node.operator or node.url)
        self.spent.labels(self.model_name, label).inc(value)
        hour = int(time.time() // 3600 * 3600)
        row = self.spending.setdefault((hour, label), [0, 0])
        row[0] += value
        row[1] += tokens

    def rows(self) -> list[dict]:
        """Spending per hour, host (node) and model."""
        return [
            {
                "hour": datetime.fromtimestamp(hour, UTC).strftime("%Y-%m-%dT%H:00Z"),
                "host": node,
                "model": self.model_name,
                "value_raw": value,
                "value": self.units.tokens(value),
                "tokens": tokens,
            }
            for (hour, node), (value, tokens) in sorted(self.spending.items())
        ]


class RequestTimer:
    """Times one request's tokens into the client's histograms."""

    def __init__(self, metrics: ClientMetrics, prompt_tokens: int) -> None:
        self.metrics, self.start = metrics, time.monotonic()
        self.last: float | None = None
        metrics.running.inc()
        metrics.requests_running += 1
        metrics.prompt_tokens.inc(prompt_tokens)

    def token(self) -> None:
        now = time.monotonic()
        (self.metrics.ttft.observe(now - self.start) if self.last is None else self.metrics.itl.observe(now - self.last))
        self.last = now
        self.metrics.generation_tokens.inc()
        self.metrics.tokens_generated += 1

    def done(self) -> None:
        self.metrics.running.dec()
        self.metrics.requests_running -= 1
        self.metrics.requests_done += 1
        if self.last is not None:
            self.metrics.e2e.observe(time.monotonic() - self.start)


def on_commitment_too(metrics: ClientMetrics, chained: Callable | None) -> Callable:
    """A RemoteModel.on_commitment that books what the step cost, then calls `chained` (the payer's and auditor's)."""

    def observe(node: NodeInfo, signed, tokens: int) -> None:
        metrics.paid(node, tokens)
        if chained is not None:
            chained(node, signed, tokens)

    return observe


def dashboard_routes(metrics: ClientMetrics, nodes: Callable[[], list[NodeInfo]]) -> list[web.RouteDef]:
    """/metrics and the client's dashboard pages."""

    async def scrape(request: web.Request) -> web.Response:
        return web.Response(body=generate_latest(metrics.registry), headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def summary_json(request: web.Request) -> web.Response:
        s = summary(metrics, nodes())
        keys = ("url", "operator", "start", "end", "price", "decode_ms")
        return web.json_response(s | {"nodes": [{k: getattr(n, k) for k in keys} for n in s["nodes"]]})

    async def spending_json(request: web.Request) -> web.Response:
        return web.json_response(metrics.rows())

    async def spending_csv(request: web.Request) -> web.Response:
        out = io.StringIO()
        writer = csv.DictWriter(out, ["hour", "host", "model", "value_raw", "value", "tokens"])
        writer.writeheader()
        writer.writerows(metrics.rows())
        return web.Response(text=out.getvalue(), content_type="text/csv")

    async def dashboard(request: web.Request) -> web.Response:
        s, fmt = summary(metrics, nodes()), metrics.units.format
        body = cards(
            {
                "requests running": (str(s["running"]), "running"),
                "requests done": (str(s["requests_done"]), "requests-done"),
                "tokens generated": (str(s["generation_tokens"]), "generation-tokens"),
                "spent": (fmt(s["spent"]), "spent"),
            }
        )
        rows, scale = metrics.rows(), 10**metrics.units.decimals
        per_hour: dict[int, float] = {}
        for (hour, _), (value, _) in metrics.spending.items():
            per_hour[hour] = per_hour.get(hour, 0.0) + value / scale
        body += f"<h2>Spent per hour ({metrics.units.symbol})</h2>" + chart(
            "spending-chart", per_hour, "all nodes", metrics.units.symbol
        )
        body += table(
            ["hour (UTC)", "node", "spent", "tokens"],
            [[r["hour"], r["host"], fmt(r["value_raw"]), r["tokens"]] for r in rows],
            "spending",
            numeric=(2, 3),
        )
        body += "<h2>Nodes known</h2>" + table(
            ["layers", "operator", "endpoint", "price per token", "decode step"],
            [[f"{n.start}:{n.end}", n.operator, n.url, fmt(n.price), f"{n.decode_ms:.1f} ms"] for n in s["nodes"]],
            "nodes",
        )
        return page(f"{metrics.model_name} client", NAV, body)

    return [
        web.get("/metrics", scrape),
        web.get("/dashboard", dashboard),
        web.get("/dashboard/summary.json", summary_json),
        web.get("/dashboard/spending.json", spending_json),
        web.get("/dashboard/spending.csv", spending_csv),
    ]


def summary(metrics: ClientMetrics, nodes: list[NodeInfo]) -> dict:
    """What the client's dashboard shows; `nodes` come back as NodeInfo for the page and as dicts in JSON."""
    return {
        "model": metrics.model_name,
        "units": {"symbol": metrics.units.symbol, "decimals": metrics.units.decimals},
        "running": metrics.requests_running,
        "requests_done": metrics.requests_done,
        "generation_tokens": metrics.tokens_generated,
        "spent": sum(v for v, _ in metrics.spending.values()),
        "nodes": nodes,
    }
