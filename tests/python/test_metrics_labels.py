"""Metrics stay bounded and separate: past MAX_CLIENT_LABELS clients share the label "other" (a stranger cannot grow a
node's series without end), a client keeps its label, and two nodes in one process keep their own registries."""

from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families

from shardmarket.server.metrics import MAX_CLIENT_LABELS, OTHER, NodeMetrics, StateCollector


def state(clients: int) -> dict:
    """A paid node's summary (server.dashboard.Dashboard.summary) with `clients` clients, each promised 10, paid 4."""
    rows = [{"client": f"0x{k:040x}", "tab": 1, "promised": 10, "settled": 4, "pending": 6} for k in range(clients)]
    return {
        "load": {"sessions": 0, "queued": 0, "kv_cache": 0.0},
        "units": {"symbol": "SMT", "decimals": 18},
        "reachability": {"method": "upnp", "endpoint": "http://203.0.113.7:7300"},
        "earnings": {"clients": rows},
        "settlement": {"gas": 0, "transactions": []},
        "disputes": {"accused": 0, "verifier": 0},
    }


def earned(metrics: NodeMetrics) -> dict[str, float]:
    families = text_string_to_metric_families(generate_latest(metrics.registry).decode())
    family = next(f for f in families if f.name == "shardmarket:earned_base_units")
    return {s.labels["client"]: s.value for s in family.samples if s.name.endswith("_total")}


def test_clients_past_the_cap_share_one_label_and_a_client_keeps_its_own():
    clients = MAX_CLIENT_LABELS + 10
    current = {"n": clients}
    metrics = NodeMetrics("m")
    metrics.registry.register(StateCollector("m", lambda: state(current["n"])))
    first = earned(metrics)
    assert len(first) == MAX_CLIENT_LABELS + 1 and first[OTHER] == 10 * 10
    assert sum(first.values()) == 10 * clients  # nothing is lost, only folded
    current["n"] = clients + 5
    second = earned(metrics)
    assert second[OTHER] == 10 * 15 and {k: v for k, v in second.items() if k != OTHER} == {
        k: v for k, v in first.items() if k != OTHER
    }


def test_two_nodes_in_one_process_keep_separate_series():
    a, b = NodeMetrics("m"), NodeMetrics("m")  # the global registry would refuse the second: duplicated timeseries
    a.step(5, 0, 0.01, None, 0)
    b.step(1, 5, 0.01, None, 0)
    text_a, text_b = generate_latest(a.registry).decode(), generate_latest(b.registry).decode()
    assert 'shardmarket:prompt_tokens_total{model_name="m"} 5.0' in text_a
    assert 'shardmarket:prompt_tokens_total{model_name="m"} 0.0' in text_b
    assert 'shardmarket:generation_tokens_total{model_name="m"} 1.0' in text_b
