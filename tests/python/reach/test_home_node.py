"""A home node joins the market with one command (root only: the NAT lab). For each router variant, `shardmarket node
up` behind the router registers itself on an anvil on the public side; a paying client there (`client serve`, default
settings) gets a streamed answer through the OpenAI API, and the node's tab is settled on chain. Then the node loses its
public address (the relay restarts, or the router's mapping goes and another host takes the port): it pauses its listing
while it cannot be reached, registers the new endpoint, and the client's next request succeeds."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from shardmarket.cli.devmarket import DevMarket
from shardmarket.engine.models import random_checkpoint, tiny_config
from tests.python.reach.lab import HOME_NET, NODE_PORT, PUBLIC_NET, Lab, missing_tools

pytestmark = pytest.mark.timeout(300)
SHARDMARKET = [sys.executable, "-m", "shardmarket"]
MODEL = "tiny"
API = f"http://{PUBLIC_NET}.1:8000/v1"
API_KEY = "lab-client-key"
VARIANTS = {"upnp": "upnp", "pcp": "pcp", "none": "relay", "double-nat": "relay", "symmetric": "relay"}


@pytest.fixture(scope="module")
def seeded(tmp_path_factory):
    why = missing_tools()
    if why:
        pytest.skip(why)
    return seed(tmp_path_factory.mktemp("home-node"))


def seed(root: Path) -> DevMarket:
    """A chain state with the contracts, MODEL published, one funded operator per variant and a client with a deposit;
    each journey starts its own anvil from a copy of it on the lab's public side."""
    market = DevMarket(root)
    market.checkpoint = random_checkpoint(tiny_config(), root / MODEL)
    try:
        market.start_chain()
        market.new_account("publisher")
        market.cli("publisher", "model", "publish", "--checkpoint", str(market.checkpoint), "--name", MODEL)
        for variant in VARIANTS:
            market.new_account(f"node-{variant}", tokens=200 * 10**18)
        market.new_account("client", tokens=10**18)
        market.cli("client", "client", "deposit", "0.1")
    finally:
        market.stop()
    return market


