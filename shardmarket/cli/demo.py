"""`shardmarket demo`: the whole paid market on this machine, from an empty chain to reconciled balances."""

from __future__ import annotations

import argparse
import contextlib
import json
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from shardmarket.chain.units import TokenUnits

QUESTIONS = [
    "What is the capital of France? Answer in one sentence.",
    "Name three primary colors.",
    "Why is the sky blue? Answer briefly.",
]
MODEL = "SmolLM2-135M-Instruct"
# (name, layers, price per token in raw base units); the spare serves the middle range again
NODES = [
    ("node-a", "0:10", 2_000_000_000),
    ("node-b", "10:20", 3_000_000_000),
    ("node-c", "20:30", 2_000_000_000),
    ("spare", "10:20", 4_000_000_000),
]
STAKE = 100 * 10**18
BOND = 10 * 10**18  # DisputeManager's challenge bond (scripts/deploy.py)
CHEATER = "node-b"
DEPOSIT = 10**18


def register(commands) -> None:
    demo = commands.add_parser("demo", help="run the whole paid market locally: chain, 4 nodes, a paying client")
    demo.add_argument("--serve", action="store_true", help="keep the market running and print the OpenAI base URL and key")
    demo.add_argument("--questions", type=int, default=len(QUESTIONS), help="how many questions the client asks")
    demo.add_argument("--max-tokens", type=int, default=24)
    demo.add_argument("--raw", action="store_true", help="print amounts in raw base units instead of tokens")
    demo.add_argument("--workdir", type=Path, help="keep the market's files here (default: a temporary folder)")
    demo.add_argument(
        "--cheat",
        choices=["noise"],
        help="node-b adds noise to its answers; the client's spot checks catch it and the spare votes",
    )
    demo.set_defaults(run=run_demo)


def _interrupt(signum, frame) -> None:
    """SIGTERM stops `demo --serve` as Ctrl-C does, so everything it started is stopped too."""
    raise KeyboardInterrupt


def _say(text: str) -> None:
    print(f"\n== {text}", flush=True)


def _snapshot(market, names: dict[str, str]) -> dict[str, dict[str, int]]:
    """Token wallet, stake, escrow balance, reserves set aside for the other participants, redeemed-not-withdrawn
    earnings and dispute credit of every participant."""
    rows = {}
    for name, address in names.items():
        rows[name] = {
            "wallet": market.read(market.token.functions.balanceOf(address)),
            "stake": market.read(market.stake.functions.totalStakeOf(address)),
            "escrow": market.read(market.escrow.functions.balanceOf(address)),
            "reserved": sum(market.read(market.escrow.functions.reserveOf(address, other)).amount for other in names.values()),
            "earnings": market.read(market.escrow.functions.earningsOf(address)),
            "credit": market.read(market.disputes.functions.creditOf(address)),
        }
    return rows


def _gas_by_sender(w3, first_block: int) -> dict[str, int]:
    gas: dict[str, int] = {}
    for number in range(first_block, w3.eth.block_number + 1):
        for tx in w3.eth.get_block(number, full_transactions=True)["transactions"]:
            receipt = w3.eth.get_transaction_receipt(tx["hash"])
            gas[tx["from"].lower()] = gas.get(tx["from"].lower(), 0) + receipt["gasUsed"]
    return gas


def _table(before: dict, after: dict, names: dict[str, str], gas: dict[str, int], units: TokenUnits, raw: bool) -> None:
    """The balances table, in tokens (or raw base units with --raw)."""
    amount = str if raw else units.tokens
    change = (lambda v: f"{v:+d}") if raw else (lambda v: units.tokens(v, signed=True))
    print(f"amounts in {'raw base units' if raw else units.symbol}")
    print(f"{'account':10} {'address':44} {'column':9} {'before':>26} {'after':>26} {'change':>22} {'gas used':>10}")
    for name, address in names.items():
        first = True
        for column in ("wallet", "stake", "escrow", "reserved", "earnings", "credit"):
            b, a = before[name][column], after[name][column]
            if b == 0 and a == 0:
                continue
            print(
                f"{name if first else '':10} {address if first else '':44} {column:9} {amount(b):>26} {amount(a):>26} "
                f"{change(a - b):>22} {gas.get(address.lower(), 0) if first else '':>10}"
            )
            first = False


