"""Where the project's own toolchain lives: npm's solc behind py-solc-x, anvil, brownie's network."""

from __future__ import annotations

from pathlib import Path

PROJECT_ROOT = Path(__file__).resolve().parent.parent
SOLC_VERSION = "0.8.28"
SOLCX_DIR = PROJECT_ROOT / "toolchain" / "solcx"
ANVIL_DIR = PROJECT_ROOT / "node_modules" / "@foundry-rs" / "anvil-linux-amd64" / "bin"
BROWNIE_NETWORK = "shardmarket-anvil"
