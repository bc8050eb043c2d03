"""`shardmarket ...`: the command line of operators and clients.

Each module of this package adds one group of subcommands with `register(commands)`; the parser
calls the handler it set with `set_defaults(run=...)`, which returns the exit code.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from shardmarket import __version__

GROUPS = [
    "shardmarket.cli.doctor",
    "shardmarket.cli.keys",
    "shardmarket.cli.demo",
    "shardmarket.cli.ipfs",
    "shardmarket.cli.model",
    "shardmarket.cli.engine",
    "shardmarket.cli.node",
    "shardmarket.cli.client",
]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardmarket", description="A market for running LLMs split by layers.")
    parser.add_argument("--version", action="version", version=f"shardmarket {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in GROUPS:
        importlib.import_module(module).register(commands)
    return parser


def main(argv: list[str] | None = None) -> int:
    # Before torch (and its libgomp) loads: OpenMP threads sleep as soon as a step ends (shardmarket/engine/openmp.py says why)
    os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    args = build_parser().parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