def _stream_answer(base: str, key: str, question: str, max_tokens: int) -> dict:
    """Ask one question through the OpenAI-compatible API, print the answer as it streams; returns its usage."""
    import requests

    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": question}],
        "max_tokens": max_tokens,
        "temperature": 0,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    usage: dict = {}
    with requests.post(
        f"{base}/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}, stream=True, timeout=300
    ) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if not line.startswith(b"data: ") or line == b"data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if "error" in chunk:
                raise RuntimeError(chunk["error"]["message"])
            if chunk.get("usage"):
                usage = chunk["usage"]
            for choice in chunk.get("choices", []):
                text = choice.get("delta", {}).get("content")
                if text:
                    sys.stdout.write(text)
                    sys.stdout.flush()
    print(flush=True)
    return usage


def _await_dispute(chain, cheater: str, timeout: float = 180) -> None:
    """Wait until the first dispute is resolved; print who was accused and what happened."""
    from shardmarket.chain.contracts import DisputeStatus

    outcomes = {
        DisputeStatus.NODE_SLASHED: "the node was slashed",
        DisputeStatus.CHALLENGER_LOST: "the challenger lost its bond",
        DisputeStatus.VOID: "void (tie, no votes or no full panel)",
    }
    functions = chain.disputes.functions
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if chain.read(functions.disputeCount()) > 0:
            dispute = chain.read(functions.getDispute(1))
            if dispute.status in outcomes:
                node, outcome = dispute.node, outcomes[dispute.status]
                who = "the cheater" if node.lower() == cheater.lower() else "an honest node"
                print(
                    f"dispute 1 against {node} ({who}): {outcome}; "
                    f"its stake is now {chain.read(chain.stake.functions.totalStakeOf(node))}",
                    flush=True,
                )
                return
        time.sleep(1)
    raise RuntimeError(f"no dispute was resolved within {timeout:.0f} s")


