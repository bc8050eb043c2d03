"""A node's dashboard and /metrics: open to its own machine, closed to other addresses unless they hold the key; and
/metrics is Prometheus text carrying vLLM's names under the shardmarket: prefix."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
from prometheus_client.parser import text_string_to_metric_families

from network_processes import ROOT, child_env, free_port, start_node, stop_all, wait_http, wait_ready


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


def test_client_serve_times_requests_under_vllms_names_and_keeps_its_dashboard_local(tiny, tmp_path):
    """TTFT, inter-token latency and end-to-end latency of a real request through `client serve` over two nodes; the
    API key opens the API, not /metrics."""
    nodes = [start_node(tiny, "0:2", tmp_path / "a"), start_node(tiny, "2:5", tmp_path / "b")]
    port, key, log = free_port(), "api-key", tmp_path / "api.log"
    cmd = [sys.executable, "-m", "shardmarket", "client", "serve", "--checkpoint", str(tiny), "--host", "0.0.0.0"]
    cmd += ["--port", str(port), "--nodes", ",".join(n.url for n in nodes)]
    env = dict(child_env(tmp_path / "client"), SHARDMARKET_CLIENT_API_KEY=key)
    api = None
    try:
        wait_ready(*nodes)
        api = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
        base = f"http://127.0.0.1:{port}"
        wait_http(f"{base}/v1/models", api, log, headers={"Authorization": f"Bearer {key}"})
        body = json.dumps({"model": "tiny", "prompt": "hello", "max_tokens": 6, "temperature": 0}).encode()
        request = urllib.request.Request(
            f"{base}/v1/completions", body, {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
        )
        with urllib.request.urlopen(request, timeout=60) as response:
            usage = json.loads(response.read())["usage"]
        with urllib.request.urlopen(f"{base}/metrics", timeout=10) as response:
            families = {f.name: f for f in text_string_to_metric_families(response.read().decode())}

        def sample(name: str, suffix: str = "") -> float:
            [value] = [s.value for s in families[f"shardmarket:{name}"].samples if s.name == f"shardmarket:{name}{suffix}"]
            return value

        generated = usage["completion_tokens"]
        assert generated >= 1 and sample("generation_tokens", "_total") == generated
        assert sample("prompt_tokens", "_total") == usage["prompt_tokens"]
        assert sample("time_to_first_token_seconds", "_count") == 1 == sample("e2e_request_latency_seconds", "_count")
        assert sample("inter_token_latency_seconds", "_count") == generated - 1
        assert sample("e2e_request_latency_seconds", "_sum") >= sample("time_to_first_token_seconds", "_sum") > 0
        assert sample("num_requests_running") == 0
        assert {s.labels["model_name"] for s in families["shardmarket:time_to_first_token_seconds"].samples} == {"tiny"}
        outside = f"http://{outside_address()}:{port}"
        assert status(f"{outside}/metrics", {"Authorization": f"Bearer {key}"}) == 403  # the API key is not the dashboard's
        assert status(f"{outside}/v1/models", {"Authorization": f"Bearer {key}"}) == 200
        with urllib.request.urlopen(f"{base}/dashboard/summary.json", timeout=10) as response:
            assert json.loads(response.read())["requests_done"] == 1
        assert status(f"{base}/dashboard") == 200
    finally:
        if api is not None:
            api.terminate()
            api.wait(15)
        stop_all(nodes)
