"""Market figures, in one run on a local anvil with real node processes:
- gas per paid request: 200 requests from 5 clients through 3 paid nodes on a fresh deployment, then every node
  settles (the first settles every client's tab for all nodes in one settleTabs; the others find them settled)
  against paying each of a request's 3 nodes with an ERC-20 transfer, measured on the same chain;
- the per-step payment path in microseconds: the client signs one tab for 3 nodes; a node's payment gate admits
  and acknowledges the step (decodes the tab, recovers the signer, stores it in SQLite WAL with synchronous=NORMAL),
  for a known client's new session and on credit, against a free node's step;
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

from shardmarket.chain.keys import load_account
from shardmarket.cli.devmarket import PASSWORD, DevMarket, NodeProcess, node_command
from shardmarket.cli.engine import default_checkpoint
from shardmarket.cli.keys import home_keys
from shardmarket.client.generation import Completion, RemoteModel
from shardmarket.client.market import connect_paid
from shardmarket.config import load_config
from shardmarket.engine.models import random_checkpoint, tiny_config
from shardmarket.engine.sampling import SamplingParams
from shardmarket.server.settlement import settle_pending
from shardmarket.server.tabs import TabStore, tab_store_path

PRICE = 1000


def _register(market: DevMarket, names_layers: list[tuple[str, str]], model: str) -> None:
    for name, layers in names_layers:
        market.register_node(name, model, layers, PRICE)
    market.start_nodes([name for name, _ in names_layers])


async def _client(market: DevMarket, name: str, checkpoint: Path, model: str) -> RemoteModel:
    if name not in market.accounts:
        market.new_account(name, tokens=10**18)
        market.cli(name, "client", "deposit", "0.1")
    with market.acting_as(name):
        account, config = load_account(PASSWORD, home_keys()), load_config()
    return await connect_paid(checkpoint, config, account, model)


async def _generate(model: RemoteModel, prompt: list[int], max_tokens: int) -> tuple[int, float]:
    completion = Completion(prompt_tokens=len(prompt))
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
    with market.acting_as("c0"):  # the baseline: paying each of the request's 3 nodes with an ERC-20 transfer
        from shardmarket.chain.contracts import Market

        payer = Market.connect(load_config().chain, load_account(PASSWORD, home_keys()))
        payee = market.accounts["g0"]
        payer.transact(payer.token.functions.transfer(payee, 1), "warming the payee's balance")
        transfer = payer.transact(payer.token.functions.transfer(payee, 1), "a plain transfer")["gasUsed"]
    market.stop()
    return {
        "settle_gas_total": gas,
        "settle_txs": txs,
        "tabs_settled": tabs,
        "gas_per_paid_request": round(gas / requests, 1),
        "transfers_gas_per_paid_request": 3 * transfer,
        "tabs_vs_transfers_gas_ratio": round(gas / requests / (3 * transfer), 4),
    }


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
        with open(log, "ab") as out:
            process = subprocess.Popen(
                node_command(checkpoint=checkpoint, layers=layers, port=port, threads=1),
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
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
    return {
        "ms_per_token_payment_on": round(ms_on, 2),
        "ms_per_token_payment_off": round(ms_off, 2),
        "speed_ratio_on_vs_off": round(statistics.median(b / a for a, b in zip(on, off, strict=True)), 3),
        "speed_ratio_rounds": rounds,
    }


def payment_path_us(root: Path, steps: int = 300) -> dict:
    """Median microseconds per step of the payment path for a 3-node route: the client signs one tab; a node admits the
    step and acknowledges it through its payment gate (the tab decoded, its signer recovered and the tab stored, on a
    thread), both for a known client's new session and on credit; against a free node's step, which has no gate."""
    from types import SimpleNamespace

    from eth_account import Account

    from shardmarket.chain import eip712
    from shardmarket.client.payer import Payer
    from shardmarket.server.payments import PaymentGate

    client = Account.create()
    nodes = [SimpleNamespace(operator=Account.create().address, price=PRICE) for _ in range(3)]
    domain = eip712.Domain(31337, "0x" + "33" * 20)
    payer = Payer(client, domain, root / "micro-ledger.sqlite")

    async def unlimited(client: str) -> tuple[int, int]:
        return 10**30, 10**30

    gate = PaymentGate(
        TabStore(root / "micro-tabs.sqlite", nodes[0].operator), nodes[0].operator, PRICE, domain, 64 * PRICE, unlimited
    )

    async def step() -> None:
        return None

    async def measure() -> dict[str, list[float]]:
        times: dict[str, list[float]] = {"sign": [], "new_session": [], "on_credit": [], "free": []}
        session = os.urandom(32)
        for index in range(steps):
            t0 = time.perf_counter()
            raw = payer.tab([(n, 1) for n in nodes], bytes(32))
            t1 = time.perf_counter()
            way = "new_session" if index % 2 == 0 else "on_credit"  # a new session's first step, then one on its credit
            if way == "new_session":
                session = os.urandom(32)
            _, credit = await gate.admit(session, 1, {"tab": raw}, step)
            await gate.acknowledge(credit, lambda: None)
            t2 = time.perf_counter()
            await step()
            t3 = time.perf_counter()
            times["sign"].append(t1 - t0)
            times[way].append(t2 - t1)
            times["free"].append(t3 - t2)
        return times

    times = asyncio.run(measure())

    def us(name: str) -> float:
        return round(statistics.median(times[name][1:]) * 1e6, 1)

    return {
        "client_sign_tab_us": us("sign"),
        "node_admit_new_session_us": us("new_session"),
        "node_admit_on_credit_us": us("on_credit"),
        "node_free_step_us": us("free"),
    }


def demo_first_token() -> dict:
    started = time.monotonic()
    out = subprocess.run(
        [sys.executable, "-m", "shardmarket", "demo", "--questions", "1", "--max-tokens", "8"],
        check=False,
        capture_output=True,
        text=True,
    )
    match = re.search(r"first token ([0-9.]+) s after the demo started", out.stdout)
    return {
        "demo_first_token_s": float(match.group(1)) if match else None,
        "demo_total_s": round(time.monotonic() - started, 1),
        "demo_exit_code": out.returncode,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--tokens", type=int, default=24)
    parser.add_argument("--skip-demo", action="store_true")
    parser.add_argument(
        "--only", choices=["payment_path", "gas_per_request", "payment_overhead", "demo"], help="run one part (default: all)"
    )
    args = parser.parse_args()
    results: dict = {}

    def wanted(part: str) -> bool:
        return args.only in (None, part)

    with tempfile.TemporaryDirectory(prefix="bench-market-") as tmp:
        if wanted("payment_path"):
            results.update(payment_path_us(Path(tmp)))
        for part, run in (
            ("gas_per_request", lambda m: gas_per_request(m, Path(tmp), args.requests, args.clients)),
            ("payment_overhead", lambda m: payment_overhead(m, args.rounds, args.tokens)),
        ):
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
