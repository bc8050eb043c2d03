"""`shardmarket ...`: the command line of operators and clients."""

from __future__ import annotations

import argparse
import sys

from node import __version__


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="shardmarket", description="A market for running LLMs split by layers.")
    parser.add_argument("--version", action="version", version=f"shardmarket {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    commands.add_parser("doctor", help="check the toolchain and say how to fix what is missing")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "doctor":
        from node.doctor import main as doctor

        return doctor()
    return 2


if __name__ == "__main__":
    sys.exit(main())
