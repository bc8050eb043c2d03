"""Place a stage's layers with accelerate: a device map from `max_memory`, weights on GPU, CPU or disk."""

from __future__ import annotations

import logging
from pathlib import Path

import torch
from accelerate import dispatch_model
from accelerate.utils import (
    get_max_memory,
    infer_auto_device_map,
    offload_weight,
    save_offload_index,
    set_module_tensor_to_device,
)
from torch import nn

from shardmarket.engine.errors import EngineError
from shardmarket.engine.formats import placed_dtype

log = logging.getLogger(__name__)


def default_device() -> str:
    """The first GPU when there is one, else the CPU."""
    return "cuda:0" if torch.cuda.is_available() else "cpu"


def uses_gpu(max_memory: dict | None) -> bool:
    """Whether a stage placed within `max_memory` (None: everything on the default device) computes on a GPU."""
    if not torch.cuda.is_available():
        return False
    return not max_memory or any(key not in ("cpu", "disk") for key in max_memory)


def memory_budget(gpu_mb: float | None, cpu_mb: float | None) -> dict | None:
    """accelerate's max_memory for a node's weights from MiB budgets (None for both: all on the default device).

    With a GPU budget the layers fill the first GPU, then the CPU (all it has free when `cpu_mb` is None), then the
    offload folder; with a CPU budget only, the node computes on the CPU."""
    if gpu_mb is None:
        return None if cpu_mb is None else {"cpu": int(cpu_mb * 2**20)}
    cpu = int(cpu_mb * 2**20) if cpu_mb is not None else int(get_max_memory()["cpu"])
    return {0: int(gpu_mb * 2**20), "cpu": cpu}


def check_devices(max_memory: dict | None) -> None:
    """EngineError when `max_memory` gives memory to a GPU that torch does not see."""
    gpus = [key for key in max_memory or {} if key not in ("cpu", "disk")]
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    missing = [gpu for gpu in gpus if int(str(gpu).removeprefix("cuda:")) >= count]
    if missing:
        raise EngineError(
            f"max_memory gives memory to GPU {missing} but torch sees {count} CUDA device(s); "
            "drop the GPU budget or install torch with CUDA"
        )


def best_dtype(weights: str, gpu: bool) -> torch.dtype:
    """The activation dtype a node's hardware computes `weights` best in.

    GPUs: bfloat16 where supported, else float16. CPUs: bfloat16 for bfloat16 weights on a CPU with native bfloat16
    (AVX512-BF16 or AMX), else float32; int8 weights multiply in 16 bits inside Int8Linear whatever the activations."""
    if gpu:
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    if weights == "bfloat16" and torch.ops.mkldnn._is_mkldnn_bf16_supported():
        return torch.bfloat16
    return torch.float32


def device_map_for(
    body: nn.Module, max_memory: dict | None, dtype: torch.dtype, no_split: list[str], offload_folder: Path | None
) -> dict[str, str | int]:
    """accelerate's device map of `body` (on the meta device) within `max_memory`; everything on one device without it."""
    if not max_memory:
        return {"": default_device()}
    limits = dict(max_memory)
    if offload_folder is not None:
        limits.setdefault("disk", 2**62)  # "disk" means unbounded: the offload folder holds what does not fit
    device_map = infer_auto_device_map(body, max_memory=limits, no_split_module_classes=no_split, dtype=dtype)
    if "disk" in device_map.values() and offload_folder is None:
        raise EngineError(f"max_memory {max_memory} cannot hold the stage's layers; give an offload folder or more memory")
    log.info("device map of the stage within max_memory %s: %s", max_memory, dict(device_map))
    return device_map


def device_of(name: str, device_map: dict[str, str | int]) -> str | int:
    """The device of parameter/module `name`: the entry of its longest prefix in `device_map`."""
    best = max((key for key in device_map if key == "" or name == key or name.startswith(key + ".")), key=len, default=None)
    if best is None:
        raise EngineError(f"the device map has no entry for {name}")
    return device_map[best]


def cache_device(placed: str | int, main: torch.device) -> torch.device:
    """Where the KV cache of a layer placed on `placed` lives: on its GPU; for a layer on the CPU or disk, on the main
    device, where its weights are brought to compute (so a GPU node keeps every cache on a GPU)."""
    if placed in ("cpu", "disk"):
        return main
    return torch.device(f"cuda:{placed}" if isinstance(placed, int) else placed)


def main_device(device_map: dict[str, str | int]) -> torch.device:
    """Where computation runs: the first GPU of the map, else the CPU (CPU and disk weights are brought there)."""
    gpus = [d for d in device_map.values() if d not in ("cpu", "disk")]
    return torch.device(f"cuda:{gpus[0]}" if isinstance(gpus[0], int) else gpus[0]) if gpus else torch.device("cpu")


def place_weights(
    body: nn.Module,
    tensors: dict[str, torch.Tensor],
    device_map: dict[str, str | int],
    dtype: torch.dtype,
    offload_dir: Path | None,
) -> None:
    """Fill `body`'s meta parameters from `tensors` on their devices (disk ones into `offload_dir`), then dispatch."""
    expected = {name for name, _ in body.named_parameters()}
    missing, unexpected = expected - set(tensors), set(tensors) - expected
    if missing or unexpected:
        raise EngineError(
            f"the checkpoint does not match the config: missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
    index: dict = {}
    for name, tensor in tensors.items():
        device = device_of(name, device_map)
        placed = placed_dtype(name, tensor, dtype)
        if device == "disk":
            index = offload_weight(tensor.to(placed), name, str(offload_dir), index=index)
        else:
            # A copy: safetensors tensors are backed by the file's mmap, whose first touch would land on a decode step.
            value = tensor.to(dtype=placed, copy=True) if tensor.device.type == "cpu" else tensor.to(placed)
            set_module_tensor_to_device(body, name, device, value=value, dtype=placed)
    if index:
        save_offload_index(index, str(offload_dir))
    if len(set(device_map.values())) > 1 or "disk" in device_map.values():
        dispatch_model(body, device_map, main_device=main_device(device_map), offload_dir=offload_dir)
