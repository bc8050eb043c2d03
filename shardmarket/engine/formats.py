"""Weight formats of a model's layers: float32, bfloat16, float16, and int8 weight-only with one scale per output channel.

An int8 matrix `x.weight` is stored as int8 with its scales in `x.weight_scale` (float32 holding bfloat16 values, one
per output row); the norms and biases of int8 layers stay float32. A format can be converted to a coarser one only
(float32 to anything, bfloat16 or float16 to int8), so every node converting the same shards gets the same weights,
bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from shardmarket.engine.errors import EngineError

FLOATS = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
FORMATS = (*FLOATS, "int8")
ALIASES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
SCALE_SUFFIX = "_scale"
HEAD_FORMAT = {"int8": "bfloat16"}  # embeddings and LM head of int8 shards: quantizing them costs the most accuracy


def format_name(dtype: torch.dtype) -> str:
    """The format name of a float dtype (`torch.bfloat16` -> "bfloat16")."""
    return str(dtype).removeprefix("torch.")


def check_format(name: str) -> str:
    """The weight format `name` names (fp32, bf16 and fp16 are short names), else EngineError naming the choices."""
    name = ALIASES.get(name, name)
    if name not in FORMATS:
        raise EngineError(f"unknown weight format {name!r}; choose one of {', '.join(FORMATS)} (or fp32, bf16, fp16)")
    return name


def can_convert(source: str, target: str) -> bool:
    """Whether weights stored as `source` can be turned into `target` (the same or a coarser format)."""
    return source == target or source == "float32" or target == "int8"


def quantize_int8(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Symmetric int8 of a matrix [out, in] with one scale per output row (max |w| maps to 127).

    The scales are rounded to bfloat16 before the weights are, since Int8Linear multiplies by them in 16 bits: rounding
    them after would scale each row's weights by up to 0.4 % more than its quantization error."""
    w = weight.to(torch.float32)
    scale = (w.abs().amax(dim=1) / 127).to(torch.bfloat16).to(torch.float32)
    scale = torch.where(scale > 0, scale, torch.ones_like(scale))  # an all-zero row stays zero with any scale
    return torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8), scale


def is_matrix(name: str, tensor: torch.Tensor) -> bool:
    """A linear layer's weight: what int8 quantizes (norms, biases and scales are vectors)."""
    return name.endswith(".weight") and tensor.dim() == 2


def stored_format(tensors: dict[str, torch.Tensor]) -> str:
    """The format of a set of layer tensors: int8 if they hold scales, else the dtype of their matrices."""
    if any(name.endswith(SCALE_SUFFIX) for name in tensors):
        return "int8"
    dtypes = {format_name(t.dtype) for name, t in tensors.items() if is_matrix(name, t)}
    if len(dtypes) != 1 or not dtypes <= set(FLOATS):
        raise EngineError(f"the layers' matrices are {sorted(dtypes)}; a shard holds one format of {', '.join(FORMATS)}")
    return dtypes.pop()


def convert(tensors: dict[str, torch.Tensor], target: str) -> dict[str, torch.Tensor]:
    """Layer tensors in the `target` format (see the module docstring); EngineError for a conversion to a finer format."""
    source, target = stored_format(tensors), check_format(target)
    if not can_convert(source, target):
        raise EngineError(f"weights stored as {source} cannot become {target}; use {source} or a coarser format")
    if source == target:
        return dict(tensors)
    out: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        if target == "int8" and is_matrix(name, tensor):
            out[name], out[name + SCALE_SUFFIX] = quantize_int8(tensor)
        elif tensor.is_floating_point():
            out[name] = tensor.to(torch.float32 if target == "int8" else FLOATS[target])
        else:
            out[name] = tensor
    return out


def convert_shard(kind: str, tensors: dict[str, torch.Tensor], target: str | None) -> tuple[dict[str, torch.Tensor], str]:
    """One shard of `model pack --dtype target` (None: as stored) and the format it holds. `kind` is "layer", or "head"
    for the embeddings, final norm and LM head, which are cast to HEAD_FORMAT's choice where that is no finer."""
    if kind == "layer":
        converted = convert(tensors, target) if target else dict(tensors)
        return converted, stored_format(converted)
    stored = format_name(next(t.dtype for name, t in sorted(tensors.items()) if t.is_floating_point()))
    wanted = HEAD_FORMAT.get(target, target) if target else stored
    if wanted not in FLOATS or not can_convert(stored, wanted):
        wanted = stored
    return {name: t.to(FLOATS[wanted]) if t.is_floating_point() else t for name, t in tensors.items()}, wanted


@dataclass(frozen=True)
class Numerics:
    """How a node computes its layers: the format of its weights and the dtype of its hidden states (what travels)."""

    weights: str
    dtype: str

    def __str__(self) -> str:
        return f"{self.weights} weights, {self.dtype} activations"


