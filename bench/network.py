"""Network benchmark: ms/token of a model run locally vs over a 3-node loopback pipeline (encryption and
signed commitments on, TCP and WebSocket transports, in interleaved rounds whose order turns each round: the speed
ratio is the median of each round's local/pipeline, for the faster transport), the per-hop overhead of framing +
encryption + signing in microseconds, and the time from `node run` to ready. Prints JSON on its last line.

Each run is timed as LLM serving benchmarks do: the time to the first token (prompt prefill, and for the pipeline
opening a session on each node) apart from the decode speed, ms per token from the first token to the last (the
tokens/s users compare, e.g. exo's 24 vs 40 tok/s). `*_speed` keys are decode speeds; `*_whole_request_speed` keys
divide the whole request (first token and session close included) by its tokens. Pipeline figures are those of
the transport with the faster decode.

Each round also runs the machine's floor for any 3-process pipeline: the same three layer ranges in three
bare processes that pass raw hidden-state bytes over pipes (no sockets, framing, encryption, commitments or event
loop). `bare_over_local_speed` is what splitting the model across processes costs on this machine by itself, and
`pipeline_over_bare_speed` is what shardmarket's network layer adds on top.

OpenMP: the client (this process), the nodes and the bare stages run as every shardmarket process does, with
OMP_WAIT_POLICY=PASSIVE (see shardmarket/engine/openmp.py); the local baseline runs as a user runs the model with plain
torch, under libgomp's default policy (threads spin between parallel regions), unless `--local-omp passive`. The
default is the faster local baseline here (PASSIVE decoded the 850M model at 1.01x and SmolLM2 at 0.97x of it).

Usage: .venv/bin/python bench/network.py [--tokens 32] [--runs 9] [--no-850m] [--local-omp {default,passive}]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey
from eth_account import Account
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shardmarket.chain.commitment import check_commitment, commit
from shardmarket.chain.eip712 import EMPTY_HISTORY, Domain, StepContext, chain_history, signing_key, tensor_hash
from shardmarket.cli.devmarket import node_command
from shardmarket.cli.engine import default_checkpoint
from shardmarket.client.generation import Completion, RemoteModel
from shardmarket.config import load_config
from shardmarket.engine.head import Head
from shardmarket.engine.models import random_checkpoint, tiny_config
from shardmarket.engine.sampling import SamplingParams, generate
from shardmarket.engine.stage import Stage
from shardmarket.engine.tensors import tensor_bytes
from shardmarket.net import wire
from shardmarket.net.crypto import ClientHandshake, node_handshake
from shardmarket.net.wire import Message

ROOT = Path(__file__).resolve().parents[1]
DOMAIN = Domain(31337, "0x" + "00" * 20)
PROMPT = [{"role": "user", "content": "Write a long story about a lighthouse keeper."}]
CONFIG_850M = tiny_config(
    "llama",
    vocab_size=32000,
    hidden_size=1536,
    intermediate_size=4096,
    num_hidden_layers=30,
    num_attention_heads=16,
    num_key_value_heads=4,
    max_position_embeddings=2048,
    initializer_range=0.02,
)


def per_hop_overhead_us(hidden_size: int, repeats: int = 500) -> dict:
    """Microseconds per hop per decode token spent on framing, encryption, signing and checking the commitment."""
    node_key, operator = X25519PrivateKey.generate(), Account.create()
    handshake = ClientHandshake(node_key.public_key().public_bytes_raw())
    node_eph, node_cipher = node_handshake(node_key, handshake.hello_key)
    client_cipher = handshake.finish(node_eph)
    request_id, nonce, model_id = os.urandom(32), os.urandom(32), os.urandom(32)
    node_history = client_history = EMPTY_HISTORY
    signer = signing_key(operator.key)
    spent = {"framing": [], "encryption": [], "signing": [], "verifying": []}
    for step in range(repeats):
        hidden = torch.randn(1, 1, hidden_size)
        t0 = time.perf_counter()
        payload = tensor_bytes(hidden)
        frame = wire.encode(Message(wire.STEP, request_id, step, {"position": step}, hidden, payload))
        t1 = time.perf_counter()
        sealed = client_cipher.seal(frame)
        opened = node_cipher.open(sealed)
        t2 = time.perf_counter()
        received = wire.decode(opened)
        output = received.tensor  # the layers would run here
        out_payload = tensor_bytes(output)
        t3 = time.perf_counter()
        input_hash = tensor_hash(received.payload)
        context = StepContext(model_id, 0, 4, request_id, nonce, step, step, node_history, input_hash)
        signed = commit(signer, context, out_payload, DOMAIN)
        node_history = chain_history(node_history, input_hash)
        t4 = time.perf_counter()
        reply = wire.encode(Message(wire.RESULT, request_id, step, {"compute_us": 0}, output, out_payload))
        signed_frame = wire.encode(Message(wire.COMMIT, request_id, step, signed.to_fields()))
        t5 = time.perf_counter()
        back, back_signed = client_cipher.open(node_cipher.seal(reply)), client_cipher.open(node_cipher.seal(signed_frame))
        t6 = time.perf_counter()
        result, result_signed = wire.decode(back), wire.decode(back_signed)
        t7 = time.perf_counter()
        input_hash = tensor_hash(payload)
        context = StepContext(model_id, 0, 4, request_id, nonce, step, step, client_history, input_hash)
        check_commitment(result_signed.fields, context, result.payload, operator.address, DOMAIN)
        client_history = chain_history(client_history, input_hash)
        t8 = time.perf_counter()
        spent["framing"].append((t1 - t0) + (t3 - t2) + (t5 - t4) + (t7 - t6))
        spent["encryption"].append((t2 - t1) + (t6 - t5))
        spent["signing"].append(t4 - t3)
        spent["verifying"].append(t8 - t7)
    medians = {k: statistics.median(v) * 1e6 for k, v in spent.items()}
    medians["total"] = sum(medians.values())
    return {k: round(v, 1) for k, v in medians.items()}


@dataclass
class Run:
    """One timed generation: when each token arrived and when the request ended, in seconds from its start."""

    tokens: list[int]
    arrivals_s: list[float]
    ended_s: float

    @classmethod
    def timed(cls, tokens: Iterable[int]) -> Run:
        started = time.perf_counter()
        out, arrivals = [], []
        for token in tokens:
            arrivals.append(time.perf_counter() - started)
            out.append(token)
        return cls(out, arrivals, time.perf_counter() - started)

    @property
    def first_token_ms(self) -> float:
        return self.arrivals_s[0] * 1000

    @property
    def decode_ms_per_token(self) -> float:
        """From the first token to the last, per token."""
        return (self.arrivals_s[-1] - self.arrivals_s[0]) * 1000 / (len(self.tokens) - 1)

    @property
    def whole_ms_per_token(self) -> float:
        return self.ended_s * 1000 / len(self.tokens)


def local_generate(stage: Stage, head: Head, ids: list[int], params: SamplingParams) -> Run:
    """The whole model in this process (the baseline); its session is opened before the clock starts, as a local
    KV cache costs nothing to open."""
    session = os.urandom(8).hex()
    stage.open_session(session, len(ids) + params.max_tokens)
    run = Run.timed(generate(head, lambda h, p: stage.step(session, h, p), ids, params))
    stage.close_session(session)
    return run


def start_nodes(
    checkpoint: Path, ranges: list[str], home: Path, threads: int
) -> tuple[list[subprocess.Popen], list[str], list[float]]:
    """Start one node per range, one after the other, timing each from spawn to /health answering."""
    processes, urls, ready_s = [], [], []
    env = dict(os.environ, SHARDMARKET_HOME=str(home))
    for i, layers in enumerate(ranges):
        port = _free_port()
        env["SHARDMARKET_NODE_DATA_DIR"] = str(home / f"node{i}")
        started = time.perf_counter()
        process = subprocess.Popen(
            node_command(checkpoint=checkpoint, layers=layers, port=port, threads=threads),
            cwd=ROOT,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        processes.append(process)
        url = f"http://127.0.0.1:{port}"
        while True:
            if process.poll() is not None:
                raise RuntimeError(f"node {layers} exited with {process.returncode}")
            try:
                urllib.request.urlopen(f"{url}/health", timeout=1).read()
                break
            except OSError:
                time.sleep(0.05)
        ready_s.append(time.perf_counter() - started)
        urls.append(url)
    return processes, urls, ready_s


async def pipeline_generate(model: RemoteModel, ids: list[int], params: SamplingParams) -> tuple[Run, list[float]]:
    """The run through the nodes (sessions opened and closed within it), and each decode hop's wall time minus the
    node's compute time (s)."""
    completion = Completion(len(ids))
    started = time.perf_counter()
    tokens, arrivals = [], []
    async for token in model.stream(ids, params, completion):
        arrivals.append(time.perf_counter() - started)
        tokens.append(token)
    run = Run(tokens, arrivals, time.perf_counter() - started)
    return run, [t.wall_s - t.compute_s for t in completion.hop_timings if t.tokens == 1]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def thirds(layers: int) -> list[str]:
    a, b = layers // 3, 2 * layers // 3
    return [f"0:{a}", f"{a}:{b}", f"{b}:{layers}"]


