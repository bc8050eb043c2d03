"""Shard engine benchmark; prints JSON on its last line.

In one run, for the default model (SmolLM2-135M-Instruct) and a seeded random ~850M-parameter fp32 Llama
(built in a temporary folder, deleted after), or for `--config FILE.json` instead of the latter:
- decode ms/token of the whole model run locally by transformers vs the same model split into 3
  in-process stages (goal: split/local speed >= 0.97), with tokens_equal and max_abs_logit_diff;
- for the 850M model, ms/token vs the memory-bandwidth floor: bytes of weights read per token divided
  by the copy bandwidth measured in this run (goal: within 1.2x);
- throughput of 8 concurrent sessions (step_batch) vs 1, and vs 8 sessions stepped one by one.
Medians of per-token times. Run it alone: the machine is shared and timings are noisy.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # OpenMP threads must not spin between decode steps

import argparse  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
from transformers import AutoModelForCausalLM, DynamicCache  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from node.engine.head import Head  # noqa: E402
from node.engine.models import default_model, random_checkpoint  # noqa: E402
from node.engine.stage import Stage, even_splits  # noqa: E402

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


def copy_gb_per_s(nbytes: int = 512 * 2**20) -> float:
    """Median copy bandwidth of a large torch tensor, counting bytes read plus bytes written (STREAM's convention)."""
    src = torch.ones(nbytes // 4)
    dst = torch.empty_like(src)
    dst.copy_(src)
    times = []
    for _ in range(7):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * nbytes / statistics.median(times) / 1e9


@torch.no_grad()
def local_decode(model, ids: list[int], new_tokens: int) -> tuple[list[float], list[int], torch.Tensor]:
    """Greedy decode with transformers on the whole model: per-token seconds, tokens, logits."""
    cache = DynamicCache(config=model.config)
    out = model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True, logits_to_keep=1)
    tokens, logits, times = [], [], []
    for _ in range(new_tokens):
        step_logits = out.logits[0, -1]
        token = int(torch.argmax(step_logits))
        tokens.append(token)
        logits.append(step_logits)
        start = time.perf_counter()
        out = model(input_ids=torch.tensor([[token]]), cache=cache, use_cache=True, logits_to_keep=1)
        times.append(time.perf_counter() - start)
    return times, tokens, torch.stack(logits)


def split_decode(head: Head, stages: list[Stage], ids: list[int], new_tokens: int) -> tuple[list[float], list[int], torch.Tensor]:
    """Greedy decode through the stages: per-token seconds, tokens, logits."""
    session = f"bench-{time.monotonic_ns()}"
    for stage in stages:
        stage.open_session(session, len(ids) + new_tokens + 1)

    def run(hidden, positions):
        for stage in stages:
            hidden = stage.step(session, hidden, positions)
        return head.logits(hidden[:, -1:])[0, -1]

    step_logits = run(head.embed(torch.tensor([ids])), torch.arange(len(ids))[None])
    tokens, logits, times = [], [], []
    for i in range(new_tokens):
        token = int(torch.argmax(step_logits))
        tokens.append(token)
        logits.append(step_logits)
        start = time.perf_counter()
        step_logits = run(head.embed(torch.tensor([[token]])), torch.tensor([[len(ids) + i]]))
        times.append(time.perf_counter() - start)
    for stage in stages:
        stage.close_session(session)
    return times, tokens, torch.stack(logits)


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
                inputs = dict(zip(names, stage.step_batch([(name, inputs[name], position) for name in names])))
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


def bench_model(label: str, checkpoint: Path, new_tokens: int, bandwidth: float | None) -> dict:
    """Local vs 3-stage split, concurrency, and (given a bandwidth) the memory-bandwidth floor of one model."""
    say(f"[{label}] loading the whole model with transformers and 3 stages")
    model = AutoModelForCausalLM.from_pretrained(checkpoint, dtype=torch.float32).eval()
    head = Head.load(checkpoint)
    stages = [Stage.load(checkpoint, a, b) for a, b in even_splits(head.num_layers, 3)]
    ids = list(head.tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"])
    local_times, split_times = [], []
    for repeat in range(REPEATS):
        say(f"[{label}] decode {new_tokens} tokens, repeat {repeat + 1}/{REPEATS}")
        t, local_tokens, local_logits = local_decode(model, ids, new_tokens)
        local_times += t
        t, split_tokens, split_logits = split_decode(head, stages, ids, new_tokens)
        split_times += t
    del model
    local_ms = 1000 * statistics.median(local_times)
    split_ms = 1000 * statistics.median(split_times)
    result = {
        "params_m": round(sum(p.numel() for s in stages for p in s.body.parameters()) / 1e6 + head.embed_weight.numel() / 1e6 * (1 if head.lm_head_weight is head.embed_weight else 2), 1),
        "new_tokens": new_tokens,
        "local_ms_per_token": round(local_ms, 2),
        "split3_ms_per_token": round(split_ms, 2),
        "split_over_local_speed": round(local_ms / split_ms, 3),
        "tokens_equal": local_tokens == split_tokens,
        "max_abs_logit_diff": float(torch.max(torch.abs(local_logits - split_logits))),
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
    if bandwidth is not None:
        weight_bytes = sum(p.numel() * p.element_size() for s in stages for p in s.body.parameters())
        weight_bytes += head.lm_head_weight.numel() * head.lm_head_weight.element_size()
        floor_ms = 1000 * weight_bytes / (bandwidth * 1e9)
        result.update(
            weight_gb_read_per_token=round(weight_bytes / 1e9, 3),
            floor_ms_per_token=round(floor_ms, 2),
            split3_over_floor=round(split_ms / floor_ms, 3),
            local_over_floor=round(local_ms / floor_ms, 3),
        )
    return result


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", type=Path, help="a Llama/Mistral/Qwen2 config JSON to bench (random init) instead of the 850M Llama")
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per decode run (default 32)")
    parser.add_argument("--skip-default", action="store_true", help="do not bench the default model")
    args = parser.parse_args()
    bandwidth = copy_gb_per_s()
    say(f"copy bandwidth {bandwidth:.1f} GB/s (read + write), {torch.get_num_threads()} torch threads")
    results: dict = {"copy_gb_per_s": round(bandwidth, 2), "torch_threads": torch.get_num_threads()}
    if not args.skip_default:
        results["default_model"] = bench_model("SmolLM2-135M", default_model(), args.tokens, None)
    config = json.loads(args.config.read_text()) if args.config else LLAMA_850M
    label = args.config.stem if args.config else "llama_850m"
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        say(f"[{label}] building the seeded random checkpoint (fp32)")
        checkpoint = random_checkpoint(config, Path(tmp) / label, seed=0)
        results[label] = bench_model(label, checkpoint, args.tokens, bandwidth)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
