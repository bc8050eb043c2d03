"""Privacy benchmark: what a node on a real route learns of the prompt from the hidden states it is sent.

Three in-process nodes serve SmolLM2-135M-Instruct (the default model, from its shipped GGUF) as the route
[0, 1) -> [1, L/2) -> [L/2, L); the client sends each committed prompt (bench/privacy_prompts.json, with synthetic
secrets: passwords, ID numbers, names) through it. Each node is wrapped here, as a malicious operator would wrap
their own node, to record the decrypted hidden states of every step it is sent. Against what each hop recorded:

- a learned decoder: a ridge regression from the hop's input states to the input embeddings, trained on public
  text run through the same known layers (the repository's README, then the license texts of the installed Python
  packages: no network at run time), decoded to the nearest embedding;
- exact inversion with the public weights: for each position in turn, candidate tokens are proposed cheaply (the
  decoder's ranking; where its first candidates fail, gradient descent on a free input embedding through the known
  layers, ranked by distance to the embeddings) and each is verified exactly by recomputing the hop's input at that
  position through the known layers over the prefix recovered so far; the candidate whose recomputed state matches
  (relative error under 1e-3) is the token. Where none of the budgeted candidates matches, the rest of the prompt
  takes the decoder's guesses (a wrong prefix can match nothing). Its CPU-seconds include the proposals, not the
  decoder's training;
- a unigram baseline: the public text's most frequent token at every position.

Per hop: token recovery, exact-prompt rate, secrets recovered, attacker CPU-seconds per token. Then the cost of
hiding the client's address: decode ms/token of the same route reached directly and through a forwarding relay
(net.relay.ForwardProxy) on loopback, interleaved runs, medians. Prints JSON on its last line.

Usage: .venv/bin/python bench/privacy.py [--ci] [--prompts N] [--corpus-tokens N] [--relay-runs N]
`--ci` is the reduced set the test runs (2 prompts, 256 candidates, a smaller decoder corpus and position-0 table, a
short relay check).
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # OpenMP threads must not spin between decode steps

import argparse
import asyncio
import json
import statistics
import sys
import tempfile
import time
from collections import Counter
from dataclasses import replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shardmarket.chain.eip712 import Domain
from shardmarket.cli.engine import default_checkpoint
from shardmarket.client.generation import Completion, Privacy, RemoteModel
from shardmarket.config import load_config
from shardmarket.engine.head import Head
from shardmarket.engine.sampling import SamplingParams
from shardmarket.engine.stage import Stage
from shardmarket.net.relay import ForwardProxy
from shardmarket.server.daemon import NodeDaemon, ServeOptions, build_daemon

REPO = Path(__file__).resolve().parents[1]
PROMPTS = Path(__file__).with_name("privacy_prompts.json")
DOMAIN = Domain(31337, "0x" + "00" * 20)  # what free nodes sign under when no DisputeManager is deployed
MATCH = 1e-3  # relative error under which a recomputed hidden state is the one the node was sent
CHUNK = 64  # candidates verified in one batch


# ---- the route, and the nodes' operators recording what they are sent


def record_steps(daemon: NodeDaemon, sink: list[tuple[int, torch.Tensor]]) -> None:
    """Make `daemon` keep (position, hidden states) of every step it decrypts: what its operator can always do."""
    service = daemon.service
    step = service._step

    async def recording(message):
        if message.tensor is not None:
            sink.append((int(message.fields.get("position", 0)), message.tensor.detach().clone().float()))
        return await step(message)

    service._step = recording  # type: ignore[method-assign]


async def start_route(checkpoint: Path, splits: list[tuple[int, int]], home: Path) -> tuple[list[NodeDaemon], list[asyncio.Task]]:
    config = load_config()
    daemons, tasks = [], []
    for i, layers in enumerate(splits):
        node_config = replace(config, node=replace(config.node, data_dir=home / f"node{i}"))
        options = ServeOptions(layers=layers, checkpoint=checkpoint, host="127.0.0.1", port=0, threads=1, model_id="smollm2")
        daemon = await asyncio.to_thread(build_daemon, options, node_config)
        ready = asyncio.Event()
        tasks.append(asyncio.create_task(daemon.run(ready)))
        await ready.wait()
        daemons.append(daemon)
    return daemons, tasks


async def capture(model: RemoteModel, daemons: list[NodeDaemon], prompts: list[list[int]]) -> list[list[torch.Tensor]]:
    """For each node, for each prompt, the hidden states [T, H] the node was sent for the prompt's positions."""
    sinks: list[list[tuple[int, torch.Tensor]]] = [[] for _ in daemons]
    for daemon, sink in zip(daemons, sinks, strict=True):
        record_steps(daemon, sink)
    captured: list[list[torch.Tensor]] = [[] for _ in daemons]
    for ids in prompts:
        for sink in sinks:
            sink.clear()
        async for _ in model.stream(ids, SamplingParams(max_tokens=1), Completion(len(ids))):
            pass  # one token: only the prompt's prefill goes through the layers
        for hop, sink in enumerate(sinks):
            states = torch.zeros(len(ids), model.head.hidden_size)
            for position, hidden in sink:
                states[position : position + hidden.shape[1]] = hidden[0]
            captured[hop].append(states)
    return captured


