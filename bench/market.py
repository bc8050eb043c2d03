"""Market figures, in one run on a local anvil with real node processes:
- gas per paid request: 200 requests from 5 clients through 3 paid nodes, then one batched redemption per node
  (goal <= 1,000 gas; Livepeer spends 250,000+ per redeemed ticket);
- ms/token of the default model through 3 nodes with payment on (receipt per hop per token, checked and stored
  durably by the node) vs off (free nodes), interleaved rounds (goal: off/on >= 0.97);
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

from node.chain.keys import load_account  # noqa: E402
from node.client.generation import Completion, RemoteModel  # noqa: E402
from node.client.market import connect_paid  # noqa: E402
from node.config import load_config  # noqa: E402
from node.devmarket import PASSWORD, DevMarket, NodeProcess  # noqa: E402
from node.engine.models import default_model, random_checkpoint, tiny_config  # noqa: E402
from node.engine.sampling import SamplingParams  # noqa: E402
from node.server.receipts import ReceiptStore  # noqa: E402
from node.server.settlement import redeem_pending  # noqa: E402

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
        account, config = load_account(PASSWORD), load_config()
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
    gas = 0
    receipts = 0
    for name, _ in nodes:
        with market.acting_as(name):
            from node.chain.contracts import Market

            chain = Market.connect(load_config(), load_account(PASSWORD))
            store = ReceiptStore(load_config().node.data_dir / "receipts.sqlite", chain.address)
        for redemption in redeem_pending(chain, store):
            gas += redemption.gas
            receipts += redemption.receipts
    market.stop()
    return {"redeem_gas_total": gas, "receipts_redeemed": receipts, "redeem_gas_per_receipt": round(gas / max(receipts, 1)),
            "gas_per_paid_request": round(gas / requests, 1)}


def payment_overhead(market: DevMarket, rounds: int, tokens: int) -> dict:
    checkpoint = default_model()
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
            [sys.executable, "-m", "node", "node", "run", "--checkpoint", str(checkpoint), "--layers", layers, "--port", str(port),
             "--tcp-port", str(port + 1), "--threads", "1"], env=env, stdout=open(log, "ab"), stderr=subprocess.STDOUT,
        )
        market.nodes[name] = NodeProcess(name, process, f"http://127.0.0.1:{port}", log)
        free.append(market.nodes[name].url)
    for name in [f"f{i}" for i in range(3)]:
        market.wait_ready(market.nodes[name])

    async def measure() -> tuple[list[float], list[float]]:
        from node.net.commitment import commitment_domain

        paid = await _client(market, "bench-client", checkpoint, checkpoint.name)
        with market.acting_as("bench-client"):
            domain = commitment_domain(load_config())
        unpaid = await RemoteModel.connect(checkpoint, free, domain, model_id=checkpoint.name)
        prompt = paid.chat_ids([{"role": "user", "content": "Tell me a long story about a lighthouse keeper."}])
        on, off = [], []
        await _generate(paid, prompt, 4)
        await _generate(unpaid, prompt, 4)
        for _ in range(rounds):
            on.append((await _generate(paid, prompt, tokens))[1])
            off.append((await _generate(unpaid, prompt, tokens))[1])
        return on, off

    on, off = asyncio.run(measure())
    market.stop()
    ms_on, ms_off = statistics.median(on), statistics.median(off)
    return {"ms_per_token_payment_on": round(ms_on, 2), "ms_per_token_payment_off": round(ms_off, 2),
            "speed_ratio_on_vs_off": round(ms_off / ms_on, 3)}


def payment_path_us(root: Path, steps: int = 300) -> dict:
    """Median microseconds per hop per token of each payment stage: client signs (and records) the receipt,
    node decodes and recovers it, node stores it durably (SQLite WAL, synchronous=FULL)."""
    from types import SimpleNamespace

    from eth_account import Account

    from node.chain.eip712 import Domain
    from node.client.payer import Payer
    from node.server.payments import PaymentGate

    client, node = Account.create(), Account.create()
    domain = Domain(31337, "0x" + "33" * 20)
    payer = Payer(client, domain, root / "micro-ledger.sqlite")
    store = ReceiptStore(root / "micro-receipts.sqlite", node.address)
    gate = PaymentGate(store, node.address, PRICE, domain, 0, None)
    sign, verify, durable = [], [], []
    for step in range(steps):
        t0 = time.perf_counter()
        raw = payer.receipt(SimpleNamespace(operator=node.address, price=PRICE), bytes(32), step, 1)
        t1 = time.perf_counter()
        receipt, signature = gate._parse(raw)
        t2 = time.perf_counter()
        store.record(receipt, signature, PRICE)
        t3 = time.perf_counter()
        sign.append(t1 - t0)
        verify.append(t2 - t1)
        durable.append(t3 - t2)

    def us(values: list[float]) -> int:
        return round(statistics.median(values) * 1e6)

    return {"client_sign_us": us(sign), "node_verify_us": us(verify), "node_store_fsync_us": us(durable)}


def demo_first_token() -> dict:
    started = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "node", "demo", "--questions", "1", "--max-tokens", "8"], capture_output=True, text=True)
    match = re.search(r"first token ([0-9.]+) s after the demo started", out.stdout)
    return {"demo_first_token_s": float(match.group(1)) if match else None, "demo_total_s": round(time.monotonic() - started, 1),
            "demo_exit_code": out.returncode}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--skip-demo", action="store_true")
    args = parser.parse_args()
    results: dict = {}
    with tempfile.TemporaryDirectory(prefix="bench-market-") as tmp:
        results.update(payment_path_us(Path(tmp)))
        market = DevMarket(Path(tmp) / "gas")
        try:
            market.start_chain()
            results.update(gas_per_request(market, Path(tmp), args.requests, args.clients))
            print(json.dumps(results), flush=True)
        finally:
            market.stop()
        market = DevMarket(Path(tmp) / "speed")
        try:
            market.start_chain()
            results.update(payment_overhead(market, args.rounds, args.tokens))
            print(json.dumps(results), flush=True)
        finally:
            market.stop()
    if not args.skip_demo:
        results.update(demo_first_token())
    results.update({"requests": args.requests, "clients": args.clients, "nodes": 3})
    print(json.dumps(results))


if __name__ == "__main__":
    main()
