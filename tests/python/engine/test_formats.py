"""Weight formats: int8 per-channel quantization, conversions that only go coarser, stages computing int8, bf16 and
fp16 weights, and the tolerances under which checkers compare two nodes' answers."""

from __future__ import annotations

import pytest
import torch

from shardmarket.cli.node import WEIGHT_FORMATS
from shardmarket.engine.errors import EngineError
from shardmarket.engine.formats import (
    FORMATS,
    Int8Linear,
    Numerics,
    convert,
    convert_shard,
    honest_numerics,
    quantize_int8,
    tolerance,
)
from shardmarket.engine.head import Head
from shardmarket.engine.stage import Stage
from shardmarket.engine.weights import layer_tensors, tensor_index

from .conftest import FAMILIES, run_pipeline

BASE = 1e-3  # the configured float32 tolerance (config: dispute_tolerance, spot_check_tolerance)
NOISE = 0.1  # `node run --cheat-noise 0.1`, as the demo's cheating node


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.float(), b.float()
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b))


def test_int8_keeps_each_row_within_half_a_step():
    torch.manual_seed(0)
    weight = torch.randn(48, 96) * torch.logspace(-3, 1, 48)[:, None]  # rows of very different scales
    weight[5] = 0
    q, scale = quantize_int8(weight)
    assert q.dtype == torch.int8 and scale.dtype == torch.float32 and scale.shape == (48,)
    assert torch.equal(scale.to(torch.bfloat16).float(), scale)  # Int8Linear multiplies by the scales rounding used
    assert int(q.abs().max()) == 127 and torch.all(q[5] == 0)
    error = (q.float() * scale[:, None] - weight).abs()
    assert torch.all(error <= scale[:, None] / 2 + 1e-12)  # per row: a small row keeps its own precision


def test_conversions_go_only_to_coarser_formats(tiny_checkpoints):
    tensors = layer_tensors(tensor_index(tiny_checkpoints["qwen2"]), 0, 1)  # qwen2 has biases
    int8 = convert(tensors, "int8")
    assert int8["layers.0.mlp.up_proj.weight"].dtype == torch.int8
    assert int8["layers.0.mlp.up_proj.weight_scale"].shape == (160,)
    assert int8["layers.0.self_attn.q_proj.bias"].dtype == torch.float32  # vectors stay float32
    assert int8["layers.0.input_layernorm.weight"].dtype == torch.float32
    assert {t.dtype for t in convert(tensors, "bf16").values()} == {torch.bfloat16}
    assert torch.equal(
        convert(convert(tensors, "bfloat16"), "int8")["layers.0.mlp.up_proj.weight"].float().abs().amax(1), 127 * torch.ones(160)
    )
    for source, target in [(int8, "float32"), (int8, "bfloat16"), (convert(tensors, "bfloat16"), "float16")]:
        with pytest.raises(EngineError, match="cannot become"):
            convert(source, target)
    with pytest.raises(EngineError, match="choose one of"):
        convert(tensors, "int4")
    head = {"model.embed_tokens.weight": torch.randn(8, 4), "model.norm.weight": torch.ones(4)}
    assert convert_shard("head", head, "int8")[1] == "bfloat16"  # embeddings and LM head stay in 16 bits
    assert convert_shard("head", head, None)[1] == "float32"
    assert sorted(WEIGHT_FORMATS) == sorted(FORMATS)  # `node run --weights` names them without importing torch