# ---- exact inversion with the public weights


class PrefixCache:
    """The `cache=` of the known layers: keys/values of the prefix recovered so far, which every candidate row sees
    before itself; `grow` appends the row of an accepted token."""

    def __init__(self, stage: Stage) -> None:
        heads = stage.config.num_key_value_heads
        dim = getattr(stage.config, "head_dim", None) or stage.hidden_size // stage.config.num_attention_heads
        n = len(stage.body.layers)
        self.keys = [torch.zeros(1, heads, 0, dim) for _ in range(n)]
        self.values = [torch.zeros(1, heads, 0, dim) for _ in range(n)]
        self.grow = False

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        rows = key.shape[0]
        k = torch.cat([self.keys[layer_idx].expand(rows, -1, -1, -1), key], 2)
        v = torch.cat([self.values[layer_idx].expand(rows, -1, -1, -1), value], 2)
        if self.grow:
            self.keys[layer_idx], self.values[layer_idx] = k.detach(), v.detach()
        return k, v


def known_layers(stage: Stage, x: torch.Tensor, position: int, cache: PrefixCache) -> torch.Tensor:
    """Rows x [B, 1, H] at `position` after the prefix in `cache`, through the stage's layers (as Stage._forward)."""
    positions = torch.full((x.shape[0], 1), position, dtype=torch.int64)
    embedding = stage.rotary(x, positions)
    for layer in stage.body.layers:
        x = layer(x, position_embeddings=embedding, position_ids=positions, cache=cache)
    return x


def gradient_ranking(
    stage: Stage, embeddings: torch.Tensor, cache: PrefixCache, position: int, target: torch.Tensor, start: torch.Tensor
) -> torch.Tensor:
    """Token ids ordered by distance to the input embedding that gradient descent from `start` finds for `target`."""
    free = start.clone().requires_grad_(True)
    optimizer = torch.optim.Adam([free], lr=0.02)
    scale = target.norm() ** 2
    for _ in range(25):
        out = known_layers(stage, free[None, None], position, cache)[0, 0]
        loss = ((out - target) ** 2).sum() / scale
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return torch.cdist(free[None].detach(), embeddings)[0].argsort()


