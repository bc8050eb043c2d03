"""The node's Prometheus metrics (/metrics) and its earnings per hour and client.

Names follow vLLM's where the meaning is the same (num_requests_running, num_requests_waiting, kv_cache_usage_perc,
prompt_tokens_total, generation_tokens_total), with the `shardmarket:` prefix in place of `vllm:`: a dashboard built for
vLLM works by changing the prefix, and a Prometheus scraping both never adds a node's layer-range steps to a vLLM
server's whole-model requests. Every series carries `model_name`, as vLLM's do. Money is in raw base units of the token
(`shardmarket:token_info` gives its symbol and decimals). Each node has its own CollectorRegistry, so several nodes in
one process never share a series."""

from __future__ import annotations

import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

PREFIX = "shardmarket:"
MAX_CLIENT_LABELS = 32  # clients are strangers: past this many, new ones share the label "other"
OTHER = "other"
THROUGHPUT_WINDOW_S = 60.0
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class ClientLabels:
    """The label of each client: its address for the first MAX_CLIENT_LABELS seen, "other" after, and always the same
    for one client (so a counter never moves between labels)."""

    def __init__(self, cap: int = MAX_CLIENT_LABELS) -> None:
        self.cap = cap
        self._known: set[str] = set()

    def __call__(self, client: str) -> str:
        client = client.lower()
        if client in self._known:
            return client
        if len(self._known) < self.cap:
            self._known.add(client)
            return client
        return OTHER


