"""Placement of a GPU node's layers across GPU, CPU and disk: the planning runs anywhere (on the meta device, with
budgets in bytes), the computation on CUDA only where torch sees a GPU."""

from __future__ import annotations

import pytest
import torch
from accelerate import init_empty_weights
from transformers import AutoConfig

from shardmarket.engine.architecture import family_of, stage_config
from shardmarket.engine.errors import EngineError
from shardmarket.engine.formats import Numerics, format_error
from shardmarket.engine.head import Head
from shardmarket.engine.placement import cache_device, device_map_for, device_of, main_device, memory_budget
from shardmarket.engine.stage import Stage, StageLayers

from .conftest import prompt_ids

NO_CUDA = "needs a CUDA GPU; torch.cuda.is_available() is False on this machine"


def planned(checkpoint, max_memory, tmp_path):
    """The device map, main device and KV cache devices a node's stage of all 5 layers would get (on the meta device)."""
    config = AutoConfig.from_pretrained(checkpoint)
    family = family_of(config)
    with init_empty_weights():
        body = StageLayers(stage_config(config, 0, 5), family.decoder_layer)
    device_map = device_map_for(body, max_memory, torch.bfloat16, [family.decoder_layer.__name__], tmp_path)
    main = main_device(device_map)
    layers = [device_of(f"layers.{i}", device_map) for i in range(5)]
    return layers, main, [cache_device(placed, main) for placed in layers]


def test_a_gpu_budget_fills_the_gpu_then_the_cpu_then_disk_and_keeps_the_caches_on_the_gpu(tiny_checkpoints, tmp_path):
    layer_mb = sum(p.numel() for p in Stage.load(tiny_checkpoints["llama"], 0, 1).body.parameters()) * 2 / 2**20
    # accelerate keeps room for the largest layer on every device but the last, to bring offloaded layers in
    layers, main, caches = planned(tiny_checkpoints["llama"], memory_budget(3.5 * layer_mb, 2.5 * layer_mb), tmp_path)
    assert layers == [0, 0, "cpu", "disk", "disk"]
    assert main == torch.device("cuda:0")
    assert caches == [torch.device("cuda:0")] * 5  # the CPU and disk layers compute on the GPU, beside their caches


def test_a_cpu_budget_alone_computes_on_the_cpu(tiny_checkpoints, tmp_path):
    assert memory_budget(None, None) is None
    layer_mb = sum(p.numel() for p in Stage.load(tiny_checkpoints["llama"], 0, 1).body.parameters()) * 2 / 2**20
    layers, main, caches = planned(tiny_checkpoints["llama"], memory_budget(None, 3.5 * layer_mb), tmp_path)
    assert layers == ["cpu", "cpu", "disk", "disk", "disk"]
    assert main == torch.device("cpu")
    assert caches == [torch.device("cpu")] * 5


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without a CUDA GPU")
def test_a_gpu_budget_without_a_gpu_is_refused_with_what_to_do(tiny_checkpoints):
    with pytest.raises(EngineError, match="drop the GPU budget or install torch with CUDA"):
        Stage.load(tiny_checkpoints["llama"], 0, 5, max_memory=memory_budget(64, 64))


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).norm() / b.float().cpu().norm())


@pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA)
@pytest.mark.parametrize("weights", ["float32", "int8"])
def test_a_stage_on_cuda_computes_in_16_bits_with_its_caches_on_the_gpu(tiny_checkpoints, tmp_path, weights):
    checkpoint = tiny_checkpoints["llama"]
    head = Head.load(checkpoint)
    hidden = head.embed(torch.tensor([prompt_ids(head)]))
    positions = torch.arange(hidden.shape[1])[None]
    reference = Stage.load(checkpoint, 0, 5)
    reference.open_session("s", hidden.shape[1])
    expected = reference.step("s", hidden, positions)
    layer_mb = sum(p.numel() for p in reference.body.layers[0].parameters()) * 2 / 2**20
    whole = Stage.load(checkpoint, 0, 5, weights=weights)
    spread = Stage.load(
        checkpoint, 0, 5, weights=weights, max_memory=memory_budget(3.5 * layer_mb, 2.5 * layer_mb), offload_folder=tmp_path
    )
    assert set(spread.device_map.values()) == {0, "cpu", "disk"}
    for stage in (whole, spread):
        assert stage.device.type == "cuda" and stage.numerics.dtype in ("bfloat16", "float16")
        stage.open_session("s", hidden.shape[1])
        out = stage.step("s", hidden.to(stage.dtype), positions)
        assert all(k.device.type == "cuda" for k in stage._sessions["s"].keys)
        assert _relative(out, expected) < format_error(stage.numerics)
    assert _relative(spread.rerun([0], [hidden.to(whole.dtype)])[0], whole.rerun([0], [hidden.to(whole.dtype)])[0]) < 1e-2
    assert whole.numerics == Numerics("int8" if weights == "int8" else whole.numerics.dtype, whole.numerics.dtype)
