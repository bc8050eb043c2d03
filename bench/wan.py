"""WAN benchmark: a 3-node pipeline with the client and every node in a network namespace of its own, each link
delayed by bench/wanlab.py's user-space switch, at several round-trip times. For each RTT it measures client relaying
(client -> A -> client -> B -> client -> C -> client: 3 RTT a token) and node-to-node push (client -> A -> B -> C ->
client: 2 RTT), encryption and signed commitments on: decode ms/token, time to first token of a short chat prompt and of
a long prompt, and whether the tokens equal local greedy. The floors are computed in the same run: the whole model's
local decode ms/token (its compute) plus 3 RTT (relay floor) or 2 RTT (push floor) a token; for the first token, the
local prefill time plus 2 RTT. The switch's delays are checked first with a ping-pong probe while torch keeps every core
busy. With --speculation it measures instead, on the push route, greedy tokens/s without and with prompt-lookup drafts
on bench/speculative.py's workloads (REWRITE: drafts help; STORY: they do not) and whether the text is the same; with
--open, the first token of the chat prompt on kept connections and on new ones (the client's kept connections closed, as
after 30 s idle), the first step sent right after the OPENs or once every node answered. Needs root; prints JSON on its
last line.

Usage: .venv/bin/python bench/wan.py [--rtts 10,50,100] [--tokens 24] [--runs 3] [--long-prompt 1000]
                                     [--models smollm2,random1b]
       .venv/bin/python bench/wan.py --speculation --rtts 50 --tokens 48 [--max-draft 8]
       .venv/bin/python bench/wan.py --open --rtts 50 --runs 9 [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from speculative import REWRITE, STORY, compare
from wanlab import WanLab, measure_delays, missing

from shardmarket.chain.devchain import anvil_binary, deploy
from shardmarket.chain.eip712 import Domain
from shardmarket.chain.keys import load_account
from shardmarket.cli.devmarket import PASSWORD, DevMarket
from shardmarket.cli.engine import default_checkpoint
from shardmarket.cli.keys import home_keys
from shardmarket.client.generation import Completion, RemoteModel
from shardmarket.client.market import connect_paid
from shardmarket.client.session import InferenceSession
from shardmarket.config import load_config
from shardmarket.engine.head import Head
from shardmarket.engine.models import random_checkpoint, tiny_config
from shardmarket.engine.sampling import SamplingParams, generate
from shardmarket.engine.stage import Stage
from shardmarket.net.wire import DTYPES

ROOT = Path(__file__).resolve().parents[1]
DOMAIN = Domain(31337, "0x" + "00" * 20)
PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
NODE_PORT = 7300
PRICE = 1000  # base units of the token per token, each node
Connect = Callable[[bool], Awaitable[RemoteModel]]  # push -> a connected client model
CONFIG_1B = tiny_config(
    "llama",
    vocab_size=32000,
    hidden_size=2048,
    intermediate_size=5632,
    num_hidden_layers=22,
    num_attention_heads=32,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    initializer_range=0.02,
)


def thirds(layers: int) -> list[tuple[int, int]]:
    a, b = layers // 3, 2 * layers // 3
    return [(0, a), (a, b), (b, layers)]


def timed(tokens) -> tuple[list[int], float, float]:
    """Tokens, time to the first (s) and decode s/token (first to last) of a token stream."""
    started, arrivals, out = time.perf_counter(), [], []
    for token in tokens:
        arrivals.append(time.perf_counter() - started)
        out.append(token)
    return out, arrivals[0], (arrivals[-1] - arrivals[0]) / (len(out) - 1)


class Local:
    """The whole model in this process (the baseline): one greedy request, its first token and decode timed."""

    def __init__(self, checkpoint: Path, dtype: str = "float32") -> None:
        self.head = Head.load(checkpoint)
        self.stage = Stage.load(checkpoint, 0, self.head.num_layers, dtype=DTYPES[dtype])

    def head_s(self, repeats: int = 20) -> float:
        """The client's own work per decode token (embedding, LM head, picking the token), median seconds."""
        times = []
        hidden = torch.randn(1, 1, self.head.config.hidden_size)
        with torch.inference_mode():
            for _ in range(repeats):
                started = time.perf_counter()
                self.head.embed(torch.tensor([[1]]))
                int(self.head.logits(hidden)[0, -1].argmax())
                times.append(time.perf_counter() - started)
        return statistics.median(times)

    def run(self, ids: list[int], tokens: int) -> tuple[list[int], float, float]:
        session = os.urandom(8).hex()
        self.stage.open_session(session, len(ids) + tokens)
        params = SamplingParams(max_tokens=tokens, ignore_eos=True)

        def layers(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:  # in the stage's dtype, as nodes get it
            return self.stage.step(session, hidden.to(self.stage.dtype), positions).float()

        try:
            with torch.inference_mode():
                return timed(generate(self.head, layers, ids, params))
        finally:
            self.stage.close_session(session)


def start_nodes(lab: WanLab, checkpoint: Path, layers: int, home: Path, node_args: list[str] | None = None) -> list[str]:
    """One node per third of the layers, in namespaces a, b, c, each free to push to the others."""
    urls = {host: f"http://{lab.ip(host)}:{NODE_PORT}" for host in "abc"}
    for host, (start, end) in zip("abc", thirds(layers), strict=True):
        env = dict(
            os.environ,
            PYTHONPATH=str(ROOT),
            SHARDMARKET_HOME=str(home / host),
            SHARDMARKET_NODE_PEERS=",".join(url for other, url in urls.items() if other != host),
            OMP_WAIT_POLICY="PASSIVE",
        )
        argv = [sys.executable, "-m", "shardmarket", "node", "run", "--checkpoint", str(checkpoint), "--layers", f"{start}:{end}"]
        argv += ["--host", lab.ip(host), "--port", str(NODE_PORT), "--threads", str(torch.get_num_threads()), *(node_args or [])]
        lab.spawn_in(host, argv, f"node-{host}.log", env=env)
    for host, url in urls.items():
        deadline = time.monotonic() + 600
        while True:
            try:
                with lab.inside(host):
                    urllib.request.urlopen(f"{url}/health", timeout=2).read()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise RuntimeError(f"node {host} not ready: {(lab.dir / f'node-{host}.log').read_text()[-2000:]}") from None
                time.sleep(0.5)
    return list(urls.values())


async def interleaved(connect: Connect, local: Local, prompts: dict[str, list[int]], tokens: int, runs: int) -> dict:
    """Per prompt, `runs` rounds of local, relay and push requests (after one relay and one push request that connect and
    handshake: the cold start, not counted); returns (kind, prompt) -> tokens and the median first-token and decode s.
    The machine's load drifts, so the kinds take turns within each round."""
    models = {"relay": await connect(False), "push": await connect(True)}
    timings: dict = {}
    try:
        for name, ids in prompts.items():
            for round_ in range(runs + 1):
                for kind in ("local", "relay", "push"):
                    if kind == "local":
                        if not round_:
                            continue
                        out, first, decode = local.run(ids, tokens)
                        nodes_s = 0.0
                    else:
                        out, first, decode, nodes_s = await remote(models[kind], ids, tokens)
                    if round_:
                        timings.setdefault((kind, name), []).append((out, first, decode, nodes_s))
    finally:
        for model in models.values():
            await model.aclose()
    return {
        key: {
            "tokens": runs_[0][0],
            "same": all(r[0] == runs_[0][0] for r in runs_),
            "first_s": statistics.median(r[1] for r in runs_),
            "decode_s": statistics.median(r[2] for r in runs_),
            "nodes_s": statistics.median(r[3] for r in runs_),
        }
        for key, runs_ in timings.items()
    }


async def remote(model: RemoteModel, ids: list[int], tokens: int) -> tuple[list[int], float, float, float]:
    """Tokens, first-token s, decode s/token, and the nodes' own compute s per decode token (as they report it)."""
    started, arrivals, out, completion = time.perf_counter(), [], [], Completion(len(ids))
    async for token in model.stream(ids, SamplingParams(max_tokens=tokens, ignore_eos=True), completion):
        arrivals.append(time.perf_counter() - started)
        out.append(token)
    decode_hops = [t.compute_s for t in completion.hop_timings if t.tokens == 1]
    return out, arrivals[0], (arrivals[-1] - arrivals[0]) / (len(out) - 1), sum(decode_hops) / max(1, len(out) - 1)


@contextlib.contextmanager
def lab_route(checkpoint: Path, paid: bool, node_args: list[str] | None = None) -> Iterator[tuple[WanLab, Connect]]:
    """A lab with the client, three nodes (`node run` given `node_args` too; and, paid, a chain) and how to connect a
    client to its route; torn down after."""
    hosts = ["client", "a", "b", "c", *(["chain"] if paid else [])]
    with WanLab(hosts, {}) as lab, tempfile.TemporaryDirectory() as home:
        if paid:
            market, connect = paid_market(lab, checkpoint, Path(home), node_args or [])
        else:
            urls = start_nodes(lab, checkpoint, Head.load(checkpoint).num_layers, Path(home), node_args or [])

            async def connect(push: bool) -> RemoteModel:
                return await RemoteModel.connect(checkpoint, urls, DOMAIN, step_timeout_s=120, push=push)

        try:
            yield lab, connect
        finally:
            if paid:
                market.stop()


def set_rtt(lab: WanLab, rtt: float) -> None:
    """Every link between the client and the nodes at `rtt` ms (the chain's links have no delay: it is off the step path)."""
    timed_hosts = ["client", "a", "b", "c"]
    lab.set_delays({(x, y): rtt / 2 for i, x in enumerate(timed_hosts) for y in timed_hosts[i + 1 :]})


def bench_model(
    name: str, checkpoint: Path, rtts: list[float], tokens: int, runs: int, long_prompt: int, paid: bool = True
) -> dict:
    local = Local(checkpoint)
    head = local.head
    text = head.tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    chat = head.tokenizer.encode(text, add_special_tokens=False)
    story = head.tokenizer.encode(" ".join(["The keeper climbed the stairs and lit the lamp again."] * long_prompt))
    prompts = {"chat": chat, "long": story[:long_prompt]}
    out: dict = {f"{name}_payments": paid}
    with lab_route(checkpoint, paid) as (lab, connect):
        for rtt in rtts:
            set_rtt(lab, rtt)
            with lab.inside("client"):
                measured = asyncio.run(interleaved(connect, local, prompts, tokens, runs))
            out.update(figures(name, rtt, measured, long_prompt, local.head_s()))
    return out


def bench_speculation(name: str, checkpoint: Path, rtts: list[float], tokens: int, runs: int, max_draft: int, paid: bool) -> dict:
    """Per RTT, bench/speculative.py's `compare` on the push route: greedy tokens/s without and with prompt-lookup drafts
    on a workload where drafts help (REWRITE) and one where they do not (STORY), and whether the text is the same."""
    out: dict = {f"{name}_payments": paid, f"{name}_speculation_max_draft": max_draft}
    out.update({f"{name}_speculation_workload_{w.name}": w.about for w in (REWRITE, STORY)})

    async def measure() -> dict:
        model = await connect(True)
        try:
            # the cold start (connections, handshakes) is not counted
            await remote(model, model.chat_ids([{"role": "user", "content": STORY.prompt}]), 4)
            figures: dict = {}
            for workload in (REWRITE, STORY):
                figures.update(await compare(model, workload, max_draft=max_draft, tokens=tokens, runs=runs))
            return figures
        finally:
            await model.aclose()

    with lab_route(checkpoint, paid) as (lab, connect):
        for rtt in rtts:
            set_rtt(lab, rtt)
            with lab.inside("client"):
                figures = {f"{name}_rtt{rtt:g}_push_{k}": v for k, v in asyncio.run(measure()).items()}
            print(json.dumps(figures), file=sys.stderr, flush=True)
            out.update(figures)
    return out


def bench_open(name: str, checkpoint: Path, rtts: list[float], runs: int, paid: bool, dtype: str) -> dict:
    """Per RTT, time to first token of the chat prompt (push on) on kept connections and on new ones (the client's pool
    closed first: a connect and a handshake per hop, and TCP's slow start for the prompt's hidden states), the first step
    sent right after the OPENs (pipelined) or once every node answered its OPEN (waited), `runs` rounds taking turns;
    medians, and the median of each round's saving. Against the floor: the local prefill plus 2 RTT. The nodes and the
    local baseline compute in `dtype`, which is also what the hidden states travel in."""
    out: dict = {f"{name}_payments": paid, f"{name}_dtype": dtype}
    cases = [(connections, pipelined) for connections in ("kept", "new") for pipelined in (False, True)]

    async def measure() -> dict[tuple[str, bool], list[float]]:
        model = await connect(True)
        ids = model.chat_ids(PROMPT)
        firsts: dict[tuple[str, bool], list[float]] = {case: [] for case in cases}
        try:
            await remote(model, ids, 2)  # connects and handshakes: the connections are kept from then on
            for round_ in range(runs):
                for connections, pipelined in cases if round_ % 2 else cases[::-1]:
                    if connections == "new":
                        await model.channels.close()
                    InferenceSession.pipelined_open = pipelined
                    firsts[connections, pipelined].append((await remote(model, ids, 2))[1])
        finally:
            InferenceSession.pipelined_open = True
            await model.aclose()
        return firsts

    local = Local(checkpoint, dtype)
    tokenizer = local.head.tokenizer
    chat = tokenizer.encode(
        tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False), add_special_tokens=False
    )
    prefill_s = statistics.median(local.run(chat, 2)[1] for _ in range(runs))
    del local
    with lab_route(checkpoint, paid, ["--dtype", dtype]) as (lab, connect):
        for rtt in rtts:
            set_rtt(lab, rtt)
            with lab.inside("client"):
                firsts = asyncio.run(measure())
            key = f"{name}_rtt{rtt:g}_push"
            figures = {f"{key}_first_token_floor_ms": round((prefill_s + 2 * rtt / 1000) * 1000, 1)}
            for connections in ("kept", "new"):
                waited, pipelined = firsts[connections, False], firsts[connections, True]
                figures[f"{key}_{connections}_connections_first_token_ms_waited_open"] = round(
                    statistics.median(waited) * 1000, 1
                )
                figures[f"{key}_{connections}_connections_first_token_ms_pipelined_open"] = round(
                    statistics.median(pipelined) * 1000, 1
                )
                figures[f"{key}_{connections}_connections_pipelined_open_saves_ms"] = round(
                    statistics.median(w - p for w, p in zip(waited, pipelined, strict=True)) * 1000, 1
                )
            print(json.dumps(figures), file=sys.stderr, flush=True)
            out.update(figures)
    return out


