"""Market figures, in one run on a local anvil with real node processes:
- gas per paid request: 200 requests from 5 clients through 3 paid nodes on a fresh deployment, then every node
  settles (the first settles every client's tab for all nodes in one settleTabs; the others find them settled)
  (goal <= 1,000 gas; Livepeer spends 250,000+ per redeemed ticket);
- the per-step payment path in microseconds: the client signs one tab for 3 nodes, a node decodes it, recovers
  the signer and stores it (SQLite WAL, synchronous=NORMAL), against the per-(client, node) receipts it replaced
  (3 receipts signed per step, one receipt checked per node, stored with synchronous=FULL);
- ms/token of the default model through 3 nodes with payment on (a tab per step, checked and stored by every node)
  vs off (free nodes), in interleaved rounds; the ratio is the median of each round's off/on, so that the machine's
  drift between rounds cancels (goal: off/on >= 0.97);
- seconds from starting `shardmarket demo` to its first streamed token.
The JSON figures are on the last line."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shardmarket.chain.keys import load_account  # noqa: E402
from shardmarket.client.generation import Completion, RemoteModel  # noqa: E402
from shardmarket.client.market import connect_paid  # noqa: E402
from shardmarket.config import load_config  # noqa: E402
from shardmarket.cli.devmarket import PASSWORD, DevMarket, NodeProcess  # noqa: E402
from shardmarket.cli.engine import default_checkpoint  # noqa: E402
from shardmarket.engine.models import random_checkpoint, tiny_config  # noqa: E402
from shardmarket.engine.sampling import SamplingParams  # noqa: E402
from shardmarket.server.settlement import settle_pending  # noqa: E402
from shardmarket.server.tabs import TabStore, tab_store_path  # noqa: E402
from shardmarket.cli.keys import home_keys  # noqa: E402

PRICE = 1000


def _register(market: DevMarket, names_layers: list[tuple[str, str]], model: str) -> None:
    for name, layers in names_layers:
        market.new_account(name, tokens=100 * 10**18)
        market.node_port(name)
        market.cli(name, "node", "register", "--model", model, "--layers", layers, "--price", str(PRICE), "--stake", "100e18")
    for name, _ in names_layers:
        market.start_node(name, wait=False)
    for name, _ in names_layers:
        market.wait_ready(market.nodes[name])


async def _client(market: DevMarket, name: str, checkpoint: Path, model: str) -> RemoteModel:
    if name not in market.accounts:
        market.new_account(name, tokens=10**18)
        market.cli(name, "client", "deposit", str(10**17))
    with market.acting_as(name):
        account, config = load_account(PASSWORD, home_keys()), load_config()
    return await connect_paid(checkpoint, config, account, model)


async def _generate(model: RemoteModel, prompt: list[int], max_tokens: int) -> tuple[int, float]:
    completion = Completion(prompt_tokens=len(prompt))
    started = time.perf_counter()
    first = None
    count = 0
    async for _ in model.stream(prompt, SamplingParams(max_tokens=max_tokens), completion):
        count += 1
        if first is None:
            first = time.perf_counter()
    return count, (time.perf_counter() - first) * 1000 / max(count - 1, 1)


def gas_per_request(market: DevMarket, root: Path, requests: int, clients: int) -> dict:
    checkpoint = random_checkpoint(tiny_config(), root / "tiny")
    market.new_account("publisher")
    market.cli("publisher", "model", "publish", "--checkpoint", str(checkpoint), "--name", "tiny")
    nodes = [("g0", "0:2"), ("g1", "2:4"), ("g2", "4:5")]
    _register(market, nodes, "tiny")

    async def workload() -> None:
        models = [await _client(market, f"c{i}", checkpoint, "tiny") for i in range(clients)]
        for i in range(requests):
            await _generate(models[i % clients], [1, 2 + i % 7, 3, 4], 2)

    asyncio.run(workload())
    gas, txs, tabs = 0, 0, 0
    for name, _ in nodes:
        with market.acting_as(name):
            from shardmarket.chain.contracts import Market

            chain = Market.connect(load_config().chain, load_account(PASSWORD, home_keys()))
            store = TabStore(tab_store_path(load_config().node.data_dir), chain.address)
        for settlement in settle_pending(chain, store):
            gas += settlement.gas
            txs += 1
            tabs += settlement.tabs
    market.stop()
    return {"settle_gas_total": gas, "settle_txs": txs, "tabs_settled": tabs, "gas_per_paid_request": round(gas / requests, 1),
            "old_receipts_gas_per_paid_request": 3632}


def payment_overhead(market: DevMarket, rounds: int, tokens: int) -> dict:
    checkpoint = default_checkpoint()
    market.new_account("publisher")
    market.cli("publisher", "model", "publish", "--checkpoint", str(checkpoint), "--name", checkpoint.name)
    ranges = ["0:10", "10:20", "20:30"]
    _register(market, [(f"p{i}", r) for i, r in enumerate(ranges)], checkpoint.name)
    free = []
    for i, layers in enumerate(ranges):
        name = f"f{i}"
        port = market.node_port(name)
        log = market.root / f"{name}.log"
        env = {**os.environ, **market.env(name), "OMP_NUM_THREADS": "1"}
        process = subprocess.Popen(
            [sys.executable, "-m", "shardmarket", "node", "run", "--checkpoint", str(checkpoint), "--layers", layers, "--port", str(port),
             "--tcp-port", str(port + 1), "--threads", "1"], env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
        )
        market.nodes[name] = NodeProcess(name, process, f"http://127.0.0.1:{port}", log)
        free.append(market.nodes[name].url)
    for name in [f"f{i}" for i in range(3)]:
        market.wait_ready(market.nodes[name])

    async def measure() -> tuple[list[float], list[float]]:
        from shardmarket.chain.commitment import commitment_domain

        paid = await _client(market, "bench-client", checkpoint, checkpoint.name)
        with market.acting_as("bench-client"):
            config = load_config()
            domain = commitment_domain(config.chain.chain_id, config.chain.deployments_dir)
        unpaid = await RemoteModel.connect(checkpoint, free, domain, model_id=checkpoint.name)
        prompt = paid.chat_ids([{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}])
        on, off = [], []
        try:
            await _generate(paid, prompt, 4)
            await _generate(unpaid, prompt, 4)
            for _ in range(rounds):
                on.append((await _generate(paid, prompt, tokens))[1])
                off.append((await _generate(unpaid, prompt, tokens))[1])
        finally:
            await asyncio.gather(paid.aclose(), unpaid.aclose())
        return on, off

    on, off = asyncio.run(measure())
    market.stop()
    ms_on, ms_off = statistics.median(on), statistics.median(off)
    return {"ms_per_token_payment_on": round(ms_on, 2), "ms_per_token_payment_off": round(ms_off, 2),
            "speed_ratio_on_vs_off": round(statistics.median(b / a for a, b in zip(on, off)), 3),
            "speed_ratio_rounds": rounds}


def payment_path_us(root: Path, steps: int = 300) -> dict:
    """Median microseconds per step of each payment stage for a 3-node route: the client signs one tab (vs 3
    receipts), a node decodes and recovers it (vs one receipt), a node stores it with synchronous=NORMAL (vs FULL)."""
    import sqlite3
    from types import SimpleNamespace

    from eth_abi import encode
    from eth_account import Account
    from eth_utils import keccak

    from shardmarket.chain import eip712
    from shardmarket.client.payer import Payer
    from shardmarket.server.payments import PaymentGate

    client = Account.create()
    nodes = [SimpleNamespace(operator=Account.create().address, price=PRICE) for _ in range(3)]
    domain = eip712.Domain(31337, "0x" + "33" * 20)
    payer = Payer(client, domain, root / "micro-ledger.sqlite")
    store = TabStore(root / "micro-tabs.sqlite", nodes[0].operator)
    gate = PaymentGate(store, nodes[0].operator, PRICE, domain, 0, None)
    receipt_typehash = keccak(text="Receipt(address client,address node,uint256 cumulativeAmount,bytes32 usageHash,uint256 nonce)")
    full = sqlite3.connect(root / "micro-receipts-full.sqlite", isolation_level=None)
    full.execute("PRAGMA journal_mode=WAL")
    full.execute("PRAGMA synchronous=FULL")
    full.execute("CREATE TABLE receipts (client TEXT PRIMARY KEY, receipt BLOB)")

    def receipt_digest(node: str, amount: int, nonce: int) -> bytes:  # the replaced per-(client, node) receipt
        fields = encode(["bytes32", "address", "address", "uint256", "bytes32", "uint256"],
                        [receipt_typehash, client.address, node, amount, bytes(32), nonce])
        return keccak(b"\x19\x01" + eip712.domain_separator(domain) + keccak(fields))

    stages: dict[str, list[float]] = {k: [] for k in ("sign", "check", "store", "old_sign", "old_check", "old_store")}
    key = payer._key
    for step in range(steps):
        t0 = time.perf_counter()
        raw = payer.tab([(n, 1) for n in nodes], bytes(32))
        t1 = time.perf_counter()
        tab, signature = gate._parse(raw)
        t2 = time.perf_counter()
        store.record(tab, signature, PRICE)
        t3 = time.perf_counter()
        signatures = [eip712._sign(key, receipt_digest(n.operator, PRICE * (step + 1), step + 1)) for n in nodes]
        t4 = time.perf_counter()
        eip712._recover(receipt_digest(nodes[0].operator, PRICE * (step + 1), step + 1), signatures[0])
        t5 = time.perf_counter()
        full.execute("INSERT OR REPLACE INTO receipts VALUES (?, ?)", (client.address, signatures[0]))
        t6 = time.perf_counter()
        for name, value in zip(stages, (t1 - t0, t2 - t1, t3 - t2, t4 - t3, t5 - t4, t6 - t5)):
            stages[name].append(value)

    def us(name: str) -> int:
        return round(statistics.median(stages[name]) * 1e6)

    return {"client_sign_tab_us": us("sign"), "client_sign_3_receipts_us": us("old_sign"),
            "node_check_tab_us": us("check"), "node_check_receipt_us": us("old_check"),
            "node_store_tab_us": us("store"), "node_store_receipt_fsync_us": us("old_store")}


def demo_first_token() -> dict:
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "shardmarket", "demo", "--questions", "1", "--max-tokens", "8"], capture_output=True, text=True)
    match = re.search(r"first token ([0-9.]+) s after the demo started", out.stdout)
    return {"demo_first_token_s": float(match.group(1)) if match else None, "demo_total_s": round(time.monotonic() - started, 1),
            "demo_exit_code": out.returncode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument("--only", choices=["payment_path", "gas_per_request", "payment_overhead", "demo"],
                        help="run one part (default: all)")
    args = parser.parse_args()
    results: dict = {}
    wanted = lambda part: args.only in (None, part)  # noqa: E731
    with tempfile.TemporaryDirectory(prefix="bench-market-") as tmp:
        if wanted("payment_path"):
            results.update(payment_path_us(Path(tmp)))
        for part, run in (("gas_per_request", lambda m: gas_per_request(m, Path(tmp), args.requests, args.clients)),
                          ("payment_overhead", lambda m: payment_overhead(m, args.rounds, args.tokens))):
            if not wanted(part):
                continue
            market = DevMarket(Path(tmp) / part)
            try:
                market.start_chain()
                results.update(run(market))
                print(json.dumps(results), flush=True)
            finally:
                market.stop()
    if wanted("demo") and not args.skip_demo:
        results.update(demo_first_token())
    results.update({"requests": args.requests, "clients": args.clients, "nodes": 3})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
