"""The model families the engine runs and the transformers classes each one is built from."""

from __future__ import annotations

import copy
import importlib
import inspect
from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig

from shardmarket.engine.errors import UnsupportedModel

# model_type -> (transformers module, class prefix)
FAMILIES = {
    "llama": ("llama", "Llama"),  # Llama 2 and 3.x (rope_scaling "llama3")
    "mistral": ("mistral", "Mistral"),
    "qwen2": ("qwen2", "Qwen2"),
    "qwen3": ("qwen3", "Qwen3"),  # q/k norms
    "gemma2": ("gemma2", "Gemma2"),  # (1 + w) norms around attention and MLP, soft-capped attention and logits
    "gemma3_text": ("gemma3", "Gemma3"),  # q/k norms, local and global layers with their own RoPE
}
ATTENTION = "shardmarket"  # the attention implementation registered by shardmarket.engine.attention


@dataclass(frozen=True)
class Family:
    """The building blocks of one family: decoder layer, rotary embedding, RMS norm, and what the head does otherwise."""

    decoder_layer: type[nn.Module]
    rotary_embedding: type[nn.Module]
    rms_norm: type[nn.Module]
    rope_per_layer_type: bool  # the rotary embedding is computed per layer type (Gemma 3: local and global bases)
    scales_embeddings: bool  # embeddings are multiplied by sqrt(hidden_size) (Gemma)


def family_of(config: PretrainedConfig) -> Family:
    """The transformers classes for `config`; UnsupportedModel for any other architecture."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModel(f"model type {model_type!r} is not supported; use a {', '.join(FAMILIES)} checkpoint")
    module_name, prefix = FAMILIES[model_type]
    module = importlib.import_module(f"transformers.models.{module_name}.modeling_{module_name}")
    rotary = getattr(module, f"{prefix}RotaryEmbedding")
    return Family(
        getattr(module, f"{prefix}DecoderLayer"),
        rotary,
        getattr(module, f"{prefix}RMSNorm"),
        "layer_type" in inspect.signature(rotary.forward).parameters,
        prefix.startswith("Gemma"),
    )


def stage_config(config: PretrainedConfig, start: int, end: int) -> PretrainedConfig:
    """A copy of `config` describing layers [start, end) renumbered from 0, using the stage attention."""
    sliced = copy.deepcopy(config)
    sliced.num_hidden_layers = end - start
    if getattr(config, "layer_types", None) is not None:
        sliced.layer_types = list(config.layer_types[start:end])
    sliced._attn_implementation = ATTENTION
    return sliced
