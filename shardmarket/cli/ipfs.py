"""`shardmarket ipfs add|cat|get|serve|pin|gc|dag`: Kubo-compatible content commands.

They read and write through one ContentStore (shardmarket.ipfs.store): the Kubo daemon named by
`SHARDMARKET_IPFS_API` when it is set, else the local blockstore, whose missing blocks come from the
configured gateways. `content_store` is where the cli picks it, from the config.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from shardmarket.config import load_config
from shardmarket.ipfs.blockstore import Blockstore, walk
from shardmarket.ipfs.car import CarError
from shardmarket.ipfs.cids import BadCID, parse, to_str
from shardmarket.ipfs.store import STORE_ERRORS, ContentStore, open_store
from shardmarket.ipfs.unixfs import AddError, ExportError, ImportOptions, export, import_path, iter_file

ERRORS = (AddError, ExportError, BadCID, CarError, OSError, *STORE_ERRORS)


def _fail(exc: Exception) -> int:
    print(f"error: {exc}", file=sys.stderr)
    return 1


def content_store(gateways: Sequence[str] | None = ()) -> ContentStore:
    """The configured store: Kubo's RPC API (`[ipfs] api`), else the local blockstore with `gateways` and the
    configured ones for what it lacks."""
    config = load_config().ipfs
    return open_store(config.store, config.api, [*(gateways or ()), *config.gateways])


def _options(args) -> ImportOptions:
    return ImportOptions.from_chunker(args.chunker, cid_version=args.cid_version, raw_leaves=args.raw_leaves)


def cmd_add(args) -> int:
    added: list[tuple[str, str]] = []
    try:
        options = _options(args)
        store = None if args.only_hash else content_store()
        total = sum(f.stat().st_size for p in args.paths for f in ([p] if p.is_file() else p.rglob("*")) if f.is_file())
        with tqdm(
            total=total, unit="B", unit_scale=True, desc="add", file=sys.stderr, disable=None if not args.quieter else True
        ) as bar:
            for path in args.paths:
                entry = import_path(
                    path,
                    options,
                    store,
                    recursive=args.recursive,
                    hidden=args.hidden,
                    on_added=lambda name, e: added.append((name, e.cid_str)),
                    progress=bar.update,
                )
                if store is not None and args.pin:
                    store.pin(entry.cid)
    except ERRORS as exc:
        return _fail(exc)
    if args.quieter:
        print(added[-1][1])
    for name, cid in [] if args.quieter else added:
        print(cid if args.quiet else f"added {cid} {name}")
    return 0


def cmd_cat(args) -> int:
    try:
        cid = bytes(parse(args.cid))
        store = content_store(args.gateway)
        store.fetch(cid)
        out = sys.stdout.buffer
        for piece in iter_file(store, cid):
            out.write(piece)
        out.flush()
    except ERRORS as exc:
        return _fail(exc)
    return 0


def cmd_get(args) -> int:
    try:
        cid = bytes(parse(args.cid))
        dest = Path(args.output or to_str(cid))
        if dest.exists():
            raise ExportError(f"{dest} already exists; choose another path with -o")
        store = content_store(args.gateway)
        store.fetch(cid)
        export(store, cid, dest)
    except ERRORS as exc:
        return _fail(exc)
    print(f"Saving file(s) to {dest}")
    return 0


def cmd_serve(args) -> int:
    from aiohttp import web

    from shardmarket.ipfs.gateway import make_app

    config = load_config().ipfs
    if config.api:
        return _fail(
            ValueError(
                "ipfs serve serves the local blockstore, which is unused while SHARDMARKET_IPFS_API names a Kubo daemon; "
                "Kubo serves its own trustless gateway (its Addresses.Gateway, e.g. http://127.0.0.1:8080)"
            )
        )
    store = Blockstore(config.store)
    print(f"trustless gateway for {store.path} on http://{args.host}:{args.port}/ipfs/", flush=True)
    web.run_app(make_app(store), host=args.host, port=args.port, print=None)
    return 0


def cmd_pin(args) -> int:
    try:
        store = content_store(args.gateway)
        if args.action == "ls":
            for pinned in store.pins():
                print(f"{pinned} recursive")
            return 0
        cid = bytes(parse(args.cid))
        if args.action == "add":
            store.pin(cid)
            print(f"pinned {to_str(cid)} recursively")
        else:
            store.unpin(cid)
            print(f"unpinned {to_str(cid)}")
    except ERRORS as exc:
        return _fail(exc)
    return 0


def cmd_gc(args) -> int:
    try:
        removed = content_store().gc()
    except ERRORS as exc:
        return _fail(exc)
    print(f"removed {removed} blocks")
    return 0


def cmd_dag_export(args) -> int:
    from shardmarket.ipfs.car import header, section

    try:
        cid = bytes(parse(args.cid))
        store = content_store(args.gateway)
        store.fetch(cid)
        out = sys.stdout.buffer
        out.write(header([cid]))
        for c, data in walk(store, cid):
            out.write(b"".join(section(c, data)))
        out.flush()
    except ERRORS as exc:
        return _fail(exc)
    return 0


def cmd_dag_import(args) -> int:
    from shardmarket.ipfs.car import read_car

    try:
        store = content_store()
        with open(args.car, "rb") as f:
            roots, blocks = read_car(f)
            count = 0
            for cid, data in blocks:  # each block is verified by the reader before it is stored
                store.put(cid, (data,))
                count += 1
        for root in roots:
            store.pin(root)
    except ERRORS as exc:
        return _fail(exc)
    for root in roots:
        print(f"pinned root {to_str(root)} ({count} blocks imported)")
    return 0


TRUE, FALSE = {"1", "t", "true"}, {"0", "f", "false"}  # Kubo's spellings (Go's strconv.ParseBool, lower-cased)


class KuboFlagParser(argparse.ArgumentParser):
    """Takes Kubo's boolean flags as Kubo does: `--flag` or `--flag=true|false`, never a separate value (a following
    word is a path)."""

    def parse_known_args(self, args=None, namespace=None):
        return super().parse_known_args([self._kubo_flag(arg) for arg in (sys.argv[1:] if args is None else args)], namespace)

    def _kubo_flag(self, arg: str) -> str:
        name, sep, value = arg.partition("=")
        if not sep or f"--no-{name[2:]}" not in self._option_string_actions or value.lower() not in TRUE | FALSE:
            return arg
        return name if value.lower() in TRUE else f"--no-{name[2:]}"


def _flag(parser: argparse.ArgumentParser, *names: str, text: str, default: bool | None = False) -> None:
    """A Kubo boolean flag: `--name`, `--name=false` (and `--no-name`)."""
    parser.add_argument(*names, action=argparse.BooleanOptionalAction, default=default, help=text)


def register(commands) -> None:
    group = commands.add_parser("ipfs", help="content-addressed storage compatible with Kubo (add, cat, get, serve)")
    sub = group.add_subparsers(dest="ipfs_command", required=True, metavar="COMMAND", parser_class=KuboFlagParser)

    add = sub.add_parser("add", help="add files (Kubo's CIDs, flags and output)")
    add.add_argument("paths", nargs="+", type=Path, metavar="PATH")
    _flag(add, "-r", "--recursive", text="add directories recursively")
    _flag(add, "-n", "--only-hash", text="only chunk and hash; write nothing")
    add.add_argument("--cid-version", type=int, choices=(0, 1), default=0, help="CID version (1 turns on raw leaves)")
    _flag(add, "--raw-leaves", default=None, text="use raw blocks for leaves (default: on with --cid-version 1)")
    add.add_argument("-s", "--chunker", default="size-262144", help="chunking algorithm, size-N (default size-262144)")
    _flag(add, "-q", "--quiet", text="print only CIDs")
    _flag(add, "-Q", "--quieter", text="print only the final root CID")
    _flag(add, "-H", "--hidden", text="include files whose name starts with a dot")
    _flag(add, "--pin", default=True, text="pin what is added (default true)")
    add.set_defaults(run=cmd_add)

    for name, run, text in (("cat", cmd_cat, "print a file's bytes"), ("get", cmd_get, "write a file or directory")):
        p = sub.add_parser(name, help=text)
        p.add_argument("cid", metavar="CID")
        p.add_argument("--gateway", action="append", metavar="URL", help="trustless gateway to fetch missing blocks from")
        if name == "get":
            p.add_argument("-o", "--output", help="where to write (default: the CID)")
        p.set_defaults(run=run)

    serve = sub.add_parser("serve", help="serve the blockstore as a trustless gateway")
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8080)
    serve.set_defaults(run=cmd_serve)

    pin = sub.add_parser("pin", help="pin add|rm CID, pin ls")
    pin.add_argument("action", choices=("add", "rm", "ls"))
    pin.add_argument("cid", nargs="?", metavar="CID")
    pin.add_argument("--gateway", action="append", metavar="URL", help="trustless gateway to fetch missing blocks from")
    pin.set_defaults(
        run=lambda args: cmd_pin(args) if args.action == "ls" or args.cid else _fail(ValueError(f"pin {args.action} needs a CID"))
    )

    sub.add_parser("gc", help="delete blocks that no pin reaches").set_defaults(run=cmd_gc)

    dag = sub.add_parser("dag", help="CAR v1 archives: dag export CID > FILE.car, dag import FILE.car")
    dag_sub = dag.add_subparsers(dest="dag_command", required=True, metavar="COMMAND")
    export_ = dag_sub.add_parser("export", help="write the DAG of a CID as a CAR to stdout")
    export_.add_argument("cid", metavar="CID")
    export_.add_argument("--gateway", action="append", metavar="URL", help="trustless gateway for missing blocks")
    export_.set_defaults(run=cmd_dag_export)
    import_ = dag_sub.add_parser("import", help="verify and store every block of a CAR, pin its roots")
    import_.add_argument("car", type=Path, metavar="FILE.car")
    import_.set_defaults(run=cmd_dag_import)
