"""A whole market on this machine, for `shardmarket demo`, the market tests and bench/market.py: anvil,
contracts deployed by brownie, one SHARDMARKET_HOME per participant, node daemons as real processes."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import requests
from eth_account import Account
from web3 import Web3

from shardmarket.chain.devchain import REPO, deploy, free_port, start_anvil

# anvil's first development account (public knowledge): deploys the contracts and holds the TestToken supply
DEPLOYER_KEY = "0xac0974bec39a17e36ba4a6b4d238ff944bacb478cbed5efcae784d7bf4f2ff80"
PASSWORD = "shardmarket-dev"


def node_command(
    *extra: str, checkpoint: Path | None = None, layers: str | None = None, port: int | None = None, threads: int | None = None
) -> list[str]:
    """The argv of `python -m shardmarket node run` with the options given, then `extra`."""
    options = {"--checkpoint": checkpoint, "--layers": layers, "--port": port, "--threads": threads}
    argv = [sys.executable, "-m", "shardmarket", "node", "run"]
    for option, value in options.items():
        if value is not None:
            argv += [option, str(value)]
    return [*argv, *extra]


@dataclass
class NodeProcess:
    """A node daemon started by the dev market."""

    name: str
    process: subprocess.Popen
    url: str
    log: Path
    log_start: int = 0  # where this process's output begins in the (appended) log


@dataclass
class DevMarket:
    """Participants are named; each gets a home under `root` and (after `new_account`) a keystore."""

    root: Path
    threads: int = 1
    anvil: subprocess.Popen | None = None
    chain_port: int = 0
    rpc_url: str = ""
    addresses: dict[str, str] = field(default_factory=dict)
    nodes: dict[str, NodeProcess] = field(default_factory=dict)
    accounts: dict[str, str] = field(default_factory=dict)

    def start_chain(self) -> None:
        """Start anvil on a free port and deploy every contract with brownie."""
        self.root.mkdir(parents=True, exist_ok=True)
        self.chain_port = free_port()
        self.anvil = start_anvil(self.chain_port, self.root / "anvil.log", state=self.root / "chain-state.json")
        self.rpc_url = f"http://127.0.0.1:{self.chain_port}"
        self.addresses = deploy(self.rpc_url, self.root / "deployments")

    def stop_chain(self) -> None:
        """Take the chain down (anvil saves its state)."""
        if self.anvil is not None:
            self.anvil.terminate()
            self.anvil.wait(30)

    def restart_chain(self) -> None:
        """Bring the chain back on the same port with the state it had."""
        self.anvil = start_anvil(self.chain_port, self.root / "anvil.log", state=self.root / "chain-state.json")

    @property
    def w3(self) -> Web3:
        return Web3(Web3.HTTPProvider(self.rpc_url))

    def env(self, name: str) -> dict[str, str]:
        """Environment of participant `name`: its home, the chain, the shared block store, the dev password."""
        return {
            "SHARDMARKET_HOME": str(self.root / "homes" / name),
            "SHARDMARKET_CHAIN_RPC_URL": self.rpc_url,
            "SHARDMARKET_CHAIN_DEPLOYMENTS_DIR": str(self.root / "deployments"),
            "SHARDMARKET_CHAIN_KEYSTORE_SCRYPT_N": "1024",
            "SHARDMARKET_IPFS_STORE": str(self.root / "blocks"),
            "SHARDMARKET_PASSWORD": PASSWORD,
            "SHARDMARKET_NODE_REDEEM_INTERVAL_S": "3600",
        }

    @contextlib.contextmanager
    def acting_as(self, name: str):
        """Run CLI code in this process as participant `name` (its environment set for the duration)."""
        saved = dict(os.environ)
        os.environ.update(self.env(name))
        try:
            yield
        finally:
            os.environ.clear()
            os.environ.update(saved)

    def cli(self, name: str, *argv: str) -> int:
        """Run `shardmarket ARGV...` in-process as `name`; raises on a non-zero exit."""
        from shardmarket.cli import main

        with self.acting_as(name):
            code = main(list(argv))
        if code:
            raise RuntimeError(f"`shardmarket {' '.join(argv)}` as {name} exited with {code}")
        return code

    def new_account(self, name: str, eth: float = 10.0, tokens: int = 0) -> str:
        """Create `name`'s keystore (keys new) and fund it with ETH for gas and TestTokens."""
        from shardmarket.chain.keys import keystore_address
        from shardmarket.cli.keys import home_keys

        self.cli(name, "keys", "new")
        with self.acting_as(name):
            address = keystore_address(home_keys())
        self.accounts[name] = address
        self.fund(address, eth, tokens)
        return address

    def fund(self, address: str, eth: float, tokens: int) -> None:
        from shardmarket.chain.contracts import Market
        from shardmarket.config import load_config

        w3 = self.w3
        deployer = Account.from_key(DEPLOYER_KEY)
        if eth:
            tx = {
                "to": address,
                "value": int(eth * 10**18),
                "from": deployer.address,
                "gas": 21000,
                "gasPrice": w3.eth.gas_price,
                "nonce": w3.eth.get_transaction_count(deployer.address),
                "chainId": w3.eth.chain_id,
            }
            w3.eth.wait_for_transaction_receipt(w3.eth.send_raw_transaction(deployer.sign_transaction(tx).raw_transaction))
        if tokens:
            with self.acting_as("deployer"):
                market = Market.connect(load_config().chain, deployer)
            market.transact(market.token.functions.transfer(address, tokens), "funding")

    def register_crowd(self, model: str, listings: list[tuple[int, int, int, str]], stake: int, batch: int = 250) -> list[str]:
        """Register one node per (start, end, price, endpoint) of `listings` under new operators, fast: anvil
        impersonates them (no keys, no signing) and gives them gas money, the deployer sends each its stake, and the
        transactions go in JSON-RPC batches of `batch`. Returns the operators; raises if any did not get listed."""
        from shardmarket.chain.contracts import Market
        from shardmarket.config import load_config

        with self.acting_as("deployer"):
            market = Market.connect(load_config().chain)
        token, stakes, registry = market.token, market.stake, market.registry
        model_id = market.model_id(model)
        before = market.read(registry.functions.modelNodeCount(model_id))
        deployer = Account.from_key(DEPLOYER_KEY).address
        first = before + len(self.accounts) + 1
        operators: list[str] = [
            Web3.to_checksum_address(Web3.keccak(text=f"crowd {model} {first + i}")[-20:]) for i in range(len(listings))
        ]
        # automine off: anvil then packs the transactions into full blocks, instead of one block each
        self._rpc_batch([("anvil_autoImpersonateAccount", [True]), ("evm_setAutomine", [False])])
        self._rpc_batch([("anvil_setBalance", [operator, hex(10**18)]) for operator in operators], batch)
        # nonces set here: within a batch anvil would hand a sender the same pending nonce twice
        sends, deployer_nonce = [], market.w3.eth.get_transaction_count(deployer, "pending")
        for i, (operator, (start, end, price, endpoint)) in enumerate(zip(operators, listings, strict=True)):
            key = Web3.keccak(text=f"x25519 {operator}")
            sends.append((deployer, deployer_nonce + i, token, token.encode_abi("transfer", [operator, stake]), 80_000))
            sends.append((operator, 0, token, token.encode_abi("approve", [stakes.address, stake]), 80_000))
            sends.append((operator, 1, stakes, stakes.encode_abi("stake", [stake]), 200_000))
            call = registry.encode_abi("register", [model_id, start, end, price, key, [endpoint]])
            sends.append((operator, 2, registry, call, 600_000))
        txs = [
            {"from": sender, "nonce": hex(nonce), "to": contract.address, "data": data, "gas": hex(gas), "gasPrice": "0x0"}
            for sender, nonce, contract, data, gas in sends
        ]
        # the stakes first, all mined: anvil mines what it accepted after answering, in any order across senders
        self._rpc_batch([("eth_sendTransaction", [tx]) for tx in txs if tx["from"] == deployer], batch)
        self._wait_mined()
        self._rpc_batch([("eth_sendTransaction", [tx]) for tx in txs if tx["from"] != deployer], batch)
        self._wait_mined()
        self._rpc_batch([("anvil_autoImpersonateAccount", [False]), ("evm_setAutomine", [True])])
        listed = market.read(registry.functions.modelNodeCount(model_id)) - before
        if listed != len(listings):
            raise RuntimeError(f"registered {listed} of {len(listings)} crowd nodes; see {self.root / 'anvil.log'}")
        return operators

    def _wait_mined(self, timeout: float = 600.0) -> None:
        """Mine blocks until anvil's transaction pool is empty."""
        deadline = time.monotonic() + timeout
        while True:
            status = requests.post(self.rpc_url, json={"jsonrpc": "2.0", "id": 1, "method": "txpool_status"}, timeout=30).json()
            if not any(int(count, 16) for count in status["result"].values()):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"anvil did not mine every transaction within {timeout:.0f} s: {status['result']}")
            self._rpc_batch([("evm_mine", [])])

    def _rpc_batch(self, calls: list[tuple[str, list]], size: int = 250) -> None:
        """Send JSON-RPC `calls` (method, params) in batches of `size`; raises on the first error answer."""
        for offset in range(0, len(calls), size):
            body = [
                {"jsonrpc": "2.0", "id": offset + i, "method": method, "params": params}
                for i, (method, params) in enumerate(calls[offset : offset + size])
            ]
            answers = requests.post(self.rpc_url, json=body, timeout=600).json()
            errors = [answer["error"] for answer in answers if "error" in answer]
            if errors:
                raise RuntimeError(f"{len(errors)} of {len(body)} calls failed, the first: {errors[0]}")

    def register_node(self, name: str, model: str, layers: str, price: int, stake: int = 100 * 10**18) -> None:
        """Create operator `name` holding `stake` base units of the token, pick its node's port and register it (`node
        register`) for `layers` of `model` at `price` base units a token, staking all it holds."""
        self.new_account(name, tokens=stake)
        self.node_port(name)
        register = ["node", "register", "--model", model, "--layers", layers, "--price", f"{price}raw", "--stake", f"{stake}raw"]
        self.cli(name, *register)

    def start_nodes(self, names: list[str], extra: dict[str, list[str]] | None = None) -> None:
        """Start every node of `names` (with its `extra` arguments of `node run`) at once; returns once all are ready."""
        for name in names:
            self.start_node(name, *(extra or {}).get(name, []), wait=False)
        for name in names:
            self.wait_ready(self.nodes[name])

    def start_node(self, name: str, *extra: str, wait: bool = True) -> NodeProcess:
        """Start `shardmarket node run` (chain mode) as `name`; returns once it is ready (if `wait`)."""
        log = self.root / f"{name}.log"
        port = self.node_port(name)
        log_start = log.stat().st_size if log.exists() else 0
        env = {**os.environ, **self.env(name), "OMP_NUM_THREADS": str(self.threads)}
        with open(log, "ab") as out:
            process = subprocess.Popen(
                node_command(*extra, threads=self.threads),
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        node = NodeProcess(name, process, f"http://127.0.0.1:{port}", log, log_start)
        self.nodes[name] = node
        if wait:
            self.wait_ready(node)
        return node

    def node_port(self, name: str) -> int:
        """Pick (once) and write the HTTP port of `name` into its config, so `node register` announces it."""
        home = self.root / "homes" / name
        config = home / "config.toml"
        if not config.exists():
            home.mkdir(parents=True, exist_ok=True)
            port = free_port()
            config.write_text(f"[node]\nport = {port}\n")
        return int(config.read_text().split("=")[1])

    def wait_ready(self, node: NodeProcess, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if node.process.poll() is not None:
                raise RuntimeError(f"node {node.name} exited with {node.process.returncode}:\n{node.log.read_text()[-3000:]}")
            if b"node ready" in node.log.read_bytes()[node.log_start :]:
                return
            time.sleep(0.2)
        raise RuntimeError(f"node {node.name} was not ready within {timeout:.0f} s:\n{node.log.read_text()[-3000:]}")

    def stop_node(self, name: str, sig: int = signal.SIGTERM, timeout: float = 60.0) -> None:
        node = self.nodes.pop(name)
        if node.process.poll() is None:
            node.process.send_signal(sig)
            try:
                node.process.wait(timeout)
            except subprocess.TimeoutExpired:
                node.process.kill()
                node.process.wait()

    def stop(self) -> None:
        """Stop every process this market started."""
        for name in list(self.nodes):
            self.stop_node(name)
        if self.anvil is not None and self.anvil.poll() is None:
            self.anvil.terminate()
            self.anvil.wait(10)