class EarningsLedger:
    """What this node served each client, per hour: value (raw units), steps and tokens; kept in SQLite beside the tab
    store, added to in memory on the hot path and written on `flush`."""

    def __init__(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
        self._db.execute(
            "CREATE TABLE IF NOT EXISTS earnings (hour INTEGER, client TEXT, value TEXT, steps INTEGER, tokens INTEGER,"
            " PRIMARY KEY (hour, client))"
        )
        self._pending: dict[tuple[int, str], list[int]] = {}
        self._lock = threading.Lock()

    def add(self, client: str, value: int, tokens: int, now: float | None = None) -> None:
        hour = int((time.time() if now is None else now) // 3600 * 3600)
        with self._lock:
            row = self._pending.setdefault((hour, client.lower()), [0, 0, 0])
            row[0] += value
            row[1] += 1
            row[2] += tokens

    def flush(self) -> None:
        with self._lock:
            pending, self._pending = self._pending, {}
            for (hour, client), (value, steps, tokens) in pending.items():
                old = self._db.execute("SELECT value, steps, tokens FROM earnings WHERE hour = ? AND client = ?", (hour, client))
                before = old.fetchone() or ("0", 0, 0)
                self._db.execute(
                    "INSERT OR REPLACE INTO earnings VALUES (?, ?, ?, ?, ?)",
                    (hour, client, str(int(before[0]) + value), before[1] + steps, before[2] + tokens),
                )

    def rows(self) -> list[dict]:
        """Every (hour, client) row, oldest first; value in raw units (sqlite integers stop at 2**63)."""
        self.flush()
        with self._lock:
            rows = self._db.execute("SELECT hour, client, value, steps, tokens FROM earnings ORDER BY hour, client").fetchall()
        return [{"hour": h, "client": c, "value": int(v), "steps": s, "tokens": t} for h, c, v, s, t in rows]

    def close(self) -> None:
        self.flush()
        self._db.close()


@dataclass
class NodeMetrics:
    """Per-step counters and histograms of one node, and the registry that /metrics renders."""

    model_name: str
    ledger: EarningsLedger | None = None
    registry: CollectorRegistry = field(default_factory=CollectorRegistry)
    recent: deque[tuple[float, int]] = field(default_factory=deque)  # (when, tokens) of the steps in the last minute

    def __post_init__(self) -> None:
        labels, r = ["model_name"], self.registry
        self.prompt_tokens = Counter(f"{PREFIX}prompt_tokens", "Prefill tokens this node's layers processed.", labels, registry=r)
        self.generation_tokens = Counter(
            f"{PREFIX}generation_tokens", "Decode tokens this node's layers processed.", labels, registry=r
        )
        self.steps = Counter(
            f"{PREFIX}steps_served", "Steps (one hop of one forward pass) this node answered.", labels, registry=r
        )
        self.step_seconds = Histogram(
            f"{PREFIX}step_compute_seconds",
            "Compute time of one step on this node's layers.",
            labels,
            buckets=STEP_BUCKETS,
            registry=r,
        )
        self._prompt = self.prompt_tokens.labels(self.model_name)
        self._generation = self.generation_tokens.labels(self.model_name)
        self._steps = self.steps.labels(self.model_name)
        self._seconds = self.step_seconds.labels(self.model_name)

    def step(self, tokens: int, position: int, compute_s: float, client: str | None, value: int) -> None:
        """Count one answered step of `tokens` positions from `position`; a paid one earned `value` from `client`."""
        (self._prompt if position == 0 else self._generation).inc(tokens)
        self._steps.inc()
        self._seconds.observe(compute_s)
        now = time.monotonic()
        self.recent.append((now, tokens))
        while self.recent and self.recent[0][0] < now - THROUGHPUT_WINDOW_S:
            self.recent.popleft()
        if client is not None and self.ledger is not None:
            self.ledger.add(client, value, tokens)

    def throughput(self) -> tuple[float, float]:
        """Steps and tokens per second over the last minute."""
        cutoff = time.monotonic() - THROUGHPUT_WINDOW_S
        recent = [tokens for when, tokens in self.recent if when >= cutoff]
        return len(recent) / THROUGHPUT_WINDOW_S, sum(recent) / THROUGHPUT_WINDOW_S


class StateCollector(Collector):
    """Gauges and market counters read at scrape time from `state()`, the node's summary (server.dashboard.summary)."""

    def __init__(self, model_name: str, state: Callable[[], dict]) -> None:
        self.model_name, self.state = model_name, state
        self.labels = ClientLabels()

    def collect(self) -> Iterator[Metric]:
        s, m = self.state(), [self.model_name]

        def gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
            family = GaugeMetricFamily(f"{PREFIX}{name}", doc, labels=["model_name"])
            family.add_metric(m, value)
            return family

        load = s["load"]
        yield gauge(
            "num_requests_running", "Sessions open on this node (each is one request's pass through it).", load["sessions"]
        )
        yield gauge("num_requests_waiting", "Steps waiting for the compute thread.", load["queued"])
        yield gauge("kv_cache_usage_perc", "Fraction of the KV cache budget (or of max_sessions) in use (0-1).", load["kv_cache"])
        units = s["units"]
        info = InfoMetricFamily(f"{PREFIX}token", "The payment token: amounts are in its raw base units.")
        info.add_metric([], {"symbol": units["symbol"], "decimals": str(units["decimals"])})
        yield info
        reach = s["reachability"]
        reachable = GaugeMetricFamily(
            f"{PREFIX}reachable", "1 when the node's public endpoint answered the last check.", labels=["model_name", "method"]
        )
        reachable.add_metric([*m, reach["method"] or "none"], 1.0 if reach["endpoint"] else 0.0)
        yield reachable
        books = s.get("earnings")
        if books is None:
            return
        earned = CounterMetricFamily(
            f"{PREFIX}earned_base_units", "Raw units the clients' tabs promise this node.", labels=["model_name", "client"]
        )
        settled = CounterMetricFamily(
            f"{PREFIX}settled_base_units",
            "Raw units the escrow paid this node on the clients' tabs.",
            labels=["model_name", "client"],
        )
        pending = GaugeMetricFamily(
            f"{PREFIX}pending_base_units", "Raw units promised to this node and not settled yet.", labels=["model_name", "client"]
        )
        per_label: dict[str, list[int]] = {}
        for row in books["clients"]:
            sums = per_label.setdefault(self.labels(row["client"]), [0, 0, 0])
            sums[0] += row["promised"]
            sums[1] += row["settled"]
            sums[2] += row["pending"]
        for label, (promised, paid, owed) in per_label.items():
            earned.add_metric([*m, label], promised)
            settled.add_metric([*m, label], paid)
            pending.add_metric([*m, label], owed)
        yield earned
        yield settled
        yield pending
        settlement = s["settlement"]
        gas = CounterMetricFamily(f"{PREFIX}settlement_gas", "Gas this node spent settling tabs.", labels=["model_name"])
        gas.add_metric(m, settlement["gas"])
        yield gas
        count = CounterMetricFamily(f"{PREFIX}settlements", "settleTabs transactions this node sent.", labels=["model_name"])
        count.add_metric(m, len(settlement["transactions"]))
        yield count
        disputes = CounterMetricFamily(
            f"{PREFIX}disputes", "Disputes against this node (accused) or on its verifier panel.", labels=["model_name", "role"]
        )
        for role, n in s["disputes"].items():
            disputes.add_metric([*m, role], n)
        yield disputes
