"""`shardmarket doctor`: check every part of the toolchain and say the command that fixes what is missing."""

from __future__ import annotations

import importlib.metadata
import os
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass

from shardmarket import toolchain
from shardmarket.config import load_config


@dataclass
class Check:
    name: str
    ok: bool
    detail: str
    fix: str = ""
    needed: bool = True


def _run(cmd: list[str], timeout: float = 30) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, check=True).stdout


def check_python() -> Check:
    ok = sys.version_info >= (3, 11)
    return Check("python", ok, sys.version.split()[0], "install Python 3.11 or newer")


def check_torch() -> Check:
    try:
        import torch
    except ImportError:
        return Check("torch", False, "not installed", "make setup  (installs torch==2.13.0 first)")
    cuda = f", CUDA {torch.version.cuda}" if torch.cuda.is_available() else ", CPU"
    return Check("torch", True, f"{torch.__version__}{cuda}")


def check_node_js() -> Check:
    path = shutil.which("node")
    if not path:
        return Check("node.js", False, "no `node` on PATH", "apt-get install nodejs  (Node 20 or newer)")
    return Check("node.js", True, _run([path, "--version"]).strip())


def check_solc() -> Check:
    fix = "make setup  (npm ci installs solc; toolchain/solcx exposes it to py-solc-x)"
    if not (toolchain.PROJECT_ROOT / "node_modules" / "solc" / "package.json").exists():
        return Check("solc", False, "npm package solc is missing from node_modules", fix)
    os.environ.setdefault("SOLCX_BINARY_PATH", str(toolchain.SOLCX_DIR))
    try:
        import solcx

        installed = [str(v) for v in solcx.get_installed_solc_versions()]
        if toolchain.SOLC_VERSION not in installed:
            return Check("solc", False, f"py-solc-x sees {installed or 'no version'}, not {toolchain.SOLC_VERSION}", fix)
        solcx.set_solc_version(toolchain.SOLC_VERSION, silent=True)
        source = "// SPDX-License-Identifier: MIT\npragma solidity ^0.8.0; contract C {}"
        out = solcx.compile_standard(
            {
                "language": "Solidity",
                "sources": {"C.sol": {"content": source}},
                "settings": {"outputSelection": {"*": {"*": ["evm.bytecode.object"]}}},
            }
        )["contracts"]
    except Exception as exc:  # any failure here is the thing to report
        return Check("solc", False, f"{type(exc).__name__}: {exc}".splitlines()[0], fix)
    if not out:
        return Check("solc", False, "compiled nothing", fix)
    return Check("solc", True, f"{solcx.get_solc_version(with_commit_hash=True)} via py-solc-x")


def check_anvil() -> Check:
    anvil = toolchain.ANVIL_DIR / "anvil"
    if not anvil.exists():
        return Check("anvil", False, f"{anvil} is missing", "make setup  (npm ci installs @foundry-rs/anvil)")
    return Check("anvil", True, _run([str(anvil), "--version"]).splitlines()[0])


def check_brownie() -> Check:
    fix = "make setup  (adds the brownie network shardmarket-anvil)"
    try:
        version = importlib.metadata.version("eth-brownie")
        import yaml
        from brownie._config import _get_data_folder

        networks = yaml.safe_load((_get_data_folder() / "network-config.yaml").read_text())
    except Exception as exc:
        return Check("brownie", False, f"{type(exc).__name__}: {exc}".splitlines()[0], fix)
    ours = [n for n in networks.get("development", []) if n.get("id") == toolchain.BROWNIE_NETWORK]
    if not ours:
        return Check("brownie", False, f"brownie {version} has no network {toolchain.BROWNIE_NETWORK}", fix)
    net = ours[0]
    if not str(net.get("cmd", "")).startswith("anvil") or net.get("cmd_settings", {}).get("base_fee") != 0:
        return Check("brownie", False, f"network {toolchain.BROWNIE_NETWORK} is not anvil with base_fee 0", fix)
    return Check("brownie", True, f"eth-brownie {version}, network {toolchain.BROWNIE_NETWORK} (anvil, base fee 0)")


def check_ipfs_store() -> Check:
    store = load_config().ipfs.store
    try:
        store.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=store):
            pass
    except OSError as exc:
        return Check("ipfs store", False, f"{store}: {exc.strerror}", f"make {store} writable or set SHARDMARKET_IPFS_STORE")
    free = shutil.disk_usage(store).free / 2**30
    return Check("ipfs store", True, f"{store} is writable, {free:.1f} GiB free")


def check_nat_tools() -> list[Check]:
    if os.geteuid() != 0:
        return [Check("NAT tools", True, "not root: reachability tests will skip", needed=False)]
    tools = {"miniupnpd": "miniupnpd", "turnserver": "coturn", "nft": "nftables", "conntrack": "conntrack", "upnpc": "miniupnpc"}
    missing = [pkg for tool, pkg in tools.items() if not shutil.which(tool)]
    if missing:
        return [Check("NAT tools", False, f"missing {', '.join(missing)}", f"apt-get install -y {' '.join(missing)}")]
    return [Check("NAT tools", True, ", ".join(tools))]


def run_checks() -> list[Check]:
    return [
        check_python(),
        check_torch(),
        check_node_js(),
        check_solc(),
        check_anvil(),
        check_brownie(),
        check_ipfs_store(),
        *check_nat_tools(),
    ]


def register(commands) -> None:
    commands.add_parser("doctor", help="check the toolchain and say how to fix what is missing").set_defaults(
        run=lambda args: main()
    )


def main() -> int:
    checks = run_checks()
    width = max(len(c.name) for c in checks)
    for c in checks:
        mark = "ok  " if c.ok else ("FAIL" if c.needed else "warn")
        print(f"{mark} {c.name:<{width}}  {c.detail}")
        if not c.ok and c.fix:
            print(f"     {'':<{width}}  fix: {c.fix}")
    failed = [c for c in checks if not c.ok and c.needed]
    print("all parts are present" if not failed else f"{len(failed)} part(s) missing: run the fix shown above")
    return 1 if failed else 0