def figures(name: str, rtt: float, measured: dict, long_prompt: int, head_s: float) -> dict:
    """The JSON figures of one model at one RTT. Besides the floors on the local run's compute, `*_over_*_floor_own`
    put each mode against the compute of its own run (what the nodes reported plus the client's head): on a machine
    other work shares, one local process and three node processes do not get the same share of the cores."""
    out: dict = {}
    compute = measured[("local", "chat")]["decode_s"]
    floors = {"relay": compute + 3 * rtt / 1000, "push": compute + 2 * rtt / 1000}
    key = f"{name}_rtt{rtt:g}"
    out[f"{key}_local_ms_per_token"] = round(compute * 1000, 2)
    out[f"{key}_client_head_ms_per_token"] = round(head_s * 1000, 2)
    out[f"{key}_local_first_token_ms_{long_prompt}"] = round(measured[("local", "long")]["first_s"] * 1000, 1)
    for mode in ("relay", "push"):
        chat_run, long_run = measured[(mode, "chat")], measured[(mode, "long")]
        out[f"{key}_{mode}_ms_per_token"] = round(chat_run["decode_s"] * 1000, 2)
        out[f"{key}_{mode}_first_token_ms"] = round(chat_run["first_s"] * 1000, 1)
        out[f"{key}_{mode}_first_token_ms_{long_prompt}"] = round(long_run["first_s"] * 1000, 1)
        reference = measured[("local", "chat")]["tokens"]
        out[f"{key}_{mode}_same_tokens"] = chat_run["same"] and chat_run["tokens"] == reference
        out[f"{key}_{mode}_over_{mode}_floor"] = round(floors[mode] / chat_run["decode_s"], 3)
        out[f"{key}_{mode}_nodes_compute_ms_per_token"] = round(chat_run["nodes_s"] * 1000, 2)
        own = chat_run["nodes_s"] + head_s + (3 if mode == "relay" else 2) * rtt / 1000
        out[f"{key}_{mode}_over_{mode}_floor_own"] = round(own / chat_run["decode_s"], 3)
    out[f"{key}_push_over_relay_floor"] = round(floors["relay"] / measured[("push", "chat")]["decode_s"], 3)
    out[f"{key}_relay_floor_ms_per_token"] = round(floors["relay"] * 1000, 2)
    out[f"{key}_push_floor_ms_per_token"] = round(floors["push"] * 1000, 2)
    ttft_floor = measured[("local", "long")]["first_s"] + 2 * rtt / 1000
    out[f"{key}_first_token_floor_ms_{long_prompt}"] = round(ttft_floor * 1000, 1)
    out[f"{key}_push_first_token_over_floor_{long_prompt}"] = round(ttft_floor / measured[("push", "long")]["first_s"], 3)
    print(json.dumps(out), file=sys.stderr, flush=True)
    return out


