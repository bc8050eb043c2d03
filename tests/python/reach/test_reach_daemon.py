"""The real node daemon and client through the NAT lab: `shardmarket client chat` on the public side
gets a streamed answer from `shardmarket node run` in the home LAN, by the path `shardmarket node reachability` chose."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from shardmarket.engine.models import random_checkpoint, tiny_config
from tests.python.reach.conftest import from_public
from tests.python.reach.lab import NODE_PORT, REPO

pytestmark = pytest.mark.timeout(180)
SHARDMARKET = str(Path(sys.executable).with_name("shardmarket"))
PROMPT = "Say hello."


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return random_checkpoint(tiny_config(), tmp_path_factory.mktemp("models") / "tiny")


def start_daemon(lab, checkpoint: Path, layers: str) -> subprocess.Popen:
    """`shardmarket node run` in the LAN, listening on every address (a port mapping forwards to the LAN IP)."""
    daemon = lab.spawn_in(
        "lan",
        [
            SHARDMARKET,
            "node",
            "run",
            "--checkpoint",
            str(checkpoint),
            "--layers",
            layers,
            "--host",
            "0.0.0.0",
            "--port",
            str(NODE_PORT),
        ],
        log="daemon.log",
    )
    start = time.monotonic()
    while not lab.python_in(
        "lan", ["-m", "tests.python.reach.client", "health", f"http://127.0.0.1:{NODE_PORT}", "1"], check=False
    ).stdout.count('"ok": true'):
        assert daemon.poll() is None, lab.log("daemon.log")[-2000:]
        assert time.monotonic() - start < 120, "the node daemon did not come up in 120 s"
        time.sleep(0.5)
    return daemon


def hold_endpoint(lab, *extra: str) -> tuple[subprocess.Popen, dict]:
    """`shardmarket node reachability --hold` next to the daemon; returns it and its report."""
    hold = lab.spawn_in(
        "lan",
        [SHARDMARKET, "node", "reachability", "--port", str(NODE_PORT), "--json", "--hold", *extra],
        log="reach.err",
        stdout=subprocess.PIPE,
        text=True,
    )  # stderr goes to the log
    line = hold.stdout.readline()
    assert line, lab.log("reach.err")[-2000:]
    return hold, json.loads(line)


def chats(lab, runs: list[tuple[str, str]], checkpoint: Path) -> list[str]:
    """`shardmarket client chat` from each (namespace, node URL) at once; their answers."""
    procs = [
        subprocess.Popen(
            lab.argv_in(
                role,
                [
                    SHARDMARKET,
                    "client",
                    "chat",
                    "--nodes",
                    url,
                    "--transport",
                    "ws",
                    "--checkpoint",
                    str(checkpoint),
                    "--max-tokens",
                    "12",
                    PROMPT,
                ],
            ),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=lab.env(),
            cwd=REPO,
        )
        for role, url in runs
    ]
    outs = [proc.communicate(timeout=120) for proc in procs]
    for proc, (_, err) in zip(procs, outs, strict=True):
        assert proc.returncode == 0, err[-2000:]
    return [out for out, _ in outs]


# every variant passes (checked before merging); two keep the suite short: one port mapping, one relay
@pytest.mark.parametrize(("variant", "method"), [("pcp", "pcp"), ("symmetric", "relay")])
def test_chat_reaches_a_node_behind_nat(lab_for, tiny, variant, method):
    lab = lab_for(variant)
    start_daemon(lab, tiny, f"0:{tiny_config()['num_hidden_layers']}")
    hold, report = hold_endpoint(lab)
    assert report["verified"] and report["method"] == method, report
    through_nat, at_home = chats(lab, [("pub", report["endpoint"]), ("lan", f"http://127.0.0.1:{NODE_PORT}")], tiny)
    assert through_nat.strip() and through_nat == at_home
    hold.terminate()
    hold.wait(10)
    assert not from_public(lab, "health", report["endpoint"], 1)["ok"], "the endpoint outlived --hold"
