"""Shard engine benchmark; prints JSON on its last line.

In one run, for the default model (SmolLM2-135M-Instruct) and a seeded random ~850M-parameter fp32 Llama
(built in a temporary folder, deleted after), or for `--config FILE.json` instead of the latter:
- decode ms/token of the whole model run locally by transformers vs the same model split into 3
  in-process stages (goal: split/local speed >= 0.97), with tokens_equal and max_abs_logit_diff;
- for the 850M model, ms/token vs the memory-bandwidth floor: bytes of weights read per token divided
  by the copy bandwidth of a large tensor, sampled after every token of the same run (goal: within 1.2x);
- throughput of 8 concurrent sessions (step_batch) vs 1, and vs 8 sessions stepped one by one;
- weight formats on this CPU (what it has for bf16 said): decode ms/token of the 850M model's 3 stages in
  float32, int8 (per-channel) and bf16, alternating token by token (goal: int8 >= 1.5x float32's speed);
  for SmolLM2 imported from its GGUF in each format, top-1 agreement with float32 under teacher forcing over
  float32's greedy continuations of a fixed prompt set (goal: int8 >= 99 %) and greedy-token agreement when
  each format generates on its own, and the same for the int8 weights dequantized to float32 (what the int8
  rounding of the weights alone costs, without Int8Linear's 16-bit activations); the bytes of the layer shards a
  node fetches over IPFS (int8 vs float32);
- with `--device cuda`, where a GPU is present: decode ms/token of the 850M model in bf16 on it vs its
  memory-bandwidth floor (goal: within 1.3x); without a GPU the section says why it was skipped.
Local and split decode alternate token by token, so both see the same load; figures are medians of
per-token times. Run it alone: the machine is shared and timings are noisy.
"""

from __future__ import annotations

import os

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # OpenMP threads must not spin between decode steps

import argparse
import json
import resource
import shutil
import statistics
import sys
import tempfile
import time
from functools import partial
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from transformers import AutoModelForCausalLM, DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shardmarket.cli.engine import default_checkpoint
from shardmarket.engine.formats import SCALE_SUFFIX, convert_shard
from shardmarket.engine.head import Head
from shardmarket.engine.models import default_gguf, import_gguf, random_checkpoint
from shardmarket.engine.sampling import SamplingParams, generate
from shardmarket.engine.stage import Stage, even_splits
from shardmarket.ipfs.blockstore import Blockstore, walk
from shardmarket.ipfs.cids import parse
from shardmarket.ipfs.model import load_manifest, pack_model
from shardmarket.ipfs.store import LocalStore

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
PROMPTS = [  # the fixed set of the agreement figures
    "Explain in a few sentences why the sky is blue during the day.",
    "Write a short poem about a lighthouse keeper.",
    "What are three good habits for learning a new language?",
    "Summarize the plot of Romeo and Juliet in two sentences.",
    "How does a refrigerator keep food cold?",
    "Give me a recipe for a simple tomato soup.",
    "What is the difference between weather and climate?",
    "Write a Python function that checks whether a number is prime.",
]
# activation dtype and weight format of each node format compared (None: as stored, float32)
NODE_FORMATS = {"float32": (None, torch.float32), "int8": ("int8", torch.float32), "bfloat16": ("bfloat16", torch.bfloat16)}