def test_int8_linear_rounds_once_after_a_float32_product():
    """The kernel's result is the exact product of the 16-bit activations and scales, rounded once to 16 bits."""
    torch.manual_seed(1)
    layer = Int8Linear(256, 64, bias=False)
    layer.weight.data, layer.weight_scale.data = quantize_int8(torch.randn(64, 256))
    x = torch.randn(3, 5, 256)
    exact = (x.to(torch.bfloat16).double() @ layer.weight.double().T) * layer.weight_scale.to(torch.bfloat16).double()
    out = layer(x)
    assert out.dtype == torch.float32 and out.shape == (3, 5, 64)
    ulp = exact.abs() * 2.0**-7  # one bfloat16 step at most: float32 accumulation may end on the other side of a tie
    assert torch.all((out.double() - exact).abs() <= ulp)
    assert (out == exact.to(torch.bfloat16).float()).float().mean() > 0.99


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize(
    ("weights", "dtype"), [("int8", torch.float32), ("bfloat16", torch.bfloat16), ("float16", torch.float16)]
)
def test_a_split_computes_what_one_stage_computes_in_any_format(tiny_checkpoints, tiny_references, family, weights, dtype):
    checkpoint, ref = tiny_checkpoints[family], tiny_references[family]
    head = Head.load(checkpoint)
    whole = [Stage.load(checkpoint, 0, 5, weights=weights, dtype=dtype)]
    split = [Stage.load(checkpoint, a, b, weights=weights, dtype=dtype) for a, b in [(0, 2), (2, 3), (3, 5)]]
    assert whole[0].numerics == Numerics(weights, str(dtype).removeprefix("torch."))
    if weights == "int8":
        assert {p.dtype for p in whole[0].body.parameters()} == {torch.int8, torch.float32}
        assert sum(isinstance(m, Int8Linear) for m in whole[0].body.modules()) == 5 * 7
    else:
        assert {p.dtype for p in whole[0].body.parameters()} == {dtype}
    tokens, logits = run_pipeline(head, whole, ref.prompt, 16)
    split_tokens, split_logits = run_pipeline(head, split, ref.prompt, 16)
    assert split_tokens == tokens and torch.equal(split_logits, logits)
    assert relative(logits[0], ref.logits[0]) < 0.1  # the format changes the numbers a little, not the model


def test_stored_16_bit_weights_compute_in_float32_or_their_own_dtype(tiny_checkpoints, tmp_path):
    from safetensors.torch import load_file, save_file

    source = tiny_checkpoints["llama"]
    for file in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        (tmp_path / file).write_bytes((source / file).read_bytes())
    save_file(
        {k: v.to(torch.bfloat16) for k, v in load_file(source / "model.safetensors").items()}, tmp_path / "model.safetensors"
    )
    upcast = Stage.load(tmp_path, 0, 2, dtype=torch.float32)
    assert upcast.numerics == Numerics("bfloat16", "float32") and upcast.source.stored == "bfloat16"
    assert Stage.load(tmp_path, 0, 2, weights="int8").numerics.weights == "int8"
    with pytest.raises(EngineError, match="cannot become"):
        Stage.load(tmp_path, 0, 2, weights="float32")


def test_honest_numerics_are_what_an_answer_of_a_dtype_can_come_from():
    assert honest_numerics("float32", "float32") == [Numerics(w, "float32") for w in FORMATS]
    assert honest_numerics("float32", "bfloat16") == [Numerics("bfloat16", "bfloat16"), Numerics("int8", "bfloat16")]
    assert honest_numerics("int8", "float32") == [Numerics("int8", "float32")]
    fp32, int8 = Numerics("float32", "float32"), Numerics("int8", "float32")
    assert tolerance(fp32, fp32, BASE) == BASE
    assert tolerance(int8, int8, BASE) > BASE  # its products are rounded to 16 bits
    assert tolerance(int8, fp32, BASE) > 0.1


@pytest.mark.parametrize("family", FAMILIES)
def test_a_checker_emulating_a_node_accepts_it_and_catches_noise(tiny_checkpoints, family):
    """A node's hop re-run by a checker in the node's numerics (from the checker's own float32 layers) matches within
    the same-numerics tolerance, for every format; the same answer with `--cheat-noise 0.1` added never does. Across
    numerics, honest answers stay within the pair's tolerance."""
    checkpoint = tiny_checkpoints[family]
    head = Head.load(checkpoint)
    torch.manual_seed(7)
    hidden = Stage.load(checkpoint, 0, 2).rerun([0, 8, 9], list(head.embed(torch.randint(3, 380, (1, 10))).split([8, 1, 1], 1)))
    positions, inputs = [0, 8, 9], hidden
    checker = Stage.load(checkpoint, 2, 4)
    answers = {}
    for numerics in [
        Numerics(w, d) for d in ("float32", "bfloat16", "float16") for w in FORMATS if d == "float32" or w in (d, "int8")
    ]:
        node = Stage.load(checkpoint, 2, 4, weights=numerics.weights, dtype=getattr(torch, numerics.dtype))
        assert node.numerics == numerics
        answers[numerics] = node.rerun(positions, inputs)
        emulated = checker.with_numerics(numerics).rerun(positions, inputs)
        limit = tolerance(numerics, numerics, BASE)
        for answer, mine in zip(answers[numerics], emulated, strict=True):
            assert relative(answer, mine) <= limit
            assert relative(answer + NOISE * torch.randn_like(answer), mine) > limit
    for a, outputs_a in answers.items():
        for b, outputs_b in answers.items():
            for x, y in zip(outputs_a, outputs_b, strict=True):
                assert relative(x, y) <= tolerance(a, b, BASE)