class LocalRunner:
    """The baseline: the whole model in a process of its own, on its main thread, under the OpenMP wait policy
    `omp_policy` (None: libgomp's default), as a user runs it locally."""

    def __init__(self, checkpoint: Path, tokens: int, omp_policy: str | None) -> None:
        env = {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"} | (
            {"OMP_WAIT_POLICY": omp_policy} if omp_policy else {}
        )
        self.process = subprocess.Popen(
            [sys.executable, __file__, "--local", str(checkpoint), "--tokens", str(tokens)],
            cwd=ROOT,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )

    def run(self) -> Run:
        self.process.stdin.write("run\n")
        self.process.stdin.flush()
        return Run(**json.loads(self.process.stdout.readline()))

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def serve_local(checkpoint: Path, tokens: int) -> None:
    """`--local`: load the model once, then answer every `run` line on stdin with one JSON line."""
    head = Head.load(checkpoint)
    ids = chat_ids(head)
    stage = Stage.load(checkpoint, 0, head.num_layers)
    for _ in sys.stdin:
        print(
            json.dumps(asdict(local_generate(stage, head, ids, SamplingParams(max_tokens=tokens, ignore_eos=True)))), flush=True
        )


class BareRunner:
    """The floor: the layer ranges in bare processes of their own (`--bare-stage`), the hidden state passed as raw
    float32 bytes over their stdin/stdout, driven from this process with the same Head and `generate`."""

    def __init__(self, checkpoint: Path, ranges: list[str], head: Head) -> None:
        self.head = head
        self.processes = [
            subprocess.Popen(
                [sys.executable, __file__, "--bare-stage", str(checkpoint), "--layers", layers],
                cwd=ROOT,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
            )
            for layers in ranges
        ]
        for process in self.processes:
            if process.stdout.read(5) != b"ready":
                raise RuntimeError("a bare stage process failed to load its layers")

    def run(self, ids: list[int], params: SamplingParams) -> Run:
        session = os.urandom(8)
        for process in self.processes:
            _send(process.stdin, b"o" + session + struct.pack("<I", len(ids) + params.max_tokens))
            _receive(process.stdout)

        def run_layers(hidden: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
            steps = hidden.shape[1]
            for process in self.processes:
                _send(process.stdin, b"s" + session + struct.pack("<II", steps, int(positions[0, 0])) + tensor_bytes(hidden))
                hidden = torch.frombuffer(bytearray(_receive(process.stdout)), dtype=torch.float32).view(1, steps, -1)
            return hidden

        with torch.inference_mode():
            run = Run.timed(generate(self.head, run_layers, ids, params))
        for process in self.processes:
            _send(process.stdin, b"c" + session)
            _receive(process.stdout)
        return run

    def close(self) -> None:
        for process in self.processes:
            process.stdin.close()
            process.wait()


def serve_bare_stage(checkpoint: Path, layers: str, threads: int) -> None:
    """`--bare-stage`: load one layer range, then answer open (o), step (s) and close (c) messages on stdin."""
    torch.set_num_threads(threads)
    start, end = (int(x) for x in layers.split(":"))
    stage = Stage.load(checkpoint, start, end)
    stdin, stdout = sys.stdin.buffer, sys.stdout.buffer
    stdout.write(b"ready")
    stdout.flush()
    with torch.inference_mode():
        while (message := _receive(stdin)) is not None:
            kind, session = message[:1], message[1:9].hex()
            if kind == b"o":
                stage.open_session(session, struct.unpack("<I", message[9:13])[0])
                _send(stdout, b"k")
            elif kind == b"c":
                stage.close_session(session)
                _send(stdout, b"k")
            else:
                steps, position = struct.unpack("<II", message[9:17])
                hidden = torch.frombuffer(bytearray(message[17:]), dtype=torch.float32).view(1, steps, -1)
                out = stage.step(session, hidden, torch.arange(position, position + steps)[None])
                _send(stdout, tensor_bytes(out))


def _send(pipe, data: bytes) -> None:
    pipe.write(struct.pack("<I", len(data)) + data)
    pipe.flush()


def _receive(pipe) -> bytes | None:
    size = pipe.read(4)
    return pipe.read(struct.unpack("<I", size)[0]) if len(size) == 4 else None


def paired_ratio(baseline_ms: list[float], measured_ms: list[float]) -> float:
    """The median of each round's baseline/measured ms per token (a speed ratio), so that the machine's drift
    between rounds cancels."""
    return statistics.median(a / b for a, b in zip(baseline_ms, measured_ms, strict=True))


def chat_ids(head: Head) -> list[int]:
    text = head.tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=False)
    return head.tokenizer.encode(text, add_special_tokens=False)


