"""Fixtures for the reachability tests: a NAT lab per variant (root only), a node stand-in inside it."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.python.reach.lab import Lab, missing_tools


@pytest.fixture
def lab_for():
    """`lab_for(variant)` builds a lab; every lab built is torn down even when the test fails."""
    why = missing_tools()
    if why:
        pytest.skip(why)
    labs: list[Lab] = []

    def build(variant: str, **kw) -> Lab:
        lab = Lab(variant, **kw)
        labs.append(lab)
        return lab.__enter__()

    try:
        yield build
    finally:
        for lab in labs:
            lab.teardown()


def start_node(lab: Lab, *extra: str, relay: bool = True, timeout: float = 30) -> tuple[subprocess.Popen, dict]:
    """Start the node stand-in in the LAN (with the lab's relay to verify and relay through, if `relay`) and return it
    with its reachability report."""
    argv = [
        sys.executable,
        "-m",
        "tests.python.reach.standin",
        "--port",
        "7300",
        *(f"--stun={s}" for s in lab.stun_servers),
        *([f"--relay={lab.relay_url}"] if relay else []),
        *extra,
    ]
    proc = lab.spawn_in("lan", argv, log="node.err", stdout=subprocess.PIPE, text=True)  # stderr goes to the log
    line = proc.stdout.readline()
    if not line:
        proc.wait(timeout)
        raise AssertionError(f"the node stand-in exited without a report: {lab.log('node.err')[-2000:]}")
    return proc, json.loads(line)


def from_public(lab: Lab, mode: str, url: str, count: int) -> dict:
    """Run the lab client on the public side against `url`."""
    out = lab.python_in("pub", ["-m", "tests.python.reach.client", mode, url, str(count)], timeout=60)
    return json.loads(out.stdout.strip().splitlines()[-1])


def miniupnpd_rules(lab: Lab) -> str:
    """The DNAT rules miniupnpd holds on the router now."""
    return lab.run_in("rtr", ["nft", "list", "chain", "inet", "filter", "prerouting_miniupnpd"]).stdout