def effective_weights(weights: str, dtype: torch.dtype) -> str:
    """The weights a stage computes with: float weights are cast to the activation dtype, int8 ones stay int8."""
    if weights == "int8" or dtype == torch.float32:
        return weights
    return format_name(dtype)


def kernel_dtype(dtype: torch.dtype) -> torch.dtype:
    """The dtype int8 matrices multiply in: the 16-bit activation dtype itself, bfloat16 under float32 activations."""
    return dtype if dtype in (torch.bfloat16, torch.float16) else torch.bfloat16


class Int8Linear(nn.Module):
    """A linear layer with int8 weights and per-output-channel scales: y = round16((x16 @ q.T) * scale16) (+ bias).

    x16 and scale16 are the activations and scales rounded to kernel_dtype; products accumulate in float32 and the
    result is rounded once, the same on every device, so two honest nodes agree to float32 accumulation order.
    CPUs use torch's _weight_int8pack_mm, which reads the int8 weights directly (6x faster than a float32
    matrix-vector product on an AVX512 CPU, and 20x faster than the same kernel with float32 activations);
    GPUs multiply the weights cast to 16 bits with a float32 output."""

    def __init__(self, in_features: int, out_features: int, bias: bool) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features, dtype=torch.int8), requires_grad=False)
        self.weight_scale = nn.Parameter(torch.empty(out_features, dtype=torch.float32), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features), requires_grad=False) if bias else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = kernel_dtype(x.dtype)
        rows = x.reshape(-1, self.in_features).to(dtype)
        scale = self.weight_scale.to(dtype)
        if rows.device.type == "cpu":
            out = torch._weight_int8pack_mm(rows, self.weight, scale)
        else:
            out = (torch.mm(rows, self.weight.to(dtype).t(), out_dtype=torch.float32) * scale.float()).to(dtype)
        out = out.to(x.dtype).reshape(*x.shape[:-1], self.out_features)
        return out if self.bias is None else out + self.bias


def use_int8_linears(body: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Replace every nn.Linear of `body` whose weight is int8 in `tensors` by an Int8Linear (on the meta device)."""
    for name, module in list(body.named_modules()):
        weight = tensors.get(f"{name}.weight")
        if isinstance(module, nn.Linear) and weight is not None and weight.dtype == torch.int8:
            parent, _, child = name.rpartition(".")
            with torch.device("meta"):
                replacement = Int8Linear(module.in_features, module.out_features, module.bias is not None)
            setattr(body.get_submodule(parent) if parent else body, child, replacement)


def placed_dtype(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.dtype:
    """The dtype a stage keeps a tensor in: int8 weights and their float32 scales as stored, floats in `dtype`."""
    if tensor.dtype == torch.int8 or name.endswith(SCALE_SUFFIX):
        return tensor.dtype
    return dtype


def honest_numerics(stored: str, dtype: str) -> list[Numerics]:
    """Every numerics an honest node may compute in with `dtype` activations from weights stored as `stored`."""
    found: list[Numerics] = []
    for weights in FORMATS:
        numerics = Numerics(effective_weights(weights, FLOATS[dtype]), dtype)
        if can_convert(stored, weights) and numerics not in found:
            found.append(numerics)
    return found


# Tolerances on the relative difference ||a - b|| / ||b|| of the outputs of one hop (chain.evidence.relative_difference).
# Two nodes computing in the same numerics differ by float32 accumulation order: `base` (configured) for float32, and
# SAME_16BIT_FACTOR times more where results are rounded to 16 bits, since two kernels (a CPU's, a GPU's) may round
# different intermediate values. Across numerics, honest outputs differ by the formats' rounding: FORMAT_ERROR is the
# largest hop difference measured against float32 (tiny random models from their embeddings, SmolLM2 hops of 10
# layers), with margin. Such a tolerance only catches gross errors, so checkers re-run a hop in the node's numerics.
SAME_16BIT_FACTOR = 4
FORMAT_ERROR = {"float32": 0.0, "float16": 0.01, "bfloat16": 0.05, "int8": 0.1}


def format_error(numerics: Numerics) -> float:
    """How far an honest hop in `numerics` may be from float32 (int8 matrices multiply in 16 bits on top)."""
    error = FORMAT_ERROR[numerics.weights]
    return error + FORMAT_ERROR[numerics.dtype] if numerics.weights == "int8" else error


def tolerance(a: Numerics, b: Numerics, base: float) -> float:
    """Largest relative difference between honest outputs of one hop computed in `a` and in `b`."""
    if a == b:
        rounds_to_16_bits = a.dtype != "float32" or a.weights == "int8"
        return base * SAME_16BIT_FACTOR if rounds_to_16_bits else base
    return base + format_error(a) + format_error(b)
