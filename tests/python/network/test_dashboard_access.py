"""A node's dashboard and /metrics: open to its own machine, closed to other addresses unless they hold the key; and
/metrics is Prometheus text carrying vLLM's names under the shardmarket: prefix."""

from __future__ import annotations

import socket
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from network_processes import start_node, stop_all, wait_ready


def outside_address() -> str:
    """This machine's address on its first non-loopback interface (what another host would connect to)."""
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
        probe.connect(("192.0.2.123", 9))  # no packet is sent: this picks the interface a route leaves by
        address = probe.getsockname()[0]
    if address.startswith("127."):
        pytest.skip("this machine has no non-loopback address to reach the node from")
    return address


def status(url: str, headers: dict | None = None) -> int:
    try:
        with urllib.request.urlopen(urllib.request.Request(url, headers=headers or {}), timeout=10) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


@pytest.mark.parametrize("key", ["", "s3cret-dashboard-key"])
def test_the_dashboard_is_for_local_addresses_and_key_holders(tiny, tmp_path, key):
    node = start_node(tiny, "0:2", tmp_path / "home", "--host", "0.0.0.0", settings={"dashboard_key": key})
    try:
        wait_ready(node)
        outside = f"http://{outside_address()}:{node.port}"
        for path in ("/dashboard", "/metrics", "/dashboard/summary.json"):
            assert status(f"{node.url}{path}") == 200  # the machine's own user needs no key
            assert status(f"{outside}{path}") == 403
            assert status(f"{outside}{path}", {"Authorization": "Bearer wrong"}) == 403
            assert status(f"{outside}{path}", {"Authorization": f"Bearer {key}"}) == (200 if key else 403)
        if key:
            assert status(f"{outside}/dashboard?key={key}") == 200
        assert status(f"{outside}/info") == 200  # what clients need stays public
    finally:
        stop_all([node])


def test_metrics_parse_and_carry_vllm_names_labelled_by_model(tiny, tmp_path):
    node = start_node(tiny, "0:2", tmp_path / "home", "--model-id", "tiny-model")
    try:
        wait_ready(node)
        with urllib.request.urlopen(f"{node.url}/metrics", timeout=10) as response:
            text = response.read().decode()
        families = {f.name: f for f in text_string_to_metric_families(text)}
        for name in ("num_requests_running", "num_requests_waiting", "kv_cache_usage_perc", "generation_tokens", "prompt_tokens"):
            family = families[f"shardmarket:{name}"]
            assert {s.labels["model_name"] for s in family.samples} == {"tiny-model"}
        assert "shardmarket:steps_served" in families and "shardmarket:step_compute_seconds" in families
        assert [s.labels["method"] for s in families["shardmarket:reachable"].samples] == ["direct"]
    finally:
        stop_all([node])
