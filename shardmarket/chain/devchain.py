"""A development chain on this machine: anvil on a chosen port, contracts deployed by brownie with
scripts/deploy.py (the same script as `brownie run scripts/deploy.py --network X` for real chains).

    python -m shardmarket.chain.devchain deploy --rpc http://127.0.0.1:8600   # deploy onto a running anvil
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

from web3 import Web3
from web3.middleware import Web3Middleware
from web3.types import MakeRequestFn, RPCEndpoint, RPCResponse

REPO = Path(__file__).resolve().parents[2]
ANVIL = REPO / "node_modules" / "@foundry-rs" / "anvil-linux-amd64" / "bin" / "anvil"
BROWNIE_NETWORK = "shardmarket-anvil"
MINING_TIMEOUT_S = 60.0


class MinedWhenSent(Web3Middleware):
    """A sent transaction returns once anvil has stored its receipt. anvil (1.7.1) publishes a block's state before
    its receipts, and brownie calls a transaction whose sender's nonce moved past it with no receipt yet dropped."""

    def wrap_make_request(self, make_request: MakeRequestFn) -> MakeRequestFn:
        def middleware(method: RPCEndpoint, params: list) -> RPCResponse:
            response = make_request(method, params)
            if method in ("eth_sendTransaction", "eth_sendRawTransaction") and "result" in response:
                deadline = time.monotonic() + MINING_TIMEOUT_S
                while make_request(RPCEndpoint("eth_getTransactionReceipt"), [response["result"]]).get("result") is None:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"anvil did not mine transaction {response['result']} in {MINING_TIMEOUT_S:.0f} s")
                    time.sleep(0.005)
            return response

        return middleware


def wait_for_receipts(w3: Web3) -> None:
    """Make every transaction `w3` sends return only once anvil has stored its receipt (see MinedWhenSent)."""
    if "mined when sent" not in w3.middleware_onion:
        w3.middleware_onion.add(MinedWhenSent, name="mined when sent")


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def anvil_binary() -> str:
    if ANVIL.exists():
        return str(ANVIL)
    found = shutil.which("anvil")
    if not found:
        raise FileNotFoundError(f"anvil is not installed ({ANVIL} is missing): run `make setup`")
    return found


def start_anvil(port: int, log: Path | None = None, accounts: int = 10, state: Path | None = None) -> subprocess.Popen:
    """Start anvil (base fee 0) on `port` and wait until it answers; with `state`, the chain is saved there on
    exit and reloaded from there on start."""
    cmd = [
        anvil_binary(),
        "--port",
        str(port),
        "--block-base-fee-per-gas",
        "0",
        "--accounts",
        str(accounts),
        "--chain-id",
        "31337",
    ]
    with open(log, "ab") if log else open(os.devnull, "wb") as out:
        process = subprocess.Popen(cmd + (["--state", str(state)] if state else []), stdout=out, stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"anvil exited with code {process.returncode} (port {port} taken?)")
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.5).close()
            return process
        except OSError:
            time.sleep(0.1)
    process.kill()
    raise RuntimeError(f"anvil did not listen on port {port} within 30 s")


def deploy(rpc_url: str, deployments_dir: Path, python: str = sys.executable) -> dict[str, str]:
    """Deploy every contract with brownie (in a child process) onto `rpc_url`; returns name -> address."""
    env = {**os.environ, "SHARDMARKET_CHAIN_DEPLOYMENTS_DIR": str(deployments_dir)}
    result = subprocess.run(
        [python, "-m", "shardmarket.chain.devchain", "deploy", "--rpc", rpc_url],
        cwd=REPO,
        env=env,
        check=False,
        capture_output=True,
        text=True,
    )
    if result.returncode != 0:
        raise RuntimeError(f"brownie deployment failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def _deploy_here(rpc_url: str) -> dict[str, str]:
    from brownie import accounts, network, project, web3
    from brownie._config import CONFIG

    loaded = project.load(REPO, name="ShardmarketProject")
    loaded.load_config()
    CONFIG.networks[BROWNIE_NETWORK]["host"] = rpc_url
    network.connect(BROWNIE_NETWORK)
    wait_for_receipts(web3)
    sys.path.insert(0, str(REPO))
    from scripts.deploy import main as deploy_main

    return deploy_main(accounts[0])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("deploy", help="deploy with brownie onto a running anvil")
    run.add_argument("--rpc", required=True)
    args = parser.parse_args()
    os.chdir(REPO)
    addresses = _deploy_here(args.rpc)
    print(json.dumps(addresses))


if __name__ == "__main__":
    main()
