"""GGUF import: dequantize a llama.cpp model of any quantization the `gguf` package reads (Q4_K, Q5_K, Q6_K, Q8_0, ...)
tensor by tensor into a safetensors checkpoint of a chosen weight format, one file per layer.

Only one tensor is dequantized at a time and each layer is written (and converted) once its tensors are all read, so
memory holds one layer and the embeddings, not the model. transformers supplies what llama.cpp changed on the way in:
the config, the tokenizer, the tensor names, and the processors that undo its permuted q/k rows (Llama) and its
(1 + w) norms (Gemma).
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import numpy as np
import torch
from accelerate import init_empty_weights
from safetensors.torch import save_file
from tqdm import tqdm
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, GenerationConfig

from shardmarket.engine.architecture import family_of
from shardmarket.engine.errors import EngineError
from shardmarket.engine.formats import check_format, convert, convert_shard

LAYER = re.compile(r"^model\.layers\.(\d+)\.")


def read_gguf(gguf_path: Path, folder: Path, weights: str | None = None, progress: bool = True) -> None:
    """Write `gguf_path` into the empty `folder` as a checkpoint whose layers hold `weights` (default float32)."""
    from gguf import GGUFReader, dequantize
    from transformers.modeling_gguf_pytorch_utils import TENSOR_PROCESSORS, TensorProcessor, get_gguf_hf_weights_map

    target = check_format(weights or "float32")
    config = AutoConfig.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    family_of(config)
    config.__dict__.pop("quantization_config", None)  # the checkpoint holds plain weights
    with init_empty_weights():
        model = AutoModelForCausalLM.from_config(config)
    config.architectures = [type(model).__name__]
    config.dtype = torch.float32  # of the values before any conversion, as transformers' own import writes it
    expected = {name: tuple(t.shape) for name, t in model.state_dict().items()}
    reader = GGUFReader(gguf_path)
    architecture = reader.fields["general.architecture"].contents()
    processor = TENSOR_PROCESSORS.get(architecture, TensorProcessor)(config=config.to_dict())
    names = get_gguf_hf_weights_map(model, processor)
    if config.tie_word_embeddings:
        expected.pop("lm_head.weight", None)
    layers: dict[int | str, dict[str, torch.Tensor]] = {}
    wanted: dict[int | str, set[str]] = {}
    for name in expected:
        key = _group(name)
        wanted.setdefault(key, set()).add(name)
    weight_map: dict[str, str] = {}
    for tensor in tqdm(reader.tensors, desc=f"dequantize {gguf_path.name}", unit="tensor", disable=not progress):
        result = processor.process(
            weights=dequantize(tensor.data, tensor.tensor_type), name=tensor.name, tensor_key_mapping=names, parsed_parameters={}
        )
        name = names.get(result.name)
        if name is None or name not in expected:
            continue  # e.g. rope_freqs, which transformers computes from the config
        value = torch.from_numpy(np.array(result.weights, dtype=np.float32))  # a copy: F32 tensors are views of the file
        if tuple(value.shape) != expected[name]:
            want = list(expected[name])
            raise EngineError(f"{gguf_path.name}: {tensor.name} has shape {list(value.shape)}, the config wants {want}")
        key = _group(name)
        layers.setdefault(key, {})[name] = value
        if set(layers[key]) == wanted[key]:
            weight_map.update(_write(folder, key, layers.pop(key), target))
    missing = sorted(name for group in wanted.values() for name in group if name not in weight_map)
    if missing:
        raise EngineError(f"{gguf_path.name} lacks tensors the config needs: {missing[:5]}")
    total = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    config.save_pretrained(folder)
    GenerationConfig.from_model_config(config).save_pretrained(folder)
    AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name).save_pretrained(folder)


def _group(name: str) -> int | str:
    match = LAYER.match(name)
    return int(match.group(1)) if match else "head"


def _write(folder: Path, key: int | str, tensors: dict[str, torch.Tensor], target: str) -> dict[str, str]:
    """One layer (or the head: embeddings, final norm, LM head) in `target`'s format, as its own file."""
    if key == "head":
        tensors, _ = convert_shard("head", tensors, target)
        file = "head.safetensors"
    else:
        tensors = convert(tensors, target)
        file = f"layer-{key:05d}.safetensors"
    save_file({name: t.contiguous() for name, t in tensors.items()}, str(folder / file), metadata={"format": "pt"})
    return dict.fromkeys(tensors, file)
