"""End to end in the NAT lab (root only): a node in a home LAN becomes reachable by the path it chose,
and a client on the public side reads a streamed answer through it."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.python.reach.conftest import from_public, miniupnpd_rules, start_node
from tests.python.reach.lab import NODE_PORT, Lab, missing_tools

pytestmark = pytest.mark.timeout(120)
SHARDMARKET = [sys.executable, "-m", "shardmarket"]

EXPECTED = {  # variant: (method, NAT type, goal in seconds until verified)
    "upnp": ("upnp", "port-restricted-cone NAT", 5),
    "pcp": ("pcp", "port-restricted-cone NAT", 5),
    "none": ("relay", "port-restricted-cone NAT", 10),
    "double-nat": ("relay", "port-restricted-cone NAT", 10),
    "symmetric": ("relay", "symmetric NAT", 10),
}


def wait_for_closed(lab, proc) -> None:
    proc.terminate()
    assert '"closed": true' in proc.stdout.read(), lab.log("node.err")[-2000:]
    proc.wait(10)


@pytest.mark.parametrize("variant", list(EXPECTED))
def test_node_becomes_reachable_and_streams(lab_for, variant):
    lab = lab_for(variant)
    method, nat_type, goal = EXPECTED[variant]
    direct = f"http://{lab.public_ip}:{NODE_PORT}"
    assert not from_public(lab, "health", direct, 1)["ok"], "the router lets unsolicited connections in"

    proc, report = start_node(lab)
    assert report["verified"], report
    assert (report["method"], report["nat_type"]) == (method, nat_type), report
    assert report["seconds"] < goal, report
    answer = from_public(lab, "stream", report["endpoint"], 32)
    assert answer["status"] == 200 and answer["events"] == [f"token {i} {'x' * 16}" for i in range(32)]
    if method != "relay":
        assert report["endpoint"] == direct and f"dnat ip to {lab.node_ip}:{NODE_PORT}" in miniupnpd_rules(lab)
    if method == "upnp":  # miniupnpc, an independent UPnP client, sees the same mapping
        listed = lab.run_in("lan", ["upnpc", "-i", "-l"]).stdout
        assert f"TCP  {NODE_PORT}->{lab.node_ip}:{NODE_PORT}" in listed, listed

    wait_for_closed(lab, proc)
    assert not from_public(lab, "health", report["endpoint"], 1)["ok"], "the endpoint outlived the node"
    if lab.variant.miniupnpd:
        assert "dnat" not in miniupnpd_rules(lab), "the node left its port mapping behind"


def test_natpmp_maps_when_pcp_is_not_wanted(lab_for):
    lab = lab_for("pcp")
    proc, report = start_node(lab, "--methods", "natpmp,upnp")
    assert (report["method"], report["verified"]) == ("natpmp", True), report
    assert from_public(lab, "stream", report["endpoint"], 4)["events"][-1].startswith("token 3")
    wait_for_closed(lab, proc)
    assert "dnat" not in miniupnpd_rules(lab)


def test_without_a_relay_a_granted_mapping_is_used_unverified(lab_for):
    lab = lab_for("pcp")
    proc, report = start_node(lab, relay=False)
    assert (report["method"], report["verified"]) == ("pcp", False), report
    assert report["endpoint"] == f"http://{lab.public_ip}:{NODE_PORT}"
    assert from_public(lab, "stream", report["endpoint"], 4)["events"][-1].startswith("token 3")
    wait_for_closed(lab, proc)


def test_short_leases_are_renewed_before_they_expire(lab_for):
    lab = lab_for("pcp")
    one_shot = "import asyncio; from shardmarket.net.pcp import PcpMapper; asyncio.run(PcpMapper('10.99.1.1').map(7400, 7400, 3))"
    lab.python_in("lan", ["-c", one_shot])  # control: a 3 s mapping nobody renews
    proc, report = start_node(lab, "--lease-s", "3")
    granted = next(a["detail"] for a in report["attempts"] if a["method"] == "pcp")
    assert report["method"] == "pcp" and granted.endswith("for 3 s"), report
    start = time.monotonic()
    while "7400" in miniupnpd_rules(lab):
        assert time.monotonic() - start < 10, "miniupnpd does not expire leases: this test would prove nothing"
        time.sleep(0.2)
    time.sleep(max(0.0, 4.5 - (time.monotonic() - start)))  # well past the node's own 3 s lease
    assert f"dnat ip to {lab.node_ip}:{NODE_PORT}" in miniupnpd_rules(lab)
    assert from_public(lab, "health", report["endpoint"], 1)["ok"]
    wait_for_closed(lab, proc)


def test_mapping_that_does_not_answer_from_outside_is_not_registered(lab_for):
    lab = lab_for("pcp")
    lab.run_in("rtr", ["nft", "insert", "rule", "inet", "filter", "forward", "tcp", "dport", str(NODE_PORT), "drop"])
    proc, report = start_node(lab)
    attempts = {a["method"]: a for a in report["attempts"]}
    assert attempts["pcp"]["ok"] and not attempts["verify-pcp"]["ok"]
    assert report["method"] == "relay" and report["verified"]
    assert "dnat" not in miniupnpd_rules(lab), "an unverified mapping was left on the router"
    wait_for_closed(lab, proc)


@pytest.mark.parametrize("variant", ["pcp", "upnp"])
def test_mapping_is_recreated_after_the_router_restarts(lab_for, variant):
    lab = lab_for(variant)
    proc, report = start_node(lab, "--refresh-s", "0.5")
    assert report["method"] == variant
    lab.stop_router()
    assert "dnat" not in miniupnpd_rules(lab)
    assert not from_public(lab, "health", report["endpoint"], 1)["ok"]
    lab.start_router()
    start = time.monotonic()
    while not from_public(lab, "health", report["endpoint"], 1)["ok"]:
        assert time.monotonic() - start < 5, "the mapping was not re-created within 5 s of the router restart"
    assert "dnat" in miniupnpd_rules(lab)
    wait_for_closed(lab, proc)


def test_cli_prints_what_it_found(lab_for):
    lab = lab_for("upnp")
    out = lab.run_in("lan", [*SHARDMARKET, "node", "reachability", "--port", str(NODE_PORT)], timeout=60)
    assert "NAT type        port-restricted-cone NAT" in out.stdout
    assert "public address  10.99.0.10" in out.stdout
    assert "FAIL pcp" in out.stdout and "ok   upnp" in out.stdout
    assert f"endpoint        http://10.99.0.10:{NODE_PORT}  (by upnp, verified" in out.stdout
    assert "dnat" not in miniupnpd_rules(lab), "the one-shot report left its mapping behind"
    refused = lab.run_in(
        "lan",
        [*SHARDMARKET, "node", "reachability", "--methods", "pcp", "--relay", "http://10.99.0.1:1"],
        check=False,
        timeout=60,
    )
    assert refused.returncode == 1 and "none found" in refused.stdout


def test_lab_tears_down_when_a_test_fails():
    if missing_tools():
        pytest.skip(missing_tools())
    lab = Lab("pcp")
    daemons: list[int] = []

    def fail_inside_the_lab() -> None:
        with lab:
            daemons.extend(p.pid for p in lab.procs)
            raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        fail_inside_the_lab()
    listed = subprocess.run(["ip", "netns", "list"], check=True, capture_output=True, text=True).stdout
    assert lab.tag not in listed and not lab.dir.exists()
    for pid in daemons:
        assert not Path(f"/proc/{pid}").exists(), f"process {pid} outlived the lab"


def test_lab_says_why_it_cannot_run(monkeypatch):
    monkeypatch.setattr("os.geteuid", lambda: 1000)
    assert "needs root" in missing_tools()
    monkeypatch.setattr("os.geteuid", lambda: 0)
    absent = ("miniupnpd", "turnserver")
    monkeypatch.setattr("shutil.which", lambda tool: None if tool in absent else f"/usr/bin/{tool}")
    assert missing_tools() == "the NAT lab needs coturn, miniupnpd (make setup installs them as root)"
