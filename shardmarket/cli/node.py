"""`shardmarket node run`: serve a layer range of a model, free (`--layers`) or paid, as this operator registered on
chain; the other `node` commands come from `operator` and `reach`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
from pathlib import Path

from shardmarket.cli import reach
from shardmarket.cli.ipfs import content_store
from shardmarket.cli.keys import home_keys
from shardmarket.cli.operator import add_operator_commands, deployment_advice, parse_layers
from shardmarket.config import load_config

DTYPE_NAMES = ["bfloat16", "float16", "float32"]  # shardmarket.net.wire.DTYPES, named without importing torch (a test checks)
WEIGHT_FORMATS = ["float32", "bfloat16", "float16", "int8"]  # shardmarket.engine.formats.FORMATS, likewise
TEST_FAULTS = ["wrong-shape", "equivocate", "forge-commitments"]


def register(commands) -> None:
    group = commands.add_parser("node", help="run a node that serves layers of a model").add_subparsers(
        dest="node_command", required=True
    )
    run = group.add_parser("run", help="serve a layer range of a checkpoint over encrypted sessions")
    run.add_argument("--checkpoint", type=Path, help="Hugging Face checkpoint folder (default: the imported default model)")
    run.add_argument(
        "--layers",
        type=parse_layers,
        help="layer range A:B (half-open); without it: serve this operator's registration from the chain, paid",
    )
    run.add_argument("--model-id", help="model name clients match on (default: the checkpoint folder's name)")
    run.add_argument("--host", help="listen address (config node.host)")
    run.add_argument("--port", type=int, help="port of /info, /health and sessions over WebSocket and raw TCP (config node.port)")
    run.add_argument("--price", type=int, help="token units per token processed (config node.price)")
    run.add_argument(
        "--dtype",
        choices=["auto", *DTYPE_NAMES],
        default="auto",
        help="activation dtype, announced in /info (default auto: bfloat16/float16 on a GPU; on a CPU bfloat16 for "
        "bfloat16 weights where the CPU has native bfloat16, else float32)",
    )
    run.add_argument(
        "--weights",
        choices=WEIGHT_FORMATS,
        help="convert the layers to this coarser weight format when loading (default: as the shards hold them)",
    )
    run.add_argument("--threads", type=int, help="torch threads (config node.threads)")
    run.add_argument("--test-fault", choices=TEST_FAULTS, help="misbehave on purpose (for tests of clients and verifiers)")
    run.add_argument(
        "--max-memory-mb", type=float, help="CPU memory for this node's weights; what does not fit is offloaded to disk"
    )
    run.add_argument(
        "--gpu-memory-mb",
        type=float,
        help="memory of the first GPU for this node's weights; what does not fit goes to the CPU (--max-memory-mb), then "
        "to disk (default: every layer on the GPU where there is one)",
    )
    run.add_argument("--offload-folder", type=Path, help="folder for weights that fit in neither memory budget")
    run.add_argument(
        "--cheat-noise", type=float, default=0.0, help="add noise of this scale to every answer (demo of a dishonest node)"
    )
    run.add_argument(
        "--password-file", type=Path, help="keystore password file (chain mode; else SHARDMARKET_PASSWORD or a prompt)"
    )
    run.set_defaults(run=run_node)
    from shardmarket.cli import up  # it takes DTYPE_NAMES from here

    up.register(group)
    add_operator_commands(group)  # register, status, earnings, redeem, ...
    reach.register(group)  # reachability, relay


def run_node(args: argparse.Namespace) -> int:
    """Build the daemon from the arguments and the config, and serve until SIGINT/SIGTERM."""
    from web3.exceptions import BadFunctionCallOutput

    from shardmarket.chain.contracts import ChainError
    from shardmarket.chain.keys import KeystoreError, read_password
    from shardmarket.engine.errors import EngineError
    from shardmarket.ipfs.model import ModelError
    from shardmarket.server.daemon import ServeOptions, build_daemon
    from shardmarket.server.faults import Fault
    from shardmarket.server.identity import load_identity

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    fault = Fault(
        wrong_shape=args.test_fault == "wrong-shape",
        noise=args.cheat_noise,
        equivocate=args.test_fault == "equivocate",
        forge_commitments=args.test_fault == "forge-commitments",
    )
    options = ServeOptions(
        layers=args.layers,
        checkpoint=args.checkpoint,
        model_id=args.model_id,
        host=args.host,
        port=args.port,
        price=args.price,
        dtype=args.dtype,
        weights=args.weights,
        threads=args.threads,
        max_memory_mb=args.max_memory_mb,
        gpu_memory_mb=args.gpu_memory_mb,
        offload_folder=args.offload_folder,
        fault=fault,
    )
    try:
        identity = None if options.layers else load_identity(read_password(args.password_file), home_keys())
        daemon = build_daemon(options, load_config(), identity, content_store())
    except (ChainError, KeystoreError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except BadFunctionCallOutput:
        print(f"error: the contracts do not answer as shardmarket's contracts do: {deployment_advice()}", file=sys.stderr)
        return 1
    except (EngineError, ModelError, ValueError, OSError) as exc:
        print(f"error: cannot load the node's layers: {exc}", file=sys.stderr)
        return 2
    try:
        asyncio.run(daemon.run())
    except OSError as exc:
        print(
            f"error: cannot listen on {daemon.host}:{daemon.port}: {exc}; pick a free port with --port",
            file=sys.stderr,
        )
        return 2
    return 0
