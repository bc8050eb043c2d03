"""The model families the engine runs and the transformers classes each one is built from."""

from __future__ import annotations

import copy
import importlib
from dataclasses import dataclass

from torch import nn
from transformers import PretrainedConfig

from shardmarket.engine.errors import UnsupportedModel

FAMILIES = {"llama": "Llama", "mistral": "Mistral", "qwen2": "Qwen2"}
ATTENTION = "shardmarket"  # the attention implementation registered by shardmarket.engine.attention


@dataclass(frozen=True)
class Family:
    """The building blocks of one family: decoder layer, rotary embedding, RMS norm."""

    decoder_layer: type[nn.Module]
    rotary_embedding: type[nn.Module]
    rms_norm: type[nn.Module]


def family_of(config: PretrainedConfig) -> Family:
    """The transformers classes for `config`; UnsupportedModel for any other architecture."""
    model_type = getattr(config, "model_type", None)
    if model_type not in FAMILIES:
        raise UnsupportedModel(f"model type {model_type!r} is not supported; use a {', '.join(FAMILIES)} checkpoint")
    module = importlib.import_module(f"transformers.models.{model_type}.modeling_{model_type}")
    prefix = FAMILIES[model_type]
    return Family(
        getattr(module, f"{prefix}DecoderLayer"),
        getattr(module, f"{prefix}RotaryEmbedding"),
        getattr(module, f"{prefix}RMSNorm"),
    )


def stage_config(config: PretrainedConfig, start: int, end: int) -> PretrainedConfig:
    """A copy of `config` describing layers [start, end) renumbered from 0, using the stage attention."""
    sliced = copy.deepcopy(config)
    sliced.num_hidden_layers = end - start
    if getattr(config, "layer_types", None) is not None:
        sliced.layer_types = list(config.layer_types[start:end])
    sliced._attn_implementation = ATTENTION
    return sliced
