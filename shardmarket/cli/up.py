"""`shardmarket node up`: join the market with one command. Loads or creates the keys, picks the layers (the market's
least served span that fits this machine, or --layers), fetches their shards by the manifest CID, serves them, makes
the node reachable (a port mapping, else a relay), checks that from outside, registers (or updates) endpoint, range,
price and stake, and keeps all of that true while it runs. Every step prints one line."""

from __future__ import annotations

import argparse
import asyncio
import logging
import time
from pathlib import Path

from shardmarket.chain.units import AMOUNT_HELP
from shardmarket.cli.ipfs import content_store
from shardmarket.cli.keys import add_password_file, home_keys
from shardmarket.cli.node import DTYPE_NAMES
from shardmarket.cli.operator import parse_amount, parse_layers, resolve_amounts
from shardmarket.config import Config, load_config


def register(group) -> None:
    up = group.add_parser("up", help="join the market in one command: keys, layers, shards, reachable, registered, serving")
    up.add_argument("--model", help="model name on the ModelRegistry (default: the one this operator is registered for)")
    up.add_argument(
        "--layers", type=parse_layers, help="layer range A:B (default: as registered, else the least served span that fits)"
    )
    up.add_argument(
        "--price", type=parse_amount, help=f"price per token processed (default: as registered, else node.price); {AMOUNT_HELP}"
    )
    up.add_argument(
        "--stake", type=parse_amount, default=0, help=f"stake to keep bonded (default: the registry's minimum); {AMOUNT_HELP}"
    )
    up.add_argument("--checkpoint", type=Path, help="serve this local checkpoint instead of fetching the shards")
    up.add_argument("--host", default="0.0.0.0", help="listen address (default 0.0.0.0: the router forwards to the LAN address)")
    up.add_argument("--port", type=int, help="port of HTTP, WebSocket and raw TCP sessions (config node.port)")
    up.add_argument("--relay", action="append", metavar="URL", help="relay that verifies and, failing a mapping, relays")
    up.add_argument("--stun", action="append", metavar="HOST[:PORT]", help="STUN server (default: [reach] stun_servers)")
    up.add_argument("--methods", help="comma-separated port mapping methods, '' for none (default: [reach] methods)")
    up.add_argument("--dtype", choices=DTYPE_NAMES, default="float32")
    up.add_argument("--threads", type=int, help="torch threads (config node.threads)")
    up.add_argument("--max-memory-mb", type=float, help="memory for this node's weights (default: what accelerate finds free)")
    add_password_file(up)
    up.set_defaults(run=run_up)


def say(line: str) -> None:
    print(line, flush=True)


def _account(args: argparse.Namespace, config: Config):
    """This home's operator account: loaded, or created on first start."""
    from eth_account import Account

    from shardmarket.chain.keys import KEYSTORE_FILE, load_account, read_password, save_account

    keys = home_keys()
    if (keys / KEYSTORE_FILE).exists():
        account = load_account(read_password(args.password_file), keys)
        say(f"keys: operator {account.address} ({keys})")
        return account
    key = bytes(Account.create().key)
    save_account(key, read_password(args.password_file, confirm=True), keys, scrypt_n=config.chain.keystore_scrypt_n)
    account = Account.from_key(key)
    say(f"keys: created operator {account.address} in {keys} (back that folder up; fund the account with gas and stake)")
    return account


def _layers(args: argparse.Namespace, config: Config, market, model: str, manifest_cid: str, current) -> tuple[int, int]:
    """--layers, else the registered range of this model, else the market's least served span that fits here."""
    from shardmarket.ipfs.model import load_manifest
    from shardmarket.server.placement import free_memory_bytes, layers_that_fit, market_load, per_layer, weakest_span

    if args.layers:
        say(f"layers: {args.layers[0]}:{args.layers[1]} of {model} (--layers)")
        return args.layers
    if current is not None and current.model == model:
        say(f"layers: {current.start}:{current.end} of {model} (as registered)")
        return current.start, current.end
    manifest = load_manifest(content_store(), manifest_cid)
    budget = int(args.max_memory_mb * 2**20) if args.max_memory_mb else free_memory_bytes()
    fit = layers_that_fit(manifest, args.dtype, budget)
    if fit == 0:
        raise ValueError(f"not one layer of {model} fits in {budget / 2**20:.0f} MiB here; free memory or pick a smaller model")
    served = asyncio.run(market_load(market, model))
    throughputs = per_layer(manifest["num_layers"], served)
    start, end = weakest_span(throughputs, fit)
    say(
        f"layers: {start}:{end} of {model}, the least served span ({min(throughputs[start:end]):.1f} steps/s at its weakest "
        f"layer over {len(served)} listed node(s)); {fit} of {manifest['num_layers']} layers fit in {budget / 2**30:.1f} GiB"
    )
    return start, end


