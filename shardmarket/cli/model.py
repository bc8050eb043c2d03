"""`shardmarket model pack|fetch`: split a checkpoint into per-layer IPFS shards, fetch only a layer range."""

from __future__ import annotations

import sys
from pathlib import Path

from shardmarket.cli.ipfs import ERRORS, _fail, content_store
from shardmarket.config import load_config


def _layers(text: str) -> tuple[int, int]:
    start, sep, end = text.partition(":")
    if not sep or not start.isdigit() or not end.isdigit():
        raise ValueError(text)
    return int(start), int(end)


def shard_converter(dtype: str | None):
    """The converter `model pack --dtype` hands to pack_model (torch loads only for model commands)."""
    from functools import partial

    from shardmarket.engine.formats import check_format, convert_shard

    return partial(convert_shard, target=check_format(dtype) if dtype else None)


def cmd_pack(args) -> int:
    import tempfile

    from shardmarket.engine.errors import EngineError
    from shardmarket.engine.models import import_gguf
    from shardmarket.ipfs.model import ModelError, pack_model

    progress = sys.stderr.isatty()
    try:
        work_dir = load_config().home / "tmp"
        work_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix="gguf-", dir=work_dir) as tmp:
            checkpoint, dtype = args.checkpoint, args.dtype
            if checkpoint.suffix == ".gguf":  # dequantized straight into the shards' format, then packed as it is
                checkpoint = import_gguf(checkpoint, Path(tmp) / checkpoint.stem, weights=dtype, progress=progress)
                dtype = None
            convert = shard_converter(dtype)
            cid = pack_model(checkpoint, content_store(), work_dir, convert=convert, model_id=args.model_id, progress=progress)
    except (ModelError, EngineError, *ERRORS) as exc:
        return _fail(exc)
    print(cid)
    return 0


def cmd_fetch(args) -> int:
    from shardmarket.ipfs.model import ModelError, fetch_model

    start, end = args.layers
    dest = args.dest or Path(f"{args.manifest}-{start}-{end}")
    try:
        fetch_model(
            args.manifest, (start, end), dest, store=content_store(args.gateway), head=args.head, progress=sys.stderr.isatty()
        )
    except (ModelError, *ERRORS) as exc:
        return _fail(exc)
    print(f"layers {start}:{end}{' and head' if args.head else ''} of {args.manifest} in {dest}")
    return 0


def add_dtype_argument(parser) -> None:
    """`--dtype`: the weight format of the packed layer shards."""
    parser.add_argument(
        "--dtype",
        metavar="FORMAT",
        help="weight format of the layer shards: int8 (per-channel scales; embeddings and LM head in bf16), bf16, fp16 "
        "or fp32 (default: as stored); only a coarser format than the checkpoint's can be made",
    )


def register(commands) -> None:
    group = commands.add_parser("model", help="model shards on IPFS (pack a checkpoint, fetch a layer range)")
    sub = group.add_subparsers(dest="model_command", required=True, metavar="COMMAND")

    pack = sub.add_parser(
        "pack", help="split a checkpoint (or a .gguf, dequantized) into per-layer shards, add them, print the manifest CID"
    )
    pack.add_argument("checkpoint", type=Path, metavar="CHECKPOINT_DIR|FILE.gguf")
    pack.add_argument("--model-id", help="model id in the manifest (default: the folder name)")
    add_dtype_argument(pack)
    pack.set_defaults(run=cmd_pack)

    fetch = sub.add_parser("fetch", help="fetch the shards of a layer range into a checkpoint folder")
    fetch.add_argument("manifest", metavar="MANIFEST_CID")
    fetch.add_argument("--layers", type=_layers, required=True, metavar="START:END", help="layers [START, END)")
    fetch.add_argument("--head", action="store_true", help="also fetch embeddings, final norm, LM head and tokenizer")
    fetch.add_argument("--dest", type=Path, help="folder to write (default: MANIFEST-START-END)")
    fetch.add_argument("--gateway", action="append", metavar="URL", help="trustless gateway (repeat for several)")
    fetch.set_defaults(run=cmd_fetch)
    from shardmarket.cli.publish import add_publish_command

    add_publish_command(sub)
