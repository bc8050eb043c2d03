"""A hidden client in network namespaces: the client, a forwarding relay and two nodes each in a namespace of their
own behind a router; nftables at each node counts the connections it gets by source address. A hidden `client chat`
makes 0 connections from the client's address at any node (all come from the relay); the same chat not hidden
makes some (the counters work)."""

from __future__ import annotations

import contextlib
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shardmarket.engine.models import random_checkpoint, tiny_config
from tests.python.reach.lab import REPO, missing_tools

PREFIX = f"smpv{os.getpid() % 100000}"  # this test's namespaces: the NAT lab's are sm<pid>x<n>
NET = "10.97"
ROLES = {"cli": 1, "rly": 2, "na": 3, "nb": 4}  # namespace -> subnet NET.<n>.0/24, the host at .2, the router at .1
RELAY_PORT, FORWARD_PORT, NODE_PORT = 8400, 8401, 7300


def ip(role: str) -> str:
    return f"{NET}.{ROLES[role]}.2"


def sh(*argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(list(argv), check=True, capture_output=True, text=True, timeout=60, **kw)


def inside(role: str, *argv: str) -> list[str]:
    return ["ip", "netns", "exec", f"{PREFIX}-{role}", *argv]


@contextlib.contextmanager
def namespaces():
    """A router namespace and one per role, linked by veths; torn down whatever happens."""
    created: list[str] = []
    try:
        sh("ip", "netns", "add", f"{PREFIX}-hub")
        created.append(f"{PREFIX}-hub")
        sh(*inside("hub", "sysctl", "-qw", "net.ipv4.ip_forward=1"))
        sh(*inside("hub", "ip", "link", "set", "lo", "up"))
        for role, n in ROLES.items():
            ns = f"{PREFIX}-{role}"
            sh("ip", "netns", "add", ns)
            created.append(ns)
            sh("ip", "link", "add", f"h{n}", "netns", f"{PREFIX}-hub", "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh(*inside("hub", "ip", "addr", "add", f"{NET}.{n}.1/24", "dev", f"h{n}"))
            sh(*inside("hub", "ip", "link", "set", f"h{n}", "up"))
            sh(*inside(role, "ip", "addr", "add", f"{NET}.{n}.2/24", "dev", "eth0"))
            sh(*inside(role, "ip", "link", "set", "eth0", "up"))
            sh(*inside(role, "ip", "link", "set", "lo", "up"))
            sh(*inside(role, "ip", "route", "add", "default", "via", f"{NET}.{n}.1"))
        yield
    finally:
        for ns in reversed(created):
            for pid in subprocess.run(["ip", "netns", "pids", ns], capture_output=True, text=True, check=False).stdout.split():
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), 9)  # only processes inside namespaces this test created
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def count_connections(role: str) -> None:
    """nftables counters at a node: new TCP connections from the client's address and from the relay's."""
    rules = f"""
table inet {PREFIX} {{
    chain input {{
        type filter hook input priority 0; policy accept;
        ip saddr {ip("cli")} tcp flags & (syn | ack) == syn counter comment "client"
        ip saddr {ip("rly")} tcp flags & (syn | ack) == syn counter comment "relay"
    }}
}}
"""
    subprocess.run(inside(role, "nft", "-f", "-"), input=rules, check=True, capture_output=True, text=True)


def connections(role: str) -> dict[str, int]:
    listing = sh(*inside(role, "nft", "list", "table", "inet", PREFIX)).stdout
    return {who: int(n) for n, who in re.findall(r'counter packets (\d+) bytes \d+ comment "(\w+)"', listing)}


def wait_listening(role: str, port: int, process: subprocess.Popen, log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while f":{port} " not in sh(*inside(role, "ss", "-Hltn")).stdout:
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{role} did not start listening on {port}:\n{log.read_text()[-3000:]}")
        time.sleep(0.2)


@pytest.mark.skipif(missing_tools() is not None, reason=str(missing_tools()))
def test_no_node_sees_a_hidden_client_address(tmp_path):
    checkpoint = random_checkpoint(tiny_config(), tmp_path / "tiny")
    env = dict(os.environ, PYTHONPATH=str(REPO), SHARDMARKET_HOME=str(tmp_path / "home"), OMP_NUM_THREADS="1")
    processes: list[subprocess.Popen] = []

    def spawn(role: str, name: str, *argv: str) -> tuple[subprocess.Popen, Path]:
        log = tmp_path / f"{name}.log"
        home = dict(env, SHARDMARKET_HOME=str(tmp_path / name))
        process = subprocess.Popen(
            inside(role, sys.executable, "-m", "shardmarket", *argv),
            cwd=REPO,
            env=home,
            stdout=log.open("w"),
            stderr=subprocess.STDOUT,
        )
        processes.append(process)
        return process, log

    def chat(*extra: str) -> subprocess.CompletedProcess:
        urls = f"http://{ip('na')}:{NODE_PORT},http://{ip('nb')}:{NODE_PORT}"
        argv = ["client", "chat", "my password is hunter2", "--checkpoint", str(checkpoint), "--model-id", "tiny"]
        argv += ["--nodes", urls, "--max-tokens", "3", *extra]
        return subprocess.run(
            inside("cli", sys.executable, "-m", "shardmarket", *argv),
            cwd=REPO,
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )

    with namespaces():
        try:
            relay, relay_log = spawn(
                "rly", "relay", "node", "relay", "--public-host", ip("rly"), "--host", ip("rly"), "--port", str(RELAY_PORT),
                "--forward-port", str(FORWARD_PORT), "--forward-local",
            )  # fmt: skip
            for role, layers in (("na", "0:2"), ("nb", "2:5")):
                count_connections(role)
                node, log = spawn(
                    role, role, "node", "run", "--checkpoint", str(checkpoint), "--model-id", "tiny", "--layers", layers,
                    "--host", ip(role), "--port", str(NODE_PORT), "--threads", "1",
                )  # fmt: skip
                wait_listening(role, NODE_PORT, node, log)
            wait_listening("rly", FORWARD_PORT, relay, relay_log)

            hidden = chat("--relay", f"{ip('rly')}:{FORWARD_PORT}", "--hidden")
            assert hidden.returncode == 0, hidden.stderr
            for role in ("na", "nb"):
                seen = connections(role)
                assert seen["client"] == 0, f"node {role} got {seen['client']} connections from the client's address"
                assert seen["relay"] > 0  # discovery and the session came, through the relay

            direct = chat()
            assert direct.returncode == 0, direct.stderr
            assert direct.stdout == hidden.stdout  # the same greedy answer either way
            assert all(connections(role)["client"] > 0 for role in ("na", "nb"))  # the counters do count the client
        finally:
            for process in processes:
                with contextlib.suppress(ProcessLookupError):
                    process.terminate()
            for process in processes:
                try:
                    process.wait(15)
                except subprocess.TimeoutExpired:
                    process.kill()