class Public:
    """The public side's helper process (tests/python/reach/public_probe.py): chain reads and OpenAI requests."""

    def __init__(self, lab: Lab, env: dict) -> None:
        self.proc = lab.spawn_in(
            "pub",
            [sys.executable, "-m", "tests.python.reach.public_probe"],
            log="probe.err",
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self.lab = lab

    def ask(self, **request) -> dict:
        assert self.proc.stdin and self.proc.stdout
        self.proc.stdin.write(json.dumps(request) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, self.lab.log("probe.err")[-2000:]
        return json.loads(line)

    def node(self, operator: str) -> dict:
        return self.ask(op="node", operator=operator)

    def chat(self) -> dict:
        return self.ask(op="chat", api=API, key=API_KEY, model=MODEL)

    def until(self, operator: str, ready, what: str, timeout: float = 60) -> tuple[dict, float]:
        """Poll `operator`'s registration until `ready(entry)`; the entry and the seconds it took."""
        start = time.monotonic()
        while not ready(entry := self.node(operator)):
            assert time.monotonic() - start < timeout, f"{what} did not happen within {timeout:.0f} s: {entry}"
            time.sleep(0.2)
        return entry, round(time.monotonic() - start, 2)


def wait_line(lab: Lab, log: str, prefix: str, proc: subprocess.Popen, after: int = 0, timeout: float = 180) -> str:
    """The first line of <lab>/<log> past character `after` that starts with `prefix`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for line in lab.log(log)[after:].splitlines():
            if line.startswith(prefix):
                return line
        assert proc.poll() is None, f"{log} ended ({proc.returncode}):\n{lab.log(log)[-3000:]}"
        time.sleep(0.1)
    raise AssertionError(f"no line {prefix!r} in {log} within {timeout:.0f} s:\n{lab.log(log)[-3000:]}")


def take_the_mapped_port(lab: Lab, method: str) -> None:
    """The router loses the node's mapping and another host of the LAN takes that external port at once."""
    neighbour, gateway = f"{HOME_NET}.3", f"{HOME_NET}.1"
    lab.run_in("lan", ["ip", "addr", "add", f"{neighbour}/24", "dev", "eth0"])
    squat = [sys.executable, "-m", "tests.python.reach.squat", method, gateway, neighbour, str(NODE_PORT), lab.node_ip]
    squatter = lab.spawn_in("lan", squat, log="squat.err", stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert squatter.stdin and squatter.stdout and squatter.stdout.readline() == "ready\n", lab.log("squat.err")
    if method == "pcp":  # PCP deletes only with the mapping's nonce: the router restarts instead, forgetting every mapping
        lab.stop_router()
        (lab.dir / "upnp.leases").unlink(missing_ok=True)  # or miniupnpd would restore them
        squatter.stdin.write("go\n")
        squatter.stdin.flush()
        lab.start_router()
    else:  # UPnP: the node's mapping is deleted on the router, and the port taken, a few ms apart
        squatter.stdin.write("go\n")
        squatter.stdin.flush()
    got = squatter.stdout.readline().strip()
    assert got == str(NODE_PORT), f"the node took its port back before another host could: {got} {lab.log('squat.err')}"


def journey(seeded: DevMarket, variant: str, relay_only: bool = False) -> dict:
    """The whole story for one router variant (the node told to map nothing, if `relay_only`), asserting each step;
    returns its timings."""
    method = "relay" if relay_only else VARIANTS[variant]
    operator = seeded.accounts[f"node-{variant}"]
    figures: dict = {"method": method}
    with Lab(variant) as lab:
        state = lab.dir / "chain-state.json"
        shutil.copy(seeded.root / "chain-state.json", state)
        rpc = lab.start_chain(state)

        shutil.copytree(seeded.root / "blocks", lab.dir / "blocks")
        for name in (f"node-{variant}", "client"):  # fresh homes: no tab store or payer ledger of an earlier chain
            shutil.copytree(seeded.root / "homes" / name, lab.dir / "homes" / name)

        def env(name: str) -> dict:
            return seeded.env(name) | {
                "SHARDMARKET_HOME": str(lab.dir / "homes" / name),
                "SHARDMARKET_IPFS_STORE": str(lab.dir / "blocks"),
                "SHARDMARKET_CHAIN_RPC_URL": rpc,
                "SHARDMARKET_REACH_UNREACHABLE_S": "2",
            }

        public = Public(lab, env("client"))
        started = time.monotonic()
        node = lab.spawn_in(
            "lan",
            [*SHARDMARKET, "node", "up", "--model", MODEL, "--price", "1000raw", "--port", str(NODE_PORT)]
            + (["--methods", ""] if relay_only else []),
            log="node.log",
            env=env(f"node-{variant}") | {"SHARDMARKET_NODE_REDEEM_INTERVAL_S": "1"},
        )
        reachable = wait_line(lab, "node.log", "reachable: ", node).split()
        assert reachable[2] == "by" and reachable[3].rstrip(",") == method, reachable
        endpoint = reachable[1]
        listed = wait_line(lab, "node.log", "listed: ", node)
        figures["up_to_listed_s"] = round(time.monotonic() - started, 2)
        figures["listed_after_serving_s"] = float(listed.split(", ")[1].split(" s after")[0])
        figures["model_load_s"] = float(wait_line(lab, "node.log", "model: ", node).split(" loaded in ")[1].split(" s")[0])
        entry = public.node(operator)
        assert entry["endpoints"] == [endpoint] and entry["listed"] and entry["layers"] == [0, 5], entry
        if method != "relay":
            assert endpoint == f"http://{lab.public_ip}:{NODE_PORT}"

        client = lab.spawn_in(
            "pub",
            [*SHARDMARKET, "client", "serve", "--checkpoint", str(seeded.checkpoint), "--host", f"{PUBLIC_NET}.1"],
            log="client.log",
            env=env("client") | {"SHARDMARKET_CLIENT_API_KEY": API_KEY},
        )
        wait_line(lab, "client.log", "OpenAI-compatible API on", client)
        answer = public.chat()
        assert answer.get("chunks", 0) >= 2, answer
        figures["first_answer_s"], figures["ms_per_token"] = answer["seconds"], answer["ms_per_token"]
        _, figures["settled_within_s"] = public.until(operator, lambda e: e["earnings"] > 0, "settling the client's tab")
        at_port = env(f"node-{variant}") | {"SHARDMARKET_NODE_PORT": str(NODE_PORT)}
        status = lab.run_in("lan", [*SHARDMARKET, "node", "status"], env=at_port, timeout=60).stdout
        verified = "verified" if "NOT verified" not in lab.log("node.log") else "not verified"
        assert f"reachability: {method} at {endpoint}, {verified} from outside, last outside check " in status, status
        assert verified == "not verified" or "last outside check never" not in status, status

        if method == "relay":
            lab.stop(lab.relay)
            _, figures["paused_within_s"] = public.until(operator, lambda e: e["paused"], "pausing the listing while unreachable")
            lab.start_relay()
        else:
            take_the_mapped_port(lab, method)
        moved, figures["recovered_s"] = public.until(
            operator, lambda e: e["listed"] and e["endpoints"] != [endpoint], "registering a new endpoint"
        )
        assert moved["endpoints"][0] in lab.log("node.log")
        again = public.chat()
        assert again.get("chunks", 0) >= 2, (again, lab.log("client.log")[-2000:])
        figures["answer_after_recovery_s"] = again["seconds"]
        lab.stop(node)
        public.until(operator, lambda e: e["paused"], "pausing the listing when the node stops", timeout=10)
    return figures


@pytest.fixture(scope="module")
def journeys(seeded):
    """Every variant's journey at once, each in a lab of its own (their waits overlap; the CPU is shared)."""
    with ThreadPoolExecutor(len(VARIANTS)) as pool:
        yield {variant: pool.submit(journey, seeded, variant) for variant in VARIANTS}


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_a_home_node_joins_earns_and_recovers(journeys, variant):
    journeys[variant].result()