def invert_exactly(
    stage: Stage | None, embeddings: torch.Tensor, states: torch.Tensor, proposals: torch.Tensor, budget: int
) -> tuple[list[int], int]:
    """The tokens whose hidden states after `stage`'s layers are `states` [T, H], recovered position by position: the
    candidates are tried in the order of `proposals` [T, V] (scores), then of the gradient's guess, and verified by
    recomputing the position over the prefix recovered so far (the best candidate where none of the first `budget`
    matches); and how many positions matched exactly."""
    if stage is None:  # the first hop is sent the embeddings themselves
        distances = torch.cdist(states, embeddings)
        return distances.argmin(1).tolist(), int((distances.min(1).values <= MATCH * states.norm(dim=1)).sum())
    cache = PrefixCache(stage)
    tokens, exact, lost = [], 0, False
    for position, target in enumerate(states):
        order = proposals[position].argsort(descending=True)
        if lost:  # a wrong token in the prefix: no candidate can match any more, the proposals' best is all there is
            tokens.append(int(order[0]))
            continue
        tried: set[int] = set()
        best, best_error = int(order[0]), float("inf")
        for round_ in range(2):
            if round_ == 1:  # the cheap proposals did not find it: rank by the gradient's guess, started from theirs
                with torch.enable_grad():
                    order = gradient_ranking(stage, embeddings, cache, position, target, embeddings[int(order[0])])
            candidates = [int(t) for t in order[: budget // 2 + len(tried)] if int(t) not in tried][: budget // 2]
            for at in range(0, len(candidates), CHUNK):
                batch = torch.tensor(candidates[at : at + CHUNK])
                tried.update(batch.tolist())
                with torch.no_grad():
                    out = known_layers(stage, embeddings[batch][:, None], position, cache)[:, 0]
                errors = (out - target).norm(dim=1) / target.norm()
                j = int(errors.argmin())
                if float(errors[j]) < best_error:
                    best, best_error = int(batch[j]), float(errors[j])
                if best_error < MATCH:
                    break
            if best_error < MATCH:
                break
        if best_error >= MATCH:
            lost = True
            best = int(proposals[position].argmax())
        exact += not lost
        tokens.append(best)
        cache.grow = True
        with torch.no_grad():
            known_layers(stage, embeddings[best][None, None], position, cache)
        cache.grow = False
    return tokens, exact


# ---- a learned decoder trained on public text


def public_text(limit_chars: int) -> tuple[str, list[str]]:
    """Text shipped on this machine without any download: the repository's prose, then the license texts of the
    installed Python packages; and where it came from."""
    import site

    sources = [REPO / "README.md", REPO / "contracts" / "README.md"]
    for packages in site.getsitepackages():
        sources += sorted(Path(packages).glob("*.dist-info/licenses/LICENSE*")) + sorted(
            Path(packages).glob("*.dist-info/LICENSE*")
        )
    text, used = "", []
    for path in sources:
        if path.is_file() and len(text) < limit_chars:
            text += path.read_text(errors="replace") + "\n"
            used.append(str(path.relative_to(REPO) if path.is_relative_to(REPO) else path.parent.name))
    return text[:limit_chars], used


def states_of(stage: Stage | None, head: Head, ids: list[int], window: int = 64) -> torch.Tensor:
    """Hidden states after `stage`'s layers of `ids`, in independent windows (as prompts of that length)."""
    out = []
    for at in range(0, len(ids), window):
        chunk = torch.tensor([ids[at : at + window]])
        hidden = head.embed(chunk)
        if stage is not None:
            stage.open_session("public", window)
            hidden = stage.step("public", hidden, torch.arange(chunk.shape[1])[None])
            stage.close_session("public")
        out.append(hidden[0])
    return torch.cat(out)


def first_states(stage: Stage | None, rows: torch.Tensor) -> torch.Tensor:
    """The states after `stage`'s layers of each embedding of `rows` [N, H] alone at position 0."""
    if stage is None:
        return rows
    return known_layers(stage, rows[:, None], 0, PrefixCache(stage))[:, 0]


class Decoder:
    """Ridge regression from standardised hidden states to input embeddings; decodes to the nearest embedding."""

    def __init__(self, states: torch.Tensor, ids: torch.Tensor, embeddings: torch.Tensor, ridge: float = 1.0) -> None:
        self.mean, self.std = states.mean(0), states.std(0) + 1e-6
        x = torch.cat([(states - self.mean) / self.std, torch.ones(len(states), 1)], 1).double()
        y = embeddings[ids].double()
        self.weight = torch.linalg.solve(x.T @ x + ridge * torch.eye(x.shape[1], dtype=x.dtype), x.T @ y).float()
        self.embeddings = torch.nn.functional.normalize(embeddings, dim=1)

    def scores(self, states: torch.Tensor) -> torch.Tensor:
        """[T, V]: cosine of each position's predicted embedding to every token's."""
        x = torch.cat([(states - self.mean) / self.std, torch.ones(len(states), 1)], 1)
        return torch.nn.functional.normalize(x @ self.weight, dim=1) @ self.embeddings.T

    def decode(self, states: torch.Tensor) -> list[int]:
        return self.scores(states).argmax(1).tolist()


# ---- scoring


def score(head: Head, prompts: list[dict], ids: list[list[int]], guesses: list[list[int]], cpu_s: float) -> dict:
    tokens = sum(len(p) for p in ids)
    right = sum(sum(a == b for a, b in zip(p, g, strict=True)) for p, g in zip(ids, guesses, strict=True))
    secrets = [s for p in prompts for s in p["secrets"]]
    found = []
    for prompt, guess in zip(prompts, guesses, strict=True):
        text = head.tokenizer.decode(guess)
        found += [s for s in prompt["secrets"] if s in text]
    return {
        "token_recovery": round(right / tokens, 4),
        "exact_prompts": round(sum(p == g for p, g in zip(ids, guesses, strict=True)) / len(ids), 4),
        "secrets_recovered": f"{len(found)}/{len(secrets)}",
        "secrets_recovered_rate": round(len(found) / len(secrets), 4),
        "cpu_s_per_token": round(cpu_s / tokens, 4),
    }


def attack_hop(
    checkpoint: Path, head: Head, after: int, captured: list[torch.Tensor], prompts: list[dict], ids: list[list[int]], args
) -> dict:
    """Every attack against what the node whose layers start at `after` was sent."""
    embeddings = head.embed_weight.float()
    stage = Stage.load(checkpoint, 0, after) if after else None
    if stage is not None:
        for parameter in stage.body.parameters():
            parameter.requires_grad_(False)
    text, _ = public_text(args.corpus_tokens * 8)
    public = head.tokenizer.encode(text)[: args.corpus_tokens]
    started = time.process_time()
    with torch.no_grad():
        decoder = Decoder(states_of(stage, head, public), torch.tensor(public), embeddings)
        # position 0 sees no prefix: its state depends on the token alone, so a table computed once holds it (the whole
        # vocabulary; with --ci the public text's tokens and the lowest ids, which byte-pair merges made the common ones)
        vocabulary = len(embeddings)
        first = sorted(set(public) | set(range(args.first_table or vocabulary)))
        table = torch.cat([first_states(stage, embeddings[first[at : at + 256]]) for at in range(0, len(first), 256)])
    trained = time.process_time() - started
    result: dict = {"receives_hidden_states_after_layers": after}
    started = time.process_time()
    decoded = [decoder.decode(states) for states in captured]
    result["learned_decoder"] = score(head, prompts, ids, decoded, time.process_time() - started)
    result["learned_decoder"]["training_cpu_s"] = round(trained, 2)  # with the position-0 table

    started = time.process_time()
    guesses, exact = [], 0
    for states in captured:
        with torch.no_grad():
            proposals = decoder.scores(states)
            distances = torch.cdist(states[:1], table)[0]
            proposals[0, first] = 2.0 - distances / distances.max()  # the table's nearest first, then the decoder's
        tokens, matched = invert_exactly(stage, embeddings, states, proposals, args.candidates)
        guesses.append(tokens)
        exact += matched
    result["exact_inversion"] = score(head, prompts, ids, guesses, time.process_time() - started)
    result["exact_inversion"]["positions_verified_exactly"] = round(exact / sum(len(p) for p in ids), 4)
    common = Counter(public).most_common(1)[0][0]
    result["unigram_baseline"] = score(head, prompts, ids, [[common] * len(p) for p in ids], 0.0)
    return result


# ---- the cost of hiding the client's address behind a relay


async def decode_ms(model: RemoteModel, ids: list[int], tokens: int, hidden: bool) -> float:
    """ms/token from the first generated token to the last."""
    stamps = []
    async for _ in model.stream(ids, SamplingParams(max_tokens=tokens, temperature=0.0), Completion(len(ids)), hidden=hidden):
        stamps.append(time.perf_counter())
    return (stamps[-1] - stamps[0]) * 1000 / (len(stamps) - 1)


async def relay_cost(model: RemoteModel, ids: list[int], tokens: int, runs: int) -> dict:
    direct, relayed = [], []
    for run in range(runs):  # interleaved, the order turning each run
        for hidden in (run % 2 == 1, run % 2 == 0):
            (relayed if hidden else direct).append(await decode_ms(model, ids, tokens, hidden))
    return {
        "direct_ms_per_token": round(statistics.median(direct), 2),
        "relayed_ms_per_token": round(statistics.median(relayed), 2),
        "relay_cost_ms_per_token": round(statistics.median(relayed) - statistics.median(direct), 2),
        "runs": runs,
        "tokens": tokens,
        "where": "loopback: the relay's own forwarding cost, no extra network distance",
    }


async def main_async(args) -> dict:
    checkpoint = args.checkpoint or default_checkpoint()
    head = Head.load(checkpoint)
    layers = head.num_layers
    splits = [(0, 1), (1, layers // 2), (layers // 2, layers)]
    threads = torch.get_num_threads()
    prompts = json.loads(PROMPTS.read_text())[: args.prompts]
    ids = [head.tokenizer.encode(p["prompt"]) for p in prompts]
    with tempfile.TemporaryDirectory(prefix="privacy-bench-") as home:
        daemons, tasks = await start_route(checkpoint, splits, Path(home))
        proxy = ForwardProxy(allow_local=True, rate_bytes_per_s=0)
        relay_port = await proxy.start("127.0.0.1", 0)
        model = await RemoteModel.connect(
            checkpoint,
            [f"http://127.0.0.1:{d.port}" for d in daemons],
            DOMAIN,
            model_id="smollm2",
            privacy=Privacy.of([], relay=f"127.0.0.1:{relay_port}"),
        )
        try:
            captured = await capture(model, daemons, ids)
            relay = await relay_cost(model, ids[0], args.relay_tokens, args.relay_runs)
        finally:
            await model.aclose()
            await proxy.close()
            for daemon in daemons:
                daemon.stop()
            await asyncio.gather(*tasks)
    torch.set_num_threads(threads)  # the nodes set this process's torch threads to theirs
    hops = []
    for (start, end), states in zip(splits, captured, strict=True) if not args.relay_only else []:
        hop = await asyncio.to_thread(attack_hop, checkpoint, head, start, states, prompts, ids, args)
        hops.append({"node_layers": [start, end], **hop})
    _, corpus = public_text(args.corpus_tokens * 8)
    return {
        "model": "SmolLM2-135M-Instruct (shipped GGUF, float32)",
        "route": [list(s) for s in splits],
        "prompts": len(prompts),
        "prompt_tokens": sum(len(p) for p in ids),
        "candidates_per_position": args.candidates,
        "decoder_corpus_tokens": args.corpus_tokens,
        "decoder_corpus": [*corpus[:3], f"... {len(corpus) - 3} more license files"] if len(corpus) > 3 else corpus,
        "hops": hops,
        "relay": relay,
        "torch_threads": torch.get_num_threads(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--ci", action="store_true", help="the reduced set the test runs")
    parser.add_argument(
        "--checkpoint", type=Path, help="the default model's checkpoint folder (default: imported under the home)"
    )
    parser.add_argument("--prompts", type=int, help="how many of the committed prompts (default: all; 2 with --ci)")
    parser.add_argument("--candidates", type=int, help="candidates verified per position at most (default 2048; 256 with --ci)")
    parser.add_argument("--corpus-tokens", type=int, help="public tokens the decoder trains on (default 20000; 4000 with --ci)")
    parser.add_argument(
        "--first-table", type=int, help="token ids tabled for position 0 besides the public text's (default: all; 8192 with --ci)"
    )
    parser.add_argument("--relay-runs", type=int, help="interleaved direct/relayed runs (default 5; 1 with --ci)")
    parser.add_argument("--relay-only", action="store_true", help="measure the relay's cost alone, no attack")
    parser.add_argument("--relay-tokens", type=int, help="tokens per relay run (default 24; 8 with --ci)")
    args = parser.parse_args()
    args.prompts = args.prompts or (2 if args.ci else 1000)
    args.candidates = args.candidates or (256 if args.ci else 2048)
    args.corpus_tokens = args.corpus_tokens or (4000 if args.ci else 20000)
    args.relay_runs = args.relay_runs or (1 if args.ci else 5)
    args.relay_tokens = args.relay_tokens or (8 if args.ci else 24)
    args.first_table = args.first_table or (8192 if args.ci else 0)
    started = time.perf_counter()
    result = asyncio.run(main_async(args))
    result["wall_s"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
