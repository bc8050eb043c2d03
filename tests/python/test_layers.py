"""The package's layers hold: each layer imports only the layers below it, and only the CLI reads the config.

engine (compute) and ipfs (content) at the bottom; chain (EIP-712, bindings, keys) and net (wire, crypto,
reachability) above them, neither importing the other; server and client above those, never importing each other;
cli on top. `shardmarket.config` is handed to server and client by the CLI, which alone calls `load_config`.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parents[2] / "shardmarket"
LEAVES = {"", "files", "toolchain"}  # the package itself and modules that import nothing of shardmarket
ALLOWED: dict[str, set[str]] = {
    "engine": {"engine"},
    "ipfs": {"ipfs"},
    "chain": {"chain", "engine", "ipfs"},
    "net": {"net", "engine", "ipfs"},
    "server": {"server", "chain", "net", "engine", "ipfs", "config"},
    "client": {"client", "chain", "net", "engine", "ipfs", "config"},
    "config": set(),
    "cli": {"cli", "server", "client", "chain", "net", "engine", "ipfs", "config"},
    "__main__": {"cli"},
    **{leaf: set() for leaf in LEAVES},
}


def layer_of(module: str) -> str:
    """`shardmarket.chain.keys` -> `chain`; the package itself -> ``."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


def imported_modules(module: str, source: str, is_package: bool = False) -> list[tuple[int, str]]:
    """(line, module) of every import of `source`, at any depth (imports inside functions count too)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            found += [(node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".")[: len(module.split(".")) - node.level + (1 if is_package else 0)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.append((node.lineno, target))
            found += [
                (node.lineno, f"{target}.{alias.name}")
                for alias in node.names
                if target == "shardmarket" and alias.name in ALLOWED
            ]
    return found


def violations(module: str, source: str, is_package: bool = False) -> list[str]:
    """What `module` (with text `source`) does against the layering; empty when it keeps to it."""
    layer = layer_of(module)
    if layer not in ALLOWED:
        return [f"{module}: shardmarket.{layer} belongs to no layer; add it to tests/python/test_layers.py"]
    found = []
    for line, target in imported_modules(module, source, is_package):
        if target != "shardmarket" and not target.startswith("shardmarket."):
            continue
        used = layer_of(target)
        if used not in LEAVES and used != layer and used not in ALLOWED[layer]:
            found.append(f"{module}:{line} imports {target}: the {layer or 'package'} layer may not use {used}")
    if layer not in ("cli", "config"):
        for node in ast.walk(ast.parse(source)):
            reads = isinstance(node, ast.Name) and node.id == "load_config"
            reads |= isinstance(node, ast.ImportFrom) and any(alias.name == "load_config" for alias in node.names)
            if reads:
                found.append(f"{module}:{node.lineno} reads the config itself: take what it needs as arguments from the CLI")
    return found


def package_modules() -> list[tuple[str, Path]]:
    modules = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        modules.append((name, path))
    return modules


def test_every_module_keeps_to_its_layer():
    found = []
    for name, path in package_modules():
        found += violations(name, path.read_text(), is_package=path.name == "__init__.py")
    assert not found, "\n".join(found)


@pytest.mark.parametrize(
    ("module", "source"),
    [
        ("shardmarket.engine.stage", "from shardmarket.server.worker import StageWorker"),
        ("shardmarket.ipfs.model", "def f():\n    from shardmarket.config import load_config\n    return load_config()"),
        ("shardmarket.chain.keys", "from shardmarket.net.crypto import public_bytes"),
        ("shardmarket.net.commitment", "from shardmarket.chain import eip712"),
        ("shardmarket.client.generation", "from shardmarket.server.worker import PASSIVE_OPENMP"),
        ("shardmarket.server.app", "import shardmarket.client.routing"),
        ("shardmarket.server.daemon", "from shardmarket.config import load_config"),
        ("shardmarket.chain.keys", "from ..server.identity import NodeIdentity"),
        ("shardmarket.files", "from shardmarket.chain import keys"),
        ("shardmarket.newlayer.thing", "import os"),
    ],
)
def test_a_forbidden_import_is_caught(module, source):
    assert violations(module, source)


@pytest.mark.parametrize(
    ("module", "source"),
    [
        (
            "shardmarket.chain.evidence",
            "from shardmarket.ipfs.blockstore import Blockstore\nfrom shardmarket.engine.tensors import tensor_bytes",
        ),
        ("shardmarket.server.daemon", "from shardmarket.config import Config\nfrom shardmarket.chain.contracts import Market"),
        ("shardmarket.cli.node", "from shardmarket.config import load_config\nload_config()"),
        ("shardmarket.net.wire", "from . import crypto\nfrom shardmarket.files import write_private"),
    ],
)
def test_an_allowed_import_passes(module, source):
    assert violations(module, source) == []