def paid_market(lab: WanLab, checkpoint: Path, root: Path, node_args: list[str]) -> tuple[DevMarket, Connect]:
    """A chain (anvil, every contract) in namespace `chain`, the model published, one paid node per third of the layers
    registered at its lab address and started in its namespace, and two funded clients (one relays, one pushes: each
    signs its own tabs). Returns the market and how to connect a paying client."""
    market = DevMarket(root, threads=torch.get_num_threads())
    market.chain_port, chain_ip = 8545, lab.ip("chain")
    market.rpc_url = f"http://{chain_ip}:{market.chain_port}"
    anvil = [anvil_binary(), "--host", chain_ip, "--port", str(market.chain_port), "--block-base-fee-per-gas", "0"]
    market.anvil = lab.spawn_in("chain", [*anvil, "--accounts", "10", "--chain-id", "31337"], "anvil.log")
    model, layers = checkpoint.name, Head.load(checkpoint).num_layers
    with lab.inside("client"):
        deadline = time.monotonic() + 30
        while True:
            try:
                socket.create_connection((chain_ip, market.chain_port), timeout=1).close()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        market.addresses = deploy(market.rpc_url, root / "deployments")
        market.new_account("publisher")
        market.cli("publisher", "model", "publish", "--checkpoint", str(checkpoint), "--name", model)
        for host, (start, end) in zip("abc", thirds(layers), strict=True):
            market.new_account(host, tokens=100 * 10**18)
            endpoint = f"http://{lab.ip(host)}:{NODE_PORT}"
            register = ["node", "register", "--model", model, "--layers", f"{start}:{end}", "--price", f"{PRICE}raw"]
            market.cli(host, *register, "--stake", "100e18", "--endpoint", endpoint)
        for client in ("relay-client", "push-client"):
            market.new_account(client, tokens=10**20)
            market.cli(client, "client", "deposit", f"{10**19}raw")
    for host in "abc":
        with lab.inside(host):
            where = ["--host", lab.ip(host), "--port", str(NODE_PORT)]
            market.start_node(host, "--checkpoint", str(checkpoint), *where, *node_args, wait=False)
    for host in "abc":
        market.wait_ready(market.nodes[host])

    async def connect(push: bool) -> RemoteModel:
        client = "push-client" if push else "relay-client"
        with market.acting_as(client):
            account, config = load_account(PASSWORD, home_keys()), load_config()
        return await connect_paid(checkpoint, config, account, model, step_timeout_s=120, push=push)

    return market, connect


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rtts", default="10,50,100", help="round-trip times in ms, comma-separated")
    parser.add_argument("--tokens", type=int, default=24, help="new tokens per request")
    parser.add_argument("--runs", type=int, default=3, help="timed requests per case (after one that warms connections)")
    parser.add_argument("--long-prompt", type=int, default=1000, help="tokens of the long prompt timed for its first token")
    parser.add_argument(
        "--models", default="smollm2", help="comma-separated: smollm2, random1b (a ~1B random Llama, slow on 2 cores)"
    )
    parser.add_argument("--free", action="store_true", help="free nodes, no chain (payments off)")
    parser.add_argument(
        "--speculation",
        action="store_true",
        help="instead of relay vs push: tokens/s without and with drafts on the push route (bench/speculative.py's workloads)",
    )
    parser.add_argument("--max-draft", type=int, default=8, help="drafted tokens per pass with --speculation")
    parser.add_argument(
        "--open",
        action="store_true",
        help="instead of relay vs push: first token on kept connections, the first step pipelined after the OPENs or not",
    )
    parser.add_argument(
        "--dtype",
        choices=list(DTYPES),
        default="float32",
        help="with --open: what the nodes and the local baseline compute in, and the hidden states travel in",
    )
    args = parser.parse_args()
    why = missing()
    if why:
        print(json.dumps({"skipped": why}))
        return
    if os.environ.get("OMP_WAIT_POLICY") != "PASSIVE":  # as every shardmarket process runs (see bench/network.py)
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
    rtts = [float(x) for x in args.rtts.split(",")]
    result: dict = {"threads": torch.get_num_threads(), "load_average_at_start": os.getloadavg()[0]}
    result["delay_check"] = measure_delays(rtts)
    checkpoints = {}
    for name in args.models.split(","):
        if name == "smollm2":
            checkpoints[name] = default_checkpoint()
        elif name == "random1b":
            checkpoints[name] = load_config().home / "models" / "random-1b"
            if not (checkpoints[name] / "config.json").exists():
                random_checkpoint(CONFIG_1B, checkpoints[name])
        else:
            parser.error(f"unknown model {name!r}: choose smollm2 or random1b")
    for name, checkpoint in checkpoints.items():
        if args.speculation:
            result.update(bench_speculation(name, checkpoint, rtts, args.tokens, args.runs, args.max_draft, not args.free))
        elif args.open:
            result.update(bench_open(name, checkpoint, rtts, args.runs, not args.free, args.dtype))
        else:
            result.update(bench_model(name, checkpoint, rtts, args.tokens, args.runs, args.long_prompt, not args.free))
    result["load_average_at_end"] = os.getloadavg()[0]  # other work on the machine skews every ratio
    print(json.dumps(result))


if __name__ == "__main__":
    main()
