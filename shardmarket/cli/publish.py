"""`shardmarket model publish`: pack a checkpoint (or take a packed manifest) and put its CID on the ModelRegistry."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from eth_utils import keccak

from shardmarket.cli.keys import add_password_file
from shardmarket.cli.operator import chain_command


def config_hash(config: dict) -> bytes:
    """keccak256 of the model config as canonical JSON (sorted keys, no spaces)."""
    return keccak(json.dumps(config, sort_keys=True, separators=(",", ":")).encode())


def add_publish_command(sub) -> None:
    """Add `publish` to the `model` command group."""
    from shardmarket.cli.model import add_dtype_argument

    publish = sub.add_parser("publish", help="register a model's manifest CID, layer count and config hash on chain")
    source = publish.add_mutually_exclusive_group(required=True)
    source.add_argument("--checkpoint", type=Path, help="pack this checkpoint into the local store first")
    source.add_argument("--manifest", help="manifest CID of an already packed model (in the local store or a gateway)")
    publish.add_argument("--name", help="model name on chain (default: the manifest's model id)")
    add_dtype_argument(publish)
    add_password_file(publish)
    publish.set_defaults(run=chain_command(cmd_publish))


def cmd_publish(args: argparse.Namespace) -> int:
    from shardmarket.cli.ipfs import ERRORS, content_store
    from shardmarket.cli.model import shard_converter
    from shardmarket.cli.operator import connect
    from shardmarket.config import load_config
    from shardmarket.engine.errors import EngineError
    from shardmarket.ipfs.model import ModelError, load_manifest, pack_model

    try:
        market = connect(args)
        store = content_store()
        work_dir = load_config().home / "tmp"
        cid = args.manifest or pack_model(
            args.checkpoint,
            store,
            work_dir,
            convert=shard_converter(args.dtype),
            model_id=args.name,
            progress=sys.stderr.isatty(),
        )
        manifest = load_manifest(store, cid)
        name = args.name or manifest["model_id"]
        call = market.models.functions.registerModel(name, cid, manifest["num_layers"], config_hash(manifest["config"]))
        receipt = market.transact(call, f"publishing {name}")
    except (ModelError, EngineError, *ERRORS) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"published {name}: manifest {cid}, {manifest['num_layers']} layers; tx {receipt['transactionHash'].hex()}")
    return 0
