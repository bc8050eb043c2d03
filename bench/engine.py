"""Shard engine benchmark; prints JSON on its last line.

In one run, for the default model (SmolLM2-135M-Instruct) and a seeded random ~850M-parameter fp32 Llama
(built in a temporary folder, deleted after), or for `--config FILE.json` instead of the latter:
- decode ms/token of the whole model run locally by transformers vs the same model split into 3
  in-process stages (goal: split/local speed >= 0.97), with tokens_equal and max_abs_logit_diff;
- for the 850M model, ms/token vs the memory-bandwidth floor: bytes of weights read per token divided
  by the copy bandwidth of a large tensor, sampled after every token of the same run (goal: within 1.2x);
- throughput of 8 concurrent sessions (step_batch) vs 1, and vs 8 sessions stepped one by one.
Local and split decode alternate token by token, so both see the same load; figures are medians of
per-token times. Run it alone: the machine is shared and timings are noisy.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # OpenMP threads must not spin between decode steps

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shardmarket.cli.engine import default_checkpoint
from shardmarket.engine.head import Head
from shardmarket.engine.models import random_checkpoint
from shardmarket.engine.stage import Stage, even_splits

LLAMA_850M = {
    "model_type": "llama",
    "vocab_size": 32000,
    "hidden_size": 2048,
    "intermediate_size": 5632,
    "num_hidden_layers": 16,
    "num_attention_heads": 32,
    "num_key_value_heads": 4,
    "max_position_embeddings": 2048,
    "tie_word_embeddings": False,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
PROMPT = [{"role": "user", "content": "Explain in a few sentences why the sky is blue during the day."}]
REPEATS = 3


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class CopyProbe:
    """Copy bandwidth of a large torch tensor, counting bytes read plus bytes written (STREAM's convention)."""

    def __init__(self, nbytes: int = 256 * 2**20):
        self.src = torch.ones(nbytes // 4)
        self.dst = torch.empty_like(self.src)
        self.dst.copy_(self.src)

    def sample(self) -> float:
        """GB/s of one copy."""
        start = time.perf_counter()
        self.dst.copy_(self.src)
        return 2 * self.src.numel() * 4 / (time.perf_counter() - start) / 1e9


class LocalDecoder:
    """The whole model run locally by transformers, with its DynamicCache."""

    def __init__(self, model):
        self.model = model
        self.cache = DynamicCache(config=model.config)

    @torch.no_grad()
    def __call__(self, ids: list[int], start: int) -> torch.Tensor:
        out = self.model(input_ids=torch.tensor([ids]), cache=self.cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1]


class SplitDecoder:
    """The same model as a head and in-process stages."""

    def __init__(self, head: Head, stages: list[Stage], max_length: int):
        self.head, self.stages = head, stages
        self.session = f"bench-{time.monotonic_ns()}"
        for stage in stages:
            stage.open_session(self.session, max_length)

    def __call__(self, ids: list[int], start: int) -> torch.Tensor:
        hidden = self.head.embed(torch.tensor([ids]))
        positions = torch.arange(start, start + len(ids))[None]
        for stage in self.stages:
            hidden = stage.step(self.session, hidden, positions)
        return self.head.logits(hidden[:, -1:])[0, -1]

    def close(self) -> None:
        for stage in self.stages:
            stage.close_session(self.session)


def lockstep(model, head: Head, stages: list[Stage], ids: list[int], new_tokens: int, probe: CopyProbe | None) -> dict:
    """Greedy decode locally and through the stages token by token, alternating which goes first.

    Per-token seconds of both, their tokens and logits, and a copy-bandwidth sample after every token.
    """
    local, split = LocalDecoder(model), SplitDecoder(head, stages, len(ids) + new_tokens + 1)
    logits = {"local": local(ids, 0), "split": split(ids, 0)}
    record = {name: {"times": [], "tokens": [], "logits": []} for name in logits}
    bandwidth = []
    for i in range(new_tokens):
        order = [("local", local), ("split", split)][:: 1 if i % 2 == 0 else -1]
        for name, decoder in order:
            token = int(torch.argmax(logits[name]))
            record[name]["tokens"].append(token)
            record[name]["logits"].append(logits[name])
            start = time.perf_counter()
            logits[name] = decoder([token], len(ids) + i)
            record[name]["times"].append(time.perf_counter() - start)
        if probe is not None:
            bandwidth.append(probe.sample())
    split.close()
    return {**record, "bandwidth": bandwidth}


def concurrent_decode(head: Head, stages: list[Stage], ids: list[int], sessions: int, steps: int, batched: bool) -> float:
    """Decode tokens per second the stages serve to `sessions` sessions, batched (step_batch) or one by one (step).

    Only the stages are timed: each session's head (embeddings, LM head) runs on its own client.
    """
    names = [f"c{i}-{time.monotonic_ns()}" for i in range(sessions)]
    last = {}
    for name in names:
        for stage in stages:
            stage.open_session(name, len(ids) + steps + 1)
        h = head.embed(torch.tensor([ids]))
        for stage in stages:
            h = stage.step(name, h, torch.arange(len(ids))[None])
        last[name] = h[:, -1:]
    times = []
    for step in range(steps):
        position = torch.tensor([[len(ids) + step]])
        inputs = {name: head.embed(torch.argmax(head.logits(last[name]), -1)) for name in names}
        start = time.perf_counter()
        if batched:
            for stage in stages:
                inputs = dict(zip(names, stage.step_batch([(name, inputs[name], position) for name in names]), strict=True))
        else:
            for name in names:
                for stage in stages:
                    inputs[name] = stage.step(name, inputs[name], position)
        times.append(time.perf_counter() - start)
        last = inputs
    for name in names:
        for stage in stages:
            stage.close_session(name)
    return sessions / statistics.median(times)


def model_params(head: Head, stages: list[Stage]) -> list[torch.Tensor]:
    """Every weight tensor of the model once (tied embeddings count once)."""
    weights = {id(t): t for t in (head.embed_weight, head.lm_head_weight, head.norm.weight)}
    weights.update({id(p): p for s in stages for p in s.body.parameters()})
    return list(weights.values())


def bench_model(label: str, checkpoint: Path, new_tokens: int, floor: bool) -> dict:
    """Local vs 3-stage split, concurrency, and optionally ms/token vs the memory-bandwidth floor, of one model."""
    say(f"[{label}] loading the whole model with transformers and 3 stages")
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    head = Head.load(checkpoint)
    stages = [Stage.load(checkpoint, a, b) for a, b in even_splits(head.num_layers, 3)]
    ids = list(
        head.tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    )
    probe = CopyProbe() if floor else None
    local_times, split_times, bandwidth = [], [], []
    for repeat in range(REPEATS):
        say(f"[{label}] decode {new_tokens} tokens locally and split, token by token, repeat {repeat + 1}/{REPEATS}")
        run = lockstep(model, head, stages, ids, new_tokens, probe)
        local_times += run["local"]["times"]
        split_times += run["split"]["times"]
        bandwidth += run["bandwidth"]
    del model, probe
    local_ms = 1000 * statistics.median(local_times)
    split_ms = 1000 * statistics.median(split_times)
    result = {
        "params_m": round(sum(p.numel() for p in model_params(head, stages)) / 1e6, 1),
        "new_tokens": new_tokens,
        "local_ms_per_token": round(local_ms, 2),
        "split3_ms_per_token": round(split_ms, 2),
        "split_over_local_speed": round(local_ms / split_ms, 3),
        "tokens_equal": run["local"]["tokens"] == run["split"]["tokens"],
        "max_abs_logit_diff": float(
            torch.max(torch.abs(torch.stack(run["local"]["logits"]) - torch.stack(run["split"]["logits"])))
        ),
    }
    say(f"[{label}] 8 concurrent sessions vs 1")
    steps = 12
    one = concurrent_decode(head, stages, ids, 1, steps, batched=True)
    eight = concurrent_decode(head, stages, ids, 8, steps, batched=True)
    eight_unbatched = concurrent_decode(head, stages, ids, 8, steps, batched=False)
    result.update(
        sessions1_tokens_per_s=round(one, 2),
        sessions8_batched_tokens_per_s=round(eight, 2),
        sessions8_unbatched_tokens_per_s=round(eight_unbatched, 2),
        sessions8_over_1_throughput=round(eight / one, 2),
    )
    if floor:
        copy_gb_s = statistics.median(bandwidth)
        weight_bytes = sum(p.numel() * p.element_size() for s in stages for p in s.body.parameters())
        weight_bytes += head.lm_head_weight.numel() * head.lm_head_weight.element_size()
        floor_ms = 1000 * weight_bytes / (copy_gb_s * 1e9)
        result.update(
            copy_gb_per_s=round(copy_gb_s, 2),
            weight_gb_read_per_token=round(weight_bytes / 1e9, 3),
            floor_ms_per_token=round(floor_ms, 2),
            split3_over_floor=round(split_ms / floor_ms, 3),
            local_over_floor=round(local_ms / floor_ms, 3),
        )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", type=Path, help="a Llama/Mistral/Qwen2 config JSON to bench (random init) instead of the 850M Llama"
    )
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per decode run (default 32)")
    parser.add_argument("--skip-default", action="store_true", help="do not bench the default model")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: one per core)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    say(f"{torch.get_num_threads()} torch threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    results: dict = {"torch_threads": torch.get_num_threads()}
    if not args.skip_default:
        results["default_model"] = bench_model("SmolLM2-135M", default_checkpoint(), args.tokens, floor=False)
    config = json.loads(args.config.read_text()) if args.config else LLAMA_850M
    label = args.config.stem if args.config else "llama_850m"
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        say(f"[{label}] building the seeded random checkpoint (fp32)")
        checkpoint = random_checkpoint(config, Path(tmp) / label, seed=0)
        results[label] = bench_model(label, checkpoint, args.tokens, floor=True)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
