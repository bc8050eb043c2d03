"""`shardmarket node run`: serve a layer range of a local checkpoint to clients."""

from __future__ import annotations

import argparse
import asyncio
import logging
from pathlib import Path

from shardmarket.cli import reach
from shardmarket.cli.operator import add_operator_commands

from shardmarket.config import load_config

DTYPE_NAMES = ["bfloat16", "float16", "float32"]  # shardmarket.net.wire.DTYPES, named without importing torch


def parse_layers(text: str) -> tuple[int, int]:
    """`A:B` -> (A, B): the half-open layer range [A, B)."""
    try:
        start, end = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"layers must look like 0:10 (start:end), got {text!r}") from None
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"layers {text}: need 0 <= start < end")
    return start, end


def register(commands) -> None:
    group = commands.add_parser("node", help="run a node that serves layers of a model").add_subparsers(dest="node_command", required=True)
    run = group.add_parser("run", help="serve a layer range of a checkpoint over encrypted sessions")
    run.add_argument("--checkpoint", type=Path, help="Hugging Face checkpoint folder (default: the imported default model)")
    run.add_argument("--layers", type=parse_layers, help="layer range A:B (half-open); without it: serve this operator's registration from the chain, paid")
    run.add_argument("--model-id", help="model name clients match on (default: the checkpoint folder's name)")
    run.add_argument("--host", help="listen address (config node.host)")
    run.add_argument("--port", type=int, help="HTTP port for /info, /health and WebSocket sessions (config node.port)")
    run.add_argument("--tcp-port", type=int, help="raw TCP session port (default: HTTP port + 1)")
    run.add_argument("--price", type=int, help="token units per token processed (config node.price)")
    run.add_argument("--dtype", choices=DTYPE_NAMES, default="float32")
    run.add_argument("--threads", type=int, help="torch threads (config node.threads)")
    run.add_argument("--test-fault", choices=["wrong-shape", "equivocate", "forge-commitments"], help="misbehave on purpose (for tests of clients)")
    run.add_argument("--max-memory-mb", type=float, help="CPU memory for this node's weights; what does not fit is offloaded to disk")
    run.add_argument("--offload-folder", type=Path, help="folder for weights that do not fit in --max-memory-mb")
    run.add_argument("--cheat-noise", type=float, default=0.0, help="add noise of this scale to every answer (demo of a dishonest node)")
    run.add_argument("--password-file", type=Path, help="keystore password file (chain mode; else SHARDMARKET_PASSWORD or a prompt)")
    run.set_defaults(run=run_node)
    add_operator_commands(group)  # register, status, earnings, redeem, ...
    reach.register(group)  # reachability, relay


def run_node(args: argparse.Namespace) -> int:
    import torch

    from shardmarket.engine.errors import EngineError
    from shardmarket.net.wire import DTYPES
    from shardmarket.server.app import NodeSettings, load_service, serve
    from shardmarket.server.service import Fault

    if args.layers is None:
        from shardmarket.cli.operator import run_market_node

        return run_market_node(args)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = load_config()
    threads = args.threads if args.threads is not None else config.node.threads
    if threads:
        torch.set_num_threads(threads)  # the compute thread sets it too (NodeSettings.threads)
    checkpoint = args.checkpoint
    if checkpoint is None:
        from shardmarket.engine.models import default_model

        checkpoint = default_model()
    if not (checkpoint / "config.json").exists():
        print(f"error: {checkpoint} is not a checkpoint folder (no config.json); pass --checkpoint DIR")
        return 2
    port = args.port if args.port is not None else config.node.port
    settings = NodeSettings(
        checkpoint=checkpoint,
        start=args.layers[0],
        end=args.layers[1],
        model_id=args.model_id or checkpoint.name,
        host=args.host or config.node.host,
        port=port,
        tcp_port=args.tcp_port if args.tcp_port is not None else (config.node.tcp_port or port + 1),
        price=args.price if args.price is not None else config.node.price,
        dtype=DTYPES[args.dtype],
        fault=Fault(wrong_shape=args.test_fault == "wrong-shape", noise=args.cheat_noise,
                    forge_commitments=args.test_fault == "forge-commitments"),
        max_memory_mb=args.max_memory_mb,
        offload_folder=args.offload_folder,
        threads=threads or 0,
    )
    print(f"loading layers {settings.start}:{settings.end} of {checkpoint}", flush=True)
    try:
        service = load_service(settings, config)
    except (EngineError, ValueError, OSError) as exc:
        print(f"error: cannot load layers {settings.start}:{settings.end} of {checkpoint}: {exc}")
        return 2
    try:
        asyncio.run(serve(service, settings))
    except OSError as exc:
        print(f"error: cannot listen on {settings.host}:{settings.port}/{settings.tcp_port}: {exc}; pick free ports with --port/--tcp-port")
        return 2
    return 0