def _wait_api(base: str, key: str, process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    import requests

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the client API exited:\n{log.read_text()[-3000:]}")
        try:
            if requests.get(f"{base}/models", headers={"Authorization": f"Bearer {key}"}, timeout=2).ok:
                return
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    raise RuntimeError(f"the client API did not start within {timeout:.0f} s:\n{log.read_text()[-3000:]}")


def run_demo(args: argparse.Namespace) -> int:
    if args.workdir is None:
        with tempfile.TemporaryDirectory(prefix="shardmarket-demo-") as tmp:
            return _demo(args, Path(tmp))
    return _demo(args, args.workdir)


def _demo(args: argparse.Namespace, root: Path) -> int:
    import os

    from shardmarket.chain.contracts import Market
    from shardmarket.chain.devchain import REPO, free_port
    from shardmarket.cli.devmarket import DevMarket
    from shardmarket.cli.engine import default_checkpoint

    started = time.monotonic()
    checkpoint = default_checkpoint()
    market = DevMarket(root)
    client_api: subprocess.Popen | None = None
    try:
        _say("starting anvil and deploying the contracts with brownie (scripts/deploy.py)")
        market.start_chain()
        print(f"chain {market.rpc_url}; " + ", ".join(f"{k} {v}" for k, v in market.addresses.items()), flush=True)
        first_block = 1
        _say(f"packing {checkpoint.name} into IPFS shards and publishing its manifest on the ModelRegistry")
        market.new_account("publisher")
        market.cli("publisher", "model", "publish", "--checkpoint", str(checkpoint), "--name", MODEL)
        _say("4 operators create keys, stake and register (3 layer ranges and a spare)")
        for name, layers, price in NODES:
            market.register_node(name, MODEL, layers, price, STAKE)
        _say("the client creates keys and deposits into the escrow")
        market.new_account("client", tokens=2 * DEPOSIT + BOND)
        market.cli("client", "client", "deposit", f"{DEPOSIT}raw")
        names = {
            "client": market.accounts["client"],
            **{n: market.accounts[n] for n, _, _ in NODES},
            "treasury": market.addresses["Treasury"],
        }
        with market.acting_as("client"):
            from shardmarket.config import load_config

            chain = Market.connect(load_config().chain)
        units = chain.units()
        show = str if args.raw else units.format
        before = _snapshot(chain, names)
        _say("starting the 4 node daemons (each fetches its shards by manifest CID)")
        for name, _, _ in NODES:
            cheating = args.cheat == "noise" and name == CHEATER
            market.start_node(name, *(["--cheat-noise", "0.1"] if cheating else []), wait=False)
            if cheating:
                print(f"{name} will add noise to every answer it gives", flush=True)
        for name in market.nodes:
            market.wait_ready(market.nodes[name])
            print(f"{name} ready at {market.nodes[name].url}", flush=True)
        port, key = free_port(), secrets.token_urlsafe(16)
        base = f"http://127.0.0.1:{port}/v1"
        log = root / "client-api.log"
        env = {
            **os.environ,
            **market.env("client"),
            "SHARDMARKET_CLIENT_API_KEY": key,
            "OMP_NUM_THREADS": "1",
            "SHARDMARKET_CLIENT_SPOT_CHECK_RATE": "1.0" if args.cheat else "0",
        }
        with open(log, "ab") as out:
            client_api = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "shardmarket",
                    "client",
                    "serve",
                    "--checkpoint",
                    str(checkpoint),
                    "--model-id",
                    MODEL,
                    "--port",
                    str(port),
                ],
                cwd=REPO,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        _wait_api(base, key, client_api, log)
        if args.serve:
            _say(f"market running: OpenAI base URL {base}  API key {key}  (Ctrl-C stops everything)")
            signal.signal(signal.SIGTERM, _interrupt)
            with contextlib.suppress(KeyboardInterrupt):
                client_api.wait()
            return 0
        _say(f"the client asks {args.questions} question(s) through the OpenAI-compatible API at {base}")
        costs = []
        for question in (QUESTIONS * args.questions)[: args.questions]:
            print(f"\n> {question}", flush=True)
            usage = _stream_answer(base, key, question, args.max_tokens)
            costs.append(usage.get("cost", 0))
            if len(costs) == 1:
                print(f"(first token {time.monotonic() - started:.1f} s after the demo started)", flush=True)
            print(
                f"[usage: {usage.get('prompt_tokens')} prompt + {usage.get('completion_tokens')} completion tokens, "
                f"cost {show(usage.get('cost', 0))}]",
                flush=True,
            )
        if args.cheat:
            _say("the client's spot checks re-run every hop on another node and locally; waiting for the dispute")
            _await_dispute(chain, names[CHEATER])
        _say(
            "the first node settles every client tab owing it in one transaction (a tab pays all its nodes); "
            "each node withdraws its earnings"
        )
        for name, _, _ in NODES:
            market.cli(name, "node", "redeem")
        after = _snapshot(chain, names)
        gas = _gas_by_sender(chain.w3, first_block)
        _say("balances before and after the questions, gas used by each account during the whole demo")
        _table(before, after, names, gas, units, args.raw)
        paid = sum(before["client"][c] - after["client"][c] for c in ("escrow", "reserved"))
        earned = sum(after[n]["wallet"] - before[n]["wallet"] for n, _, _ in NODES)
        print(
            f"\nclient paid {show(paid)}; nodes earned {show(earned)}; the API reported costs summing to {show(sum(costs))}",
            flush=True,
        )
        if args.cheat:  # spot checks paid the checking nodes too
            print(f"of which {show(paid - sum(costs))} paid for spot checks", flush=True)
        if paid != earned or (not args.cheat and paid != sum(costs)):
            print("error: the balances do not reconcile", file=sys.stderr)
            return 1
        print(f"reconciled to the last raw base unit. demo took {time.monotonic() - started:.0f} s", flush=True)
        return 0
    finally:
        if client_api is not None and client_api.poll() is None:
            client_api.terminate()
            client_api.wait(30)
        market.stop()
