"""GGUF import: a tiny llama.cpp file whose matrices use a dozen quantization types (random blocks, a byte-level
tokenizer) dequantizes to exactly what transformers' own GGUF loader reads, in float32 or straight to int8
shards; `model pack FILE.gguf --dtype int8` packs it."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType, GGUFReader, GGUFWriter
from gguf.constants import GGML_QUANT_SIZES
from transformers import AutoModelForCausalLM

from shardmarket.cli import main
from shardmarket.engine.models import import_gguf
from shardmarket.engine.stage import Stage
from shardmarket.engine.tokenizer import CHATML, SPECIAL, byte_level_tokenizer
from shardmarket.engine.weights import read_tensors, tensor_index

Q = GGMLQuantizationType
# the matrices cycle through these; the float16 fields of each block (its scales) are set to sane values
FLOAT16_FIELDS = {
    Q.Q4_K: [0, 2],
    Q.Q5_K: [0, 2],
    Q.Q6_K: [208],
    Q.Q8_0: [0],
    Q.Q2_K: [80, 82],
    Q.Q3_K: [108],
    Q.Q4_0: [0],
    Q.Q4_1: [0, 2],
    Q.Q5_0: [0],
    Q.Q5_1: [0, 2],
    Q.F16: None,
    Q.BF16: None,
}
HIDDEN, FFN, LAYERS, VOCAB = 256, 512, 2, 384
SIZES = {
    "llama.block_count": LAYERS,
    "llama.context_length": 2048,
    "llama.embedding_length": HIDDEN,
    "llama.feed_forward_length": FFN,
    "llama.attention.head_count": 4,
    "llama.attention.head_count_kv": 2,
    "llama.rope.dimension_count": HIDDEN // 4,
}


def quantized(rng: np.random.Generator, qtype: GGMLQuantizationType, rows: int, cols: int) -> np.ndarray:
    """Random rows of `qtype` blocks: what a quantizer could have written."""
    if qtype == Q.F16:
        return (rng.standard_normal((rows, cols)) * 0.05).astype(np.float16)
    if qtype == Q.BF16:
        return (
            ((rng.standard_normal((rows, cols)) * 0.05).astype(np.float32).view(np.uint32) >> 16).astype(np.uint16).view(np.uint8)
        )
    block, size = GGML_QUANT_SIZES[qtype]
    blocks = rng.integers(0, 256, (rows, cols // block, size), dtype=np.uint8)
    for offset in FLOAT16_FIELDS[qtype]:
        scales = rng.uniform(0.0005, 0.005, (rows, cols // block)).astype(np.float16)
        blocks[..., offset : offset + 2] = scales.view(np.uint8).reshape(rows, cols // block, 2)
    return blocks.reshape(rows, -1)


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    writer = GGUFWriter(path, "llama")
    tokenizer = json.loads(byte_level_tokenizer(VOCAB).backend_tokenizer.to_str())["model"]
    tokens = sorted(tokenizer["vocab"], key=tokenizer["vocab"].get)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3 if token in SPECIAL else 1 for token in tokens])  # 3: control
    writer.add_token_merges([" ".join(pair) for pair in tokenizer["merges"]])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_chat_template(CHATML)
    for key, value in SIZES.items():
        writer.add_uint32(key, value)
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.add_float32("llama.attention.layer_norm_rms_epsilon", 1e-5)
    rng = np.random.default_rng(0)
    types = iter(list(FLOAT16_FIELDS) * 4)
    matrices = {"attn_q": (HIDDEN, HIDDEN), "attn_k": (HIDDEN // 2, HIDDEN), "attn_v": (HIDDEN // 2, HIDDEN)}
    matrices |= {"attn_output": (HIDDEN, HIDDEN), "ffn_gate": (FFN, HIDDEN), "ffn_up": (FFN, HIDDEN), "ffn_down": (HIDDEN, FFN)}
    tensors = {"token_embd.weight": (VOCAB, HIDDEN), "output.weight": (VOCAB, HIDDEN)}
    tensors |= {f"blk.{i}.{name}.weight": shape for i in range(LAYERS) for name, shape in matrices.items()}
    for name, (rows, cols) in tensors.items():
        qtype = next(types)
        writer.add_tensor(name, quantized(rng, qtype, rows, cols), raw_dtype=qtype)
    for name in ["output_norm.weight"] + [f"blk.{i}.{n}.weight" for i in range(LAYERS) for n in ("attn_norm", "ffn_norm")]:
        writer.add_tensor(name, (1 + 0.1 * rng.standard_normal(HIDDEN)).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


def test_every_quantization_dequantizes_as_transformers_reads_it(tiny_gguf, tmp_path):
    assert {t.tensor_type for t in GGUFReader(tiny_gguf).tensors} >= set(FLOAT16_FIELDS)
    imported = import_gguf(tiny_gguf, tmp_path / "float32")
    want = AutoModelForCausalLM.from_pretrained(tiny_gguf.parent, gguf_file=tiny_gguf.name, dtype=torch.float32).state_dict()
    index = tensor_index(imported)
    got = read_tensors(index, index)
    assert set(got) == set(want)
    assert all(torch.equal(got[name], want[name]) for name in want)
    assert len(set(index.values())) == LAYERS + 1  # one file per layer, one for the head
    assert json.loads((imported / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]


def test_a_gguf_dequantizes_straight_to_int8_layers(tiny_gguf, tmp_path):
    float32 = import_gguf(tiny_gguf, tmp_path / "float32")
    int8 = import_gguf(tiny_gguf, tmp_path / "int8", weights="int8")
    index = tensor_index(int8)
    tensors = read_tensors(index, ["model.layers.1.mlp.down_proj.weight", "model.embed_tokens.weight"])
    assert tensors["model.layers.1.mlp.down_proj.weight"].dtype == torch.int8
    assert tensors["model.embed_tokens.weight"].dtype == torch.bfloat16
    stage, reference = Stage.load(int8, 0, LAYERS), Stage.load(float32, 0, LAYERS, weights="int8")
    assert stage.numerics == reference.numerics
    x = [torch.randn(1, 4, HIDDEN), torch.randn(1, 1, HIDDEN)]
    assert all(torch.equal(a, b) for a, b in zip(stage.rerun([0, 4], x), reference.rerun([0, 4], x), strict=True))


def test_model_pack_takes_a_gguf(tiny_gguf, tmp_path, monkeypatch, capsys):
    from shardmarket.ipfs.blockstore import Blockstore
    from shardmarket.ipfs.cids import parse

    monkeypatch.setenv("SHARDMARKET_HOME", str(tmp_path / "home"))
    assert main(["model", "pack", str(tiny_gguf), "--dtype", "int8"]) == 0
    cid = capsys.readouterr().out.split()[-1]
    manifest = json.loads(Blockstore(tmp_path / "home" / "blocks").get(bytes(parse(cid))))
    assert manifest["model_id"] == "tiny-llama" and manifest["weights"] == "int8" and manifest["num_layers"] == LAYERS
    assert manifest["tokenizer"] and manifest["head"]["weights"] == "bfloat16"
    assert not list((tmp_path / "home").rglob("*.safetensors"))  # the dequantized checkpoint was temporary
