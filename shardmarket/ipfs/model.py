"""Model shards: a Hugging Face checkpoint split into one safetensors file per layer, plus a manifest.

`pack_model` writes `layer-NNN.safetensors` (tensors `model.layers.N.*`) and `head.safetensors`
(embeddings, final norm, LM head), adds them with the tokenizer files, and adds a JSON manifest whose
CID names the model on chain and which says the weight format of the model and of each shard. `fetch_model`
brings back only the shards a layer range needs.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from tqdm import tqdm

from shardmarket.ipfs.cids import parse
from shardmarket.ipfs.store import ContentStore
from shardmarket.ipfs.unixfs import ImportOptions, ReadableInto, export, import_bytes, import_path, import_stream, iter_file

FORMAT = "shardmarket-model/1"
SHARD_OPTIONS = ImportOptions(cid_version=1)
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "generation_config.json",
)
LAYER_NAME = re.compile(r"^model\.layers\.(\d+)\.")
MAX_MANIFEST = 16 * 1024 * 1024


# Turns the tensors of one shard ("layer" or "head") into the format it is packed in, and names that format
# (shardmarket.engine.formats.convert_shard, given by the CLI: this layer does not compute).
ShardConverter = Callable[[str, dict[str, torch.Tensor]], tuple[dict[str, torch.Tensor], str]]


class ModelError(ValueError):
    """A checkpoint that cannot be packed or a manifest/shard that cannot be used; nothing is left half-done."""


class _HashingReader:
    """Wraps a binary file so whatever reads it also feeds a sha256."""

    def __init__(self, f: ReadableInto) -> None:
        self.f, self.sha = f, hashlib.sha256()

    def readinto(self, buffer: memoryview, /) -> int:
        n = self.f.readinto(buffer) or 0
        self.sha.update(buffer[:n])
        return n


def _tensor_files(checkpoint: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file of the checkpoint."""
    files = sorted(checkpoint.glob("*.safetensors"))
    if not files:
        raise ModelError(f"{checkpoint} holds no .safetensors file; save the model with safe_serialization=True")
    where: dict[str, Path] = {}
    for file in files:
        with safe_open(file, framework="pt") as f:
            for name in f.keys():
                if name in where:
                    raise ModelError(f"tensor {name} is in both {where[name].name} and {file.name}")
                where[name] = file
    return where


def _add_shard(store: ContentStore, path: Path, name: str, tensors: dict[str, dict], weights: str) -> dict:
    with open(path, "rb") as f:
        reader = _HashingReader(f)
        entry = import_stream(reader, SHARD_OPTIONS, store)
    store.pin(entry.cid)
    sha = reader.sha.hexdigest()
    return {"file": name, "cid": entry.cid_str, "size": entry.size, "sha256": sha, "weights": weights, "tensors": tensors}


def _write_group(
    checkpoint_files: dict[str, Path], names: list[str], kind: str, convert: ShardConverter, out: Path
) -> tuple[dict[str, dict], str]:
    tensors = {}
    for name in sorted(names):
        with safe_open(checkpoint_files[name], framework="pt") as f:
            tensors[name] = f.get_tensor(name)
    tensors, weights = convert(kind, tensors)
    tensors = {name: tensor.contiguous() for name, tensor in sorted(tensors.items())}
    meta = {name: {"dtype": str(t.dtype).removeprefix("torch."), "shape": list(t.shape)} for name, t in tensors.items()}
    save_file(tensors, str(out), metadata={"format": "pt"})
    return meta, weights


