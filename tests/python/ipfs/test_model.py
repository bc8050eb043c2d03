"""Pack a tiny Llama into shards, serve them from a gateway process, fetch a layer range in another home."""

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from shardmarket.cli import main
from shardmarket.ipfs.blockstore import Blockstore
from shardmarket.ipfs.cids import parse

ROOT = Path(__file__).resolve().parents[3]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    path = tmp_path_factory.mktemp("tiny-llama")
    torch.manual_seed(0)
    config = LlamaConfig(
        num_hidden_layers=4,
        hidden_size=64,
        intermediate_size=128,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=256,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    LlamaForCausalLM(config).save_pretrained(path, safe_serialization=True)
    vocab = {f"t{i}": i for i in range(256)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0").save_pretrained(path)
    return path


def pack(checkpoint, home, monkeypatch, capsys) -> str:
    monkeypatch.setenv("SHARDMARKET_HOME", str(home))
    assert main(["model", "pack", str(checkpoint), "--model-id", "tiny-llama"]) == 0
    return capsys.readouterr().out.split()[-1]


def test_pack_writes_one_shard_per_layer(checkpoint, tmp_path, monkeypatch, capsys):
    cid = pack(checkpoint, tmp_path / "home", monkeypatch, capsys)
    monkeypatch.setenv("SHARDMARKET_HOME", str(tmp_path / "home"))
    assert main(["ipfs", "cat", cid]) == 0
    manifest = json.loads(capsys.readouterr().out)
    assert manifest["model_id"] == "tiny-llama" and manifest["num_layers"] == 4
    assert manifest["config"]["hidden_size"] == 64 and manifest["tokenizer"]
    original = load_file(checkpoint / "model.safetensors")
    for i, shard in enumerate(manifest["layers"]):
        assert shard["file"] == f"layer-{i:03d}.safetensors"
        assert set(shard["tensors"]) == {n for n in original if n.startswith(f"model.layers.{i}.")}
        assert shard["tensors"][f"model.layers.{i}.self_attn.q_proj.weight"] == {"dtype": "float32", "shape": [64, 64]}
        assert len(shard["sha256"]) == 64 and shard["size"] > 0
    assert set(manifest["head"]["tensors"]) == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    store = Blockstore(tmp_path / "home" / "blocks")
    assert {str(parse(p)) for p in store.pins()} >= {cid, *(s["cid"] for s in manifest["layers"])}


@pytest.fixture
def gateway(checkpoint, tmp_path, monkeypatch, capsys):
    """`shardmarket ipfs serve` in its own process over the packer's store; yields (url, manifest CID)."""
    cid = pack(checkpoint, tmp_path / "packer", monkeypatch, capsys)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "SHARDMARKET_HOME": str(tmp_path / "packer")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "shardmarket", "ipfs", "serve", "--port", str(port)],
        env=env,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    deadline = time.time() + 30
    while time.time() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            time.sleep(0.1)
    else:
        proc.kill()
        pytest.fail(f"the gateway did not start: {proc.stdout.read().decode()}")
    yield f"http://127.0.0.1:{port}", cid
    proc.terminate()
    proc.wait(10)


def test_fetch_only_the_layer_range(gateway, checkpoint, tmp_path, monkeypatch, capsys):
    url, cid = gateway
    monkeypatch.setenv("SHARDMARKET_HOME", str(tmp_path / "fetcher"))
    dest = tmp_path / "stage"
    assert main(["model", "fetch", cid, "--layers", "1:3", "--dest", str(dest), "--gateway", url]) == 0
    assert sorted(p.name for p in dest.iterdir()) == [
        "config.json",
        "layer-001.safetensors",
        "layer-002.safetensors",
        "model.safetensors.index.json",
        "shardmarket.json",
    ]
    original = load_file(checkpoint / "model.safetensors")
    got = {**load_file(dest / "layer-001.safetensors"), **load_file(dest / "layer-002.safetensors")}
    assert set(got) == {n for n in original if n.startswith(("model.layers.1.", "model.layers.2."))}
    assert all(torch.equal(got[n], original[n]) for n in got)
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    assert index["weight_map"]["model.layers.2.mlp.up_proj.weight"] == "layer-002.safetensors"
    # only the asked-for shards reached this machine
    manifest = json.loads(Blockstore(tmp_path / "packer" / "blocks").get(bytes(parse(cid))))
    fetched = Blockstore(tmp_path / "fetcher" / "blocks")
    assert fetched.has(bytes(parse(manifest["layers"][1]["cid"])))
    assert not fetched.has(bytes(parse(manifest["layers"][0]["cid"])))
    assert not fetched.has(bytes(parse(manifest["head"]["cid"])))
    assert fetched.pins() == {cid, manifest["layers"][1]["cid"], manifest["layers"][2]["cid"]}  # kept for serving


def test_full_fetch_loads_in_transformers(gateway, checkpoint, tmp_path, monkeypatch):
    from transformers import AutoTokenizer, LlamaForCausalLM

    url, cid = gateway
    monkeypatch.setenv("SHARDMARKET_HOME", str(tmp_path / "fetcher"))
    dest = tmp_path / "full"
    assert main(["model", "fetch", cid, "--layers", "0:4", "--head", "--dest", str(dest), "--gateway", url]) == 0
    ids = torch.tensor([[1, 5, 9, 200]])
    want = LlamaForCausalLM.from_pretrained(checkpoint).eval()(ids).logits
    got = LlamaForCausalLM.from_pretrained(dest).eval()(ids).logits
    assert torch.equal(got, want)
    assert AutoTokenizer.from_pretrained(dest)("t5 t9")["input_ids"] == [5, 9]


def test_bad_requests_change_nothing(gateway, tmp_path, monkeypatch, capsys):
    url, cid = gateway
    monkeypatch.setenv("SHARDMARKET_HOME", str(tmp_path / "fetcher"))
    assert main(["model", "fetch", cid, "--layers", "3:9", "--dest", str(tmp_path / "x"), "--gateway", url]) == 1
    assert "outside the model's 0:4" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    plain = tmp_path / "plain.txt"
    plain.write_text("not a manifest")
    assert main(["ipfs", "add", "-Q", str(plain)]) == 0
    not_manifest = capsys.readouterr().out.strip()
    assert main(["model", "fetch", not_manifest, "--layers", "0:1", "--dest", str(tmp_path / "y")]) == 1
    assert "not JSON" in capsys.readouterr().err
    assert main(["model", "pack", str(tmp_path)]) == 1
    assert "config.json is missing" in capsys.readouterr().err


def test_pack_and_fetch_through_kubo(kubo, checkpoint, tmp_path, monkeypatch, capsys):
    """With SHARDMARKET_IPFS_API, the shards go into Kubo and come back from it; the local stores stay empty."""
    monkeypatch.setenv("SHARDMARKET_IPFS_API", kubo.url)
    cid = pack(checkpoint, tmp_path / "packer", monkeypatch, capsys)
    manifest = json.loads(kubo.store.get(bytes(parse(cid))))
    assert {cid, manifest["head"]["cid"], *(s["cid"] for s in manifest["layers"])} <= kubo.pins
    monkeypatch.setenv("SHARDMARKET_HOME", str(tmp_path / "fetcher"))
    dest = tmp_path / "stage"
    assert main(["model", "fetch", cid, "--layers", "2:4", "--dest", str(dest)]) == 0
    original = load_file(checkpoint / "model.safetensors")
    got = load_file(dest / "layer-003.safetensors")
    assert all(torch.equal(got[n], original[n]) for n in got) and len(got) == 9
    for home in ("packer", "fetcher"):
        assert not (tmp_path / home / "blocks").exists() or not list(Blockstore(tmp_path / home / "blocks").keys())


def test_a_paid_node_fetches_its_shards_through_kubo(kubo, tmp_path, monkeypatch):
    """`node run` on a real anvil, with SHARDMARKET_IPFS_API: the published model's shards come from Kubo."""
    from shardmarket.cli.devmarket import DevMarket
    from shardmarket.engine.models import random_checkpoint, tiny_config

    monkeypatch.setenv("SHARDMARKET_IPFS_API", kubo.url)
    market = DevMarket(tmp_path / "market")
    market.checkpoint = random_checkpoint(tiny_config(), tmp_path / "tiny")
    try:
        market.start_chain()
        market.new_account("publisher")
        market.cli("publisher", "model", "publish", "--checkpoint", str(market.checkpoint), "--name", "tiny")
        market.new_account("node", tokens=100 * 10**18)
        market.node_port("node")
        market.cli("node", "node", "register", "--model", "tiny", "--layers", "1:3", "--price", "1raw", "--stake", "100e18")
        kubo.calls.clear()
        node = market.start_node("node")
        log = node.log.read_text()
    finally:
        market.stop()
    assert "fetching layers 1:3 of tiny" in log and "node ready" in log
    assert "block/get" in kubo.calls and "pin/add" in kubo.calls
    shards = next((tmp_path / "market" / "homes" / "node" / "node" / "shards").iterdir())
    assert sorted(p.name for p in shards.glob("*.safetensors")) == ["layer-001.safetensors", "layer-002.safetensors"]
    assert not list(Blockstore(tmp_path / "market" / "blocks").keys())  # nothing went through the local store


def test_int8_shards_hold_a_quarter_of_the_bytes_and_load_as_int8(gateway, checkpoint, tmp_path, monkeypatch, capsys):
    from shardmarket.engine.stage import Stage

    url, fp32_cid = gateway
    monkeypatch.setenv("SHARDMARKET_HOME", str(tmp_path / "packer"))  # the gateway serves this store
    assert main(["model", "pack", str(checkpoint), "--model-id", "tiny-llama", "--dtype", "int8"]) == 0
    int8_cid = capsys.readouterr().out.split()[-1]
    store = Blockstore(tmp_path / "packer" / "blocks")
    fp32, int8 = (json.loads(store.get(bytes(parse(cid)))) for cid in (fp32_cid, int8_cid))
    assert (fp32["weights"], int8["weights"]) == ("float32", "int8")
    assert {shard["weights"] for shard in int8["layers"]} == {"int8"} and int8["head"]["weights"] == "bfloat16"
    tensors = int8["layers"][2]["tensors"]
    assert tensors["model.layers.2.self_attn.q_proj.weight"] == {"dtype": "int8", "shape": [64, 64]}
    assert tensors["model.layers.2.self_attn.q_proj.weight_scale"] == {"dtype": "float32", "shape": [64]}
    assert tensors["model.layers.2.input_layernorm.weight"]["dtype"] == "float32"
    ratio = sum(s["size"] for s in int8["layers"]) / sum(s["size"] for s in fp32["layers"])
    assert 0.25 < ratio < 0.3  # a node's fetch; scales and norms add a little to the quarter

    monkeypatch.setenv("SHARDMARKET_HOME", str(tmp_path / "fetcher"))
    dest = tmp_path / "stage"
    assert main(["model", "fetch", int8_cid, "--layers", "1:3", "--dest", str(dest), "--gateway", url]) == 0
    assert json.loads((dest / "shardmarket.json").read_text())["weights"] == "int8"
    fetched, converted = Stage.load(dest, 1, 3), Stage.load(checkpoint, 1, 3, weights="int8")
    assert fetched.numerics == converted.numerics and fetched.numerics.weights == "int8"
    x = [torch.randn(1, 5, 64), torch.randn(1, 1, 64)]
    assert all(torch.equal(a, b) for a, b in zip(fetched.rerun([0, 5], x), converted.rerun([0, 5], x), strict=True))

    monkeypatch.setenv("SHARDMARKET_HOME", str(tmp_path / "packer"))
    assert main(["model", "pack", str(checkpoint), "--dtype", "int4"]) == 1
    assert "unknown weight format 'int4'" in capsys.readouterr().err
    assert main(["model", "pack", str(checkpoint), "--dtype", "bf16"]) == 0
    bf16 = json.loads(store.get(bytes(parse(capsys.readouterr().out.split()[-1]))))
    assert bf16["weights"] == "bfloat16" and bf16["head"]["weights"] == "bfloat16"