def say(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


class CopyProbe:
    """Copy bandwidth of a large torch tensor, counting bytes read plus bytes written (STREAM's convention)."""

    def __init__(self, nbytes: int = 256 * 2**20, device: str = "cpu"):
        self.device = torch.device(device)
        self.src = torch.ones(nbytes // 4, device=self.device)
        self.dst = torch.empty_like(self.src)
        self.dst.copy_(self.src)

    def sample(self) -> float:
        """GB/s of one copy."""
        sync(self.device)
        start = time.perf_counter()
        self.dst.copy_(self.src)
        sync(self.device)
        return 2 * self.src.numel() * 4 / (time.perf_counter() - start) / 1e9


def sync(device: torch.device) -> None:
    """Wait for the GPU's queued work, so a timer measures it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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


def cpu_bf16_support() -> dict:
    """What this CPU has for bfloat16 (and int8): the relevant /proc/cpuinfo flags, torch's capability, oneDNN's bf16."""
    flags: set[str] = set()
    try:
        line = next(line for line in Path("/proc/cpuinfo").read_text().splitlines() if line.startswith("flags"))
        flags = set(line.split(":", 1)[1].split())
    except (OSError, StopIteration):
        pass
    wanted = ["avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16", "amx_int8"]
    return {
        "cpu_flags": [flag for flag in wanted if flag in flags],
        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "onednn_bf16": bool(torch.ops.mkldnn._is_mkldnn_bf16_supported()),
    }


def run_stages(stages: list[Stage], session: str, hidden: torch.Tensor, start: int) -> torch.Tensor:
    """Hidden states through `stages` at positions start.., cast to each stage's dtype as a client sends them."""
    positions = torch.arange(start, start + hidden.shape[1])[None]
    for stage in stages:
        hidden = stage.step(session, hidden.to(stage.dtype), positions)
    return hidden


def format_decode(checkpoint: Path, head: Head, ids: list[int], new_tokens: int) -> dict:
    """Decode ms/token of the 3 stages in each node format; the formats take turns token by token (each greedy on its
    own logits), so all see the same load."""
    splits = even_splits(head.num_layers, 3)
    stages = {
        name: [Stage.load(checkpoint, a, b, weights=w, dtype=d) for a, b in splits] for name, (w, d) in NODE_FORMATS.items()
    }
    times: dict[str, list[float]] = {name: [] for name in stages}
    names = list(stages)
    for repeat in range(REPEATS):
        say(f"[formats] decode {new_tokens} tokens in {', '.join(names)}, taking turns, repeat {repeat + 1}/{REPEATS}")
        session = f"formats-{repeat}"
        last = {}
        for name, chain in stages.items():
            for stage in chain:
                stage.open_session(session, len(ids) + new_tokens + 1)
            last[name] = run_stages(chain, session, head.embed(torch.tensor([ids])), 0)
        for i in range(new_tokens):
            for name in names[i % len(names) :] + names[: i % len(names)]:
                hidden = head.embed(torch.argmax(head.logits(last[name][:, -1:]), -1))
                start = time.perf_counter()
                last[name] = run_stages(stages[name], session, hidden, len(ids) + i)
                times[name].append(time.perf_counter() - start)
        for chain in stages.values():
            for stage in chain:
                stage.close_session(session)
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    return {
        "numerics": {name: str(chain[0].numerics) for name, chain in stages.items()},
        "layer_weight_gb": {
            name: round(sum(p.numel() * p.element_size() for s in chain for p in s.body.parameters()) / 1e9, 3)
            for name, chain in stages.items()
        },
        "stages_ms_per_token": {name: round(v, 2) for name, v in ms.items()},
        "speed_over_float32": {name: round(ms["float32"] / v, 3) for name, v in ms.items()},
    }


def greedy(head: Head, stages: list[Stage], ids: list[int], new_tokens: int) -> list[int]:
    """`new_tokens` greedy tokens (end of sequence ignored: every format is compared over the same length)."""
    session = f"greedy-{time.monotonic_ns()}"
    for stage in stages:
        stage.open_session(session, len(ids) + new_tokens)
    params = SamplingParams(max_tokens=new_tokens, ignore_eos=True)
    tokens = list(generate(head, lambda h, p: run_stages(stages, session, h, int(p[0, 0])), ids, params))
    for stage in stages:
        stage.close_session(session)
    return tokens


def teacher_forced_top1(head: Head, stages: list[Stage], sequence: list[int], first: int) -> torch.Tensor:
    """The top-1 token after each position first.. of `sequence`, all of it given (teacher forcing), in one prefill."""
    session = f"forced-{time.monotonic_ns()}"
    for stage in stages:
        stage.open_session(session, len(sequence))
    hidden = run_stages(stages, session, head.embed(torch.tensor([sequence[:-1]])), 0)
    for stage in stages:
        stage.close_session(session)
    return torch.argmax(head.logits(hidden[:, first:]), -1)[0]


def format_agreement(variants: dict[str, tuple[Path, torch.dtype]], new_tokens: int) -> dict:
    """Each variant (checkpoint, activation dtype) of SmolLM2 against "float32" over PROMPTS: top-1 agreement under
    teacher forcing over float32's greedy continuation, and greedy tokens when each generates on its own."""
    models = {}
    for name, (checkpoint, dtype) in variants.items():
        head = Head.load(checkpoint)
        models[name] = head, [Stage.load(checkpoint, 0, head.num_layers, dtype=dtype)]
    head32, stages32 = models["float32"]
    result: dict[str, dict] = {
        name: {"same_top1": 0, "positions": 0, "greedy_same": 0, "identical_prompts": 0} for name in models
    }
    for prompt in PROMPTS:
        say(f"[agreement] {prompt}")
        ids = list(
            head32.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        )
        reference = greedy(head32, stages32, ids, new_tokens)
        sequence = ids + reference
        forced32 = teacher_forced_top1(head32, stages32, sequence, len(ids) - 1)
        for name, (head, stages) in models.items():
            forced = teacher_forced_top1(head, stages, sequence, len(ids) - 1)
            tokens = greedy(head, stages, ids, new_tokens)
            figures = result[name]
            figures["same_top1"] += int((forced == forced32).sum())
            figures["positions"] += len(forced32)
            figures["greedy_same"] += sum(a == b for a, b in zip(tokens, reference, strict=True))
            figures["identical_prompts"] += tokens == reference
    return {
        name: {
            "numerics": str(models[name][1][0].numerics),
            "teacher_forced_top1_agreement": round(f["same_top1"] / f["positions"], 4),
            "positions": f["positions"],
            "greedy_token_agreement": round(f["greedy_same"] / (len(PROMPTS) * new_tokens), 4),
            "greedy_identical_prompts": f"{f['identical_prompts']}/{len(PROMPTS)}",
        }
        for name, f in result.items()
        if name != "float32"
    }


def shard_fetch_bytes(checkpoints: dict[str, Path], store_dir: Path) -> dict:
    """Bytes of the blocks a node serving every layer fetches over IPFS (its layer shards), per format packed."""
    blocks = Blockstore(store_dir)
    store = LocalStore(blocks)
    fetched = {}
    for name, checkpoint in checkpoints.items():
        say(f"[fetch] packing SmolLM2 as {name}")
        cid = pack_model(checkpoint, store, store_dir / "work", convert=partial(convert_shard, target=None), progress=False)
        manifest = load_manifest(store, cid)
        fetched[name] = sum(len(block) for shard in manifest["layers"] for _, block in walk(blocks, bytes(parse(shard["cid"]))))
    return {
        "layer_shard_bytes": fetched,
        "over_float32": {name: round(n / fetched["float32"], 4) for name, n in fetched.items()},
    }


def dequantized_copy(int8: Path, dest: Path) -> Path:
    """A copy of the int8 checkpoint `int8` whose matrices are its int8 values times their scales in float32: the same
    weights computed without the 16-bit activations, scales and outputs of Int8Linear."""
    shutil.copytree(int8, dest)
    index_file = dest / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    for file in sorted(dest.glob("layer-*.safetensors")):
        tensors = load_file(file)
        for name in [name for name in tensors if name.endswith(SCALE_SUFFIX)]:
            matrix = name.removesuffix(SCALE_SUFFIX)
            tensors[matrix] = tensors[matrix].float() * tensors.pop(name)[:, None]
            del index["weight_map"][name]
        save_file(tensors, str(file), metadata={"format": "pt"})
    index_file.write_text(json.dumps(index))
    return dest


def bench_formats(smollm: Path, large: Path, tokens: int, work: Path) -> dict:
    """The weight formats: speed on the large random model, agreement and shard bytes on SmolLM2."""
    head = Head.load(large)
    ids = list(
        head.tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    )
    result = {"cpu": cpu_bf16_support(), "decode_850m": format_decode(large, head, ids, tokens)}
    del head
    source = default_gguf()
    checkpoints = {"float32": smollm}
    for name in ("int8", "bfloat16"):
        say(f"[formats] importing {source.name} as {name}")
        checkpoints[name] = import_gguf(source, work / f"smollm-{name}", weights=name)
    variants = {name: (checkpoints[name], dtype) for name, (_, dtype) in NODE_FORMATS.items()}
    variants["bfloat16_weights_float32_activations"] = checkpoints["bfloat16"], torch.float32
    variants["int8_weights_dequantized_float32"] = dequantized_copy(checkpoints["int8"], work / "smollm-int8-fp32"), torch.float32
    result["agreement_smollm2"] = format_agreement(variants, 64)
    result["fetch_smollm2"] = shard_fetch_bytes(checkpoints, work / "blocks")
    return result


def bench_cuda(checkpoint: Path, new_tokens: int) -> dict:
    """Decode ms/token of the model in 16 bits on the first GPU vs its memory-bandwidth floor (weights read per token
    over the measured device copy bandwidth), batch 1, KV caches on the GPU."""
    if not torch.cuda.is_available():
        return {"skipped": f"no CUDA device (torch {torch.__version__}, CUDA build {torch.version.cuda})"}
    dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    head = Head.load(checkpoint, dtype=dtype, device="cuda")
    stages = [Stage.load(checkpoint, a, b, dtype=dtype) for a, b in even_splits(head.num_layers, 3)]
    device = stages[0].device
    probe = CopyProbe(2**30, device="cuda")
    ids = list(
        head.tokenizer.apply_chat_template(PROMPT, add_generation_prompt=True, tokenize=True, return_dict=True)["input_ids"]
    )
    times, bandwidth = [], []
    for repeat in range(REPEATS):
        session = f"cuda-{repeat}"
        for stage in stages:
            stage.open_session(session, len(ids) + new_tokens + 1)
        hidden = run_stages(stages, session, head.embed(torch.tensor([ids])), 0)
        for i in range(new_tokens):
            sync(device)
            start = time.perf_counter()
            token = torch.argmax(head.logits(hidden[:, -1:]), -1)
            hidden = run_stages(stages, session, head.embed(token.cpu()), len(ids) + i)
            sync(device)
            times.append(time.perf_counter() - start)
            bandwidth.append(probe.sample())
        for stage in stages:
            stage.close_session(session)
    weight_bytes = sum(p.numel() * p.element_size() for s in stages for p in s.body.parameters())
    weight_bytes += head.lm_head_weight.numel() * head.lm_head_weight.element_size()
    ms, copy_gb_s = 1000 * statistics.median(times), statistics.median(bandwidth)
    floor_ms = 1000 * weight_bytes / (copy_gb_s * 1e9)
    return {
        "device": torch.cuda.get_device_name(device),
        "dtype": str(dtype).removeprefix("torch."),
        "ms_per_token": round(ms, 3),
        "copy_gb_per_s": round(copy_gb_s, 1),
        "weight_gb_read_per_token": round(weight_bytes / 1e9, 3),
        "floor_ms_per_token": round(floor_ms, 3),
        "over_floor": round(ms / floor_ms, 3),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--config", type=Path, help="a Llama/Mistral/Qwen2 config JSON to bench (random init) instead of the 850M Llama"
    )
    parser.add_argument("--tokens", type=int, default=32, help="new tokens per decode run (default 32)")
    parser.add_argument("--skip-default", action="store_true", help="do not bench the default model")
    parser.add_argument("--threads", type=int, help="torch intra-op threads (default: one per core)")
    parser.add_argument("--skip-split", action="store_true", help="skip local vs split, the floor and concurrency")
    parser.add_argument("--skip-formats", action="store_true", help="skip the weight formats")
    parser.add_argument(
        "--device", choices=["cpu", "cuda"], default="cpu", help="cuda: also decode in bf16 on the GPU vs its bandwidth floor"
    )
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    say(f"{torch.get_num_threads()} torch threads, OMP_WAIT_POLICY={os.environ['OMP_WAIT_POLICY']}")
    results: dict = {"torch_threads": torch.get_num_threads()}
    if not args.skip_default and not args.skip_split:
        results["default_model"] = bench_model("SmolLM2-135M", default_checkpoint(), args.tokens, floor=False)
    config = json.loads(args.config.read_text()) if args.config else LLAMA_850M
    label = args.config.stem if args.config else "llama_850m"
    with tempfile.TemporaryDirectory(prefix="bench-engine-") as tmp:
        say(f"[{label}] building the seeded random checkpoint (fp32)")
        checkpoint = random_checkpoint(config, Path(tmp) / label, seed=0)
        if not args.skip_split:
            results[label] = bench_model(label, checkpoint, args.tokens, floor=True)
        if not args.skip_formats:
            results["formats"] = bench_formats(default_checkpoint(), checkpoint, args.tokens, Path(tmp))
        if args.device == "cuda":
            results["cuda"] = bench_cuda(checkpoint, args.tokens)
        else:
            results["cuda"] = {"skipped": "not asked for (--device cuda)"}
    results["peak_rss_gb"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2)
    print(json.dumps(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
