"""Read chosen tensors of a safetensors checkpoint folder without touching the others."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable
from pathlib import Path

import torch
from safetensors import safe_open

from shardmarket.engine.errors import EngineError

LAYER_PREFIX = "model.layers."


def tensor_index(checkpoint: Path) -> dict[str, Path]:
    """Map every tensor name of the folder to its file (from the index json, else the file headers)."""
    checkpoint = Path(checkpoint)
    index_file = checkpoint / "model.safetensors.index.json"
    if index_file.exists():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        return {name: checkpoint / file for name, file in weight_map.items()}
    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        raise EngineError(f"{checkpoint} holds no .safetensors file; import or fetch the model first")
    index: dict[str, Path] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            index.update(dict.fromkeys(f.keys(), file))
    return index


def read_tensors(index: dict[str, Path], names: Iterable[str]) -> dict[str, torch.Tensor]:
    """Read `names` only, opening each file once."""
    by_file: dict[Path, list[str]] = defaultdict(list)
    for name in names:
        if name not in index:
            raise EngineError(f"tensor {name} is missing from the checkpoint; the shard is incomplete")
        by_file[index[name]].append(name)
    tensors = {}
    for file, file_names in by_file.items():
        with safe_open(file, framework="pt") as f:
            tensors.update({name: f.get_tensor(name) for name in file_names})
    return tensors


def layer_tensors(index: dict[str, Path], start: int, end: int) -> dict[str, torch.Tensor]:
    """The tensors of layers [start, end), renamed `layers.<i - start>.<rest>`."""
    renamed = {}
    for name in index:
        if not name.startswith(LAYER_PREFIX):
            continue
        number, rest = name[len(LAYER_PREFIX) :].split(".", 1)
        if start <= int(number) < end:
            renamed[name] = f"layers.{int(number) - start}.{rest}"
    tensors = read_tensors(index, renamed)
    return {renamed[name]: tensor for name, tensor in tensors.items()}