def pack_model(
    checkpoint_dir: Path,
    store: ContentStore,
    work_dir: Path,
    *,
    convert: ShardConverter,
    model_id: str | None = None,
    progress: bool = True,
) -> str:
    """Split, add and pin a checkpoint's shards (in the format `convert` gives them), tokenizer and manifest; return the
    manifest CID. Each shard is written to `work_dir` (best on the store's disk) and removed once added."""
    checkpoint = Path(checkpoint_dir)
    try:
        config = json.loads((checkpoint / "config.json").read_text())
        num_layers = int(config["num_hidden_layers"])
    except (OSError, ValueError, KeyError) as exc:
        raise ModelError(f"{checkpoint}/config.json is missing or has no num_hidden_layers ({exc})") from None
    where = _tensor_files(checkpoint)
    groups: dict[int | str, list[str]] = {}
    for name in where:
        m = LAYER_NAME.match(name)
        groups.setdefault(int(m.group(1)) if m else "head", []).append(name)
    numbered = sorted(k for k in groups if isinstance(k, int))
    missing = [i for i in range(num_layers) if i not in groups]
    if missing or any(k >= num_layers for k in numbered):
        raise ModelError(
            f"config says {num_layers} layers but tensors exist for layers {numbered}; the checkpoint is inconsistent"
        )
    manifest: dict = {
        "format": FORMAT,
        "model_id": model_id or checkpoint.resolve().name,
        "architectures": config.get("architectures", []),
        "num_layers": num_layers,
        "config": config,
    }
    work_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="pack-", dir=work_dir) as tmp:
        work = Path(tmp)
        layers = []
        for key in tqdm(["head", *range(num_layers)], desc="pack", unit="shard", disable=not progress):
            name = "head.safetensors" if key == "head" else f"layer-{key:03d}.safetensors"
            meta, weights = _write_group(where, groups.get(key, []), "head" if key == "head" else "layer", convert, work / name)
            shard = _add_shard(store, work / name, name, meta, weights)
            (work / name).unlink()
            if key == "head":
                manifest["head"] = shard
            else:
                layers.append(shard)
        manifest["layers"] = layers
        manifest["weights"] = layers[0]["weights"] if layers else None
        tokenizer_dir = work / "tokenizer"
        tokenizer_dir.mkdir()
        for file in TOKENIZER_FILES:
            if (checkpoint / file).is_file():
                shutil.copy(checkpoint / file, tokenizer_dir / file)
        manifest["tokenizer"] = None
        if any(tokenizer_dir.iterdir()):
            entry = import_path(tokenizer_dir, SHARD_OPTIONS, store, recursive=True)
            store.pin(entry.cid)
            manifest["tokenizer"] = entry.cid_str
    body = json.dumps(manifest, sort_keys=True, separators=(",", ":")).encode()
    entry = import_bytes(body, SHARD_OPTIONS, store)
    store.pin(entry.cid)
    return entry.cid_str


def load_manifest(store: ContentStore, manifest_cid: str) -> dict:
    """Fetch (if needed), verify and parse a model manifest."""
    cid = bytes(parse(manifest_cid))
    store.fetch(cid)
    body = b""
    for piece in iter_file(store, cid):
        body += piece
        if len(body) > MAX_MANIFEST:
            raise ModelError(f"{manifest_cid} is larger than any manifest; it is not a model manifest")
    try:
        manifest = json.loads(body)
    except ValueError:
        raise ModelError(f"{manifest_cid} is not JSON; it is not a model manifest") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ModelError(f"{manifest_cid} is not a {FORMAT} manifest")
    if len(manifest.get("layers", [])) != manifest.get("num_layers"):
        raise ModelError(f"manifest {manifest_cid} lists {len(manifest.get('layers', []))} layers, not num_layers")
    return manifest


def fetch_model(
    manifest_cid: str, layers: tuple[int, int], dest: Path, *, store: ContentStore, head: bool = False, progress: bool = True
) -> Path:
    """Write a checkpoint folder with config.json and only the shards of layers [start, end) (+ head).

    Fetched shards are pinned in `store`, so this node can serve them."""
    manifest = load_manifest(store, manifest_cid)
    start, end = layers
    if not 0 <= start < end <= manifest["num_layers"]:
        raise ModelError(f"layers {start}:{end} are outside the model's 0:{manifest['num_layers']}")
    shards = manifest["layers"][start:end] + ([manifest["head"]] if head else [])
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    weight_map: dict[str, str] = {}
    total = 0
    for shard in tqdm(shards, desc="shards", unit="shard", disable=not progress):
        file = shard["file"]
        if not re.fullmatch(r"(layer-\d{3}|head)\.safetensors", file):
            raise ModelError(f"manifest names an unsafe shard file {file!r}")
        cid = bytes(parse(shard["cid"]))
        store.pin(cid)
        export(store, cid, dest / file)
        sha = hashlib.sha256()
        with open(dest / file, "rb") as f:
            while chunk := f.read(1 << 20):
                sha.update(chunk)
        if sha.hexdigest() != shard["sha256"]:
            (dest / file).unlink()
            raise ModelError(f"shard {file} does not match the sha256 in manifest {manifest_cid}")
        weight_map.update(dict.fromkeys(shard["tensors"], file))
        total += shard["size"]
    if head and manifest.get("tokenizer"):
        tokenizer = bytes(parse(manifest["tokenizer"]))
        store.fetch(tokenizer)
        with tempfile.TemporaryDirectory(dir=dest) as tmp:
            export(store, tokenizer, Path(tmp) / "tokenizer")
            for file in (Path(tmp) / "tokenizer").iterdir():
                shutil.move(str(file), dest / file.name)
    store.pin(bytes(parse(manifest_cid)))
    (dest / "config.json").write_text(json.dumps(manifest["config"], indent=2))
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (dest / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    (dest / "shardmarket.json").write_text(
        json.dumps(
            {
                "manifest": manifest_cid,
                "model_id": manifest["model_id"],
                "weights": manifest.get("weights"),
                "layers": [start, end],
                "head": head,
            },
            indent=2,
        )
    )
    return dest