def run_up(args: argparse.Namespace) -> int:
    from shardmarket.chain.contracts import ChainError, Market
    from shardmarket.chain.keys import KeystoreError
    from shardmarket.chain.registry import Registration, registration_of
    from shardmarket.cli.reach import reachability_for
    from shardmarket.engine.errors import EngineError
    from shardmarket.ipfs.model import ModelError
    from shardmarket.ipfs.store import STORE_ERRORS
    from shardmarket.server.daemon import ServeOptions, paid_daemon
    from shardmarket.server.identity import NodeIdentity
    from shardmarket.server.upkeep import RegistryUpkeep, Wanted, stay_listed

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = load_config()
    try:
        account = _account(args, config)
        market = Market.connect(config.chain, account)
        resolve_amounts(args, market.units())
        say(f"chain: {config.chain.rpc_url} (chain {market.chain_id})")
        current = registration_of(market, account.address)
        model = args.model or (current.model if current else None)
        if model is None:
            raise ValueError("this operator is not registered yet: pass --model NAME, a model published on the ModelRegistry")
        published = market.read(market.models.functions.getModel(market.model_id(model)), f"reading model {model}")
        if published.layerCount == 0:
            raise ValueError(f"no model {model!r} on the ModelRegistry; publish it with `shardmarket model publish`")
        start, end = _layers(args, config, market, model, published.manifestCid, current)
        price = args.price if args.price is not None else (current.price if current else config.node.price)
        identity = NodeIdentity(bytes(account.key), account.address, _x25519())
        options = ServeOptions(
            checkpoint=args.checkpoint, host=args.host, dtype=args.dtype, threads=args.threads, max_memory_mb=args.max_memory_mb
        )
        port = args.port or config.node.port
        plan = Registration(model, published.manifestCid, start, end, price, [], identity.x25519_public, False)
        loading = time.monotonic()
        daemon = paid_daemon(options, config, identity, market, plan, port, None if args.checkpoint else content_store())
        say(f"model: layers {start}:{end} loaded in {time.monotonic() - loading:.1f} s")
    except (ChainError, KeystoreError, ValueError) as exc:
        say(f"error: {exc}")
        return 1
    except (EngineError, ModelError, OSError, *STORE_ERRORS) as exc:
        say(f"error: cannot load the node's layers: {exc}")
        return 2
    reach = reachability_for(args, config, port, account.address)
    if daemon.dashboard is not None:
        daemon.dashboard.reach.source = reach
    upkeep = RegistryUpkeep(market, identity, Wanted(model, start, end, price, args.stake))
    ready, gave_up = asyncio.Event(), []

    def give_up() -> None:
        gave_up.append(True)
        daemon.stop()

    settle = daemon.on_stop

    async def leave() -> None:
        try:
            await asyncio.to_thread(upkeep.pause, "the node stopped")
        except ChainError as exc:
            say(f"could not pause the listing ({exc}); run `shardmarket node pause`")
        await reach.close()
        if settle is not None:
            await settle()

    daemon.duties.append(
        lambda: stay_listed(reach, upkeep, daemon.listing, ready, daemon.stopping, give_up, config.reach.unreachable_s)
    )
    daemon.on_stop = leave
    try:
        asyncio.run(daemon.run(ready))
    except OSError as exc:
        say(f"error: cannot listen on {daemon.host}:{daemon.port}: {exc}; pick a free port with --port")
        return 2
    return 1 if gave_up else 0


def _x25519():
    from shardmarket.chain.keys import x25519_key

    return x25519_key(home_keys())