async def compare(name: str, checkpoint: Path, tokens: int, runs: int, threads: int, local_omp: str | None) -> dict:
    """Local vs 3-node pipeline (TCP and WebSocket) vs bare processes for one model, the four runs interleaved."""
    params = SamplingParams(max_tokens=tokens, ignore_eos=True)  # every run decodes the same number of tokens
    local = LocalRunner(checkpoint, tokens, local_omp)
    bare = model = None
    kinds = ["local", "tcp", "ws", "bare"]
    timed: dict[str, list[Run]] = {kind: [] for kind in kinds}
    overheads: dict[str, list[float]] = {"tcp": [], "ws": []}
    with tempfile.TemporaryDirectory() as home:
        layers = json.loads((checkpoint / "config.json").read_text())["num_hidden_layers"]
        processes, urls, ready_s = start_nodes(checkpoint, thirds(layers), Path(home), threads)
        try:
            model = await RemoteModel.connect(checkpoint, urls, DOMAIN)  # one client: one thread runs its torch work
            ids = model.chat_ids(PROMPT)
            bare = BareRunner(checkpoint, thirds(layers), model.head)
            loop = asyncio.get_running_loop()
            for round_ in tqdm(range(runs), desc=f"{name}: local, tcp, ws, bare", file=sys.stderr):
                # the order turns each round: a run right after another process's pass over the whole model is
                # slower (its caches are cold), and no kind should always take that place
                for kind in kinds[round_ % 4 :] + kinds[: round_ % 4]:
                    if kind == "local":
                        run = await asyncio.to_thread(local.run)
                    elif kind == "bare":
                        run = await loop.run_in_executor(model._threads, bare.run, ids, params)
                    else:
                        model.transport = kind
                        run, hop_overheads = await pipeline_generate(model, ids, params)
                        overheads[kind] += hop_overheads
                    timed[kind].append(run)
        finally:
            if model is not None:
                await model.aclose()
            local.close()
            if bare is not None:
                bare.close()
            for process in processes:
                process.terminate()
                process.wait()
    decode = {kind: [run.decode_ms_per_token for run in timed[kind]] for kind in kinds}
    whole = {kind: [run.whole_ms_per_token for run in timed[kind]] for kind in kinds}
    speed = {kind: paired_ratio(decode["local"], decode[kind]) for kind in ("tcp", "ws")}
    faster = max(speed, key=speed.get)
    return {
        f"{name}_local_ms_per_token": round(statistics.median(decode["local"]), 2),
        f"{name}_pipeline_tcp_ms_per_token": round(statistics.median(decode["tcp"]), 2),
        f"{name}_pipeline_ws_ms_per_token": round(statistics.median(decode["ws"]), 2),
        f"{name}_pipeline_over_local_speed": round(speed[faster], 3),
        f"{name}_pipeline_over_local_speed_transport": faster,
        f"{name}_bare_pipes_ms_per_token": round(statistics.median(decode["bare"]), 2),
        f"{name}_bare_over_local_speed": round(paired_ratio(decode["local"], decode["bare"]), 3),
        f"{name}_pipeline_over_bare_speed": round(paired_ratio(decode["bare"], decode[faster]), 3),
        f"{name}_pipeline_over_local_speed_fastest_runs": round(min(decode["local"]) / min(decode[faster]), 3),
        f"{name}_local_first_token_ms": round(statistics.median(run.first_token_ms for run in timed["local"]), 1),
        f"{name}_pipeline_first_token_ms": round(statistics.median(run.first_token_ms for run in timed[faster]), 1),
        f"{name}_bare_first_token_ms": round(statistics.median(run.first_token_ms for run in timed["bare"]), 1),
        f"{name}_pipeline_over_local_whole_request_speed": round(paired_ratio(whole["local"], whole[faster]), 3),
        f"{name}_hop_overhead_tcp_us": round(statistics.median(overheads["tcp"]) * 1e6),
        f"{name}_hop_overhead_ws_us": round(statistics.median(overheads["ws"]) * 1e6),
        f"{name}_same_tokens": all(run.tokens == timed["local"][0].tokens for kind_runs in timed.values() for run in kind_runs),
        f"{name}_node_ready_s": round(statistics.median(ready_s), 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per request (2 at least)")
    parser.add_argument(
        "--runs", type=int, default=9, help="interleaved rounds per model (this machine drifts: more rounds, a steadier median)"
    )
    parser.add_argument("--no-850m", action="store_true", help="skip the ~850M random model")
    parser.add_argument(
        "--local-omp",
        choices=["default", "passive"],
        default="default",
        help="the local baseline's OpenMP wait policy (default: libgomp's, as users run plain torch)",
    )
    parser.add_argument("--local", type=Path, help=argparse.SUPPRESS)  # the baseline's own process (LocalRunner)
    parser.add_argument("--bare-stage", type=Path, help=argparse.SUPPRESS)  # one of the floor's processes (BareRunner)
    parser.add_argument("--layers", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.tokens < 2:
        parser.error("--tokens must be 2 at least: the decode speed is timed from the first token to the last")
    if args.local:
        return serve_local(args.local, args.tokens)
    if args.bare_stage:
        return serve_bare_stage(args.bare_stage, args.layers, torch.get_num_threads())
    if os.environ.get("OMP_WAIT_POLICY") != "PASSIVE":  # libgomp read it when torch loaded: start again as shardmarket runs
        print("starting again with OMP_WAIT_POLICY=PASSIVE, as every shardmarket process runs", file=sys.stderr, flush=True)
        os.execve(sys.executable, [sys.executable, __file__, *sys.argv[1:]], dict(os.environ, OMP_WAIT_POLICY="PASSIVE"))
    threads = torch.get_num_threads()
    models = [("default", default_checkpoint)]
    if not args.no_850m:
        models.append(("random850m", lambda: _random_850m(load_config().home / "models" / "random-850m")))
    local_omp = "PASSIVE" if args.local_omp == "passive" else None
    result: dict = {"threads": threads, "omp_wait_policy": "PASSIVE", "local_omp_wait_policy": local_omp or "libgomp default"}
    hop = per_hop_overhead_us(576)
    result.update({f"per_hop_{k}_us": v for k, v in hop.items()})
    result["per_hop_total_us_hidden_1536"] = per_hop_overhead_us(1536)["total"]
    for name, build in tqdm(models, desc="models", file=sys.stderr):
        result.update(asyncio.run(compare(name, build(), args.tokens, args.runs, threads, local_omp)))
    print(json.dumps(result))


def _random_850m(path: Path) -> Path:
    """The seeded ~850M-parameter random Llama, built once under <home>/models."""
    if not (path / "config.json").exists():
        print(f"building the ~850M random model at {path} (once)", file=sys.stderr)
        random_checkpoint(CONFIG_850M, path)
    return path


if __name__ == "__main__":
    main()
