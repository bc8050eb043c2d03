"""Trustless IPFS HTTP gateway (aiohttp): `GET /ipfs/{cid}[/path]` as a raw block or a CAR v1 stream.

Follows https://specs.ipfs.tech/http-gateways/trustless-gateway/: `Accept` (or `?format=`) picks
`application/vnd.ipld.raw` or `application/vnd.ipld.car`; CARs honour `dag-scope` (all, entity, block)
and `entity-bytes=from:to`; responses are immutable with ETags. Whatever a stranger asks for, the answer is a
4xx that names no local path, and one request walks at most `max_car_blocks` blocks.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import logging
from collections.abc import Iterable

from aiohttp import web

from shardmarket.ipfs import pb
from shardmarket.ipfs.blockstore import BlockNotFound, Blockstore, BlockstoreError, CorruptBlock
from shardmarket.ipfs.car import header, section
from shardmarket.ipfs.cids import DAG_PB, BadCID, parse, split, to_str
from shardmarket.ipfs.pb import varint

log = logging.getLogger(__name__)

RAW_TYPE = "application/vnd.ipld.raw"
CAR_TYPE = "application/vnd.ipld.car"
IMMUTABLE = "public, max-age=29030400, immutable"
MAX_CAR_BLOCKS = 1 << 16  # 16 GiB of 256 KiB leaves: any one shard; bigger DAGs are asked for in parts


class BadRequest(ValueError):
    """A request the gateway cannot answer as asked (the message is sent back with status 400)."""


def parse_entity_bytes(value: str, filesize: int) -> tuple[int, int]:
    """`from:to` (inclusive, negative counts from the end, `*` is the end) as a half-open [start, stop)."""
    try:
        first, _, last = value.partition(":")
        start = int(first)
        stop = filesize if last == "*" else int(last) + 1
    except ValueError:
        raise BadRequest(f"entity-bytes={value!r} is not from:to with integers or *") from None
    start = max(filesize + start, 0) if start < 0 else start
    stop = filesize + stop if stop <= 0 and last != "*" else stop
    return start, min(max(stop, start), filesize)


def _node(store: Blockstore, cid: bytes) -> tuple[bytes, list[pb.Link], pb.UnixFSData | None]:
    block = store.get_unchecked(cid)  # trustless clients hash every block; local reads (cat, get) verify
    if split(cid)[0] != DAG_PB:
        return block, [], None
    return block, *_decode(block)


@functools.lru_cache(maxsize=256)
def _decode(block: bytes) -> tuple[list[pb.Link], pb.UnixFSData | None]:
    """Links and UnixFS data of a dag-pb block, cached: every range request of a file walks the same nodes."""
    links, data = pb.decode_node(block)
    try:
        fs = pb.decode_unixfs(data) if data is not None else None
    except pb.DecodeError:
        fs = None  # plain dag-pb: still traversable by its links
    return links, fs


def _peek(store: Blockstore, cid: bytes) -> tuple[int, list[pb.Link], pb.UnixFSData | None]:
    """Size, links and UnixFS data of a block; a block that cannot have links is not read at all.

    dag-pb puts Links (tag 0x12) before Data, so a dag-pb block not starting with 0x12 has none.
    """
    if split(cid)[0] != DAG_PB:
        return store.head(cid, 0)[0], [], None
    size, first = store.head(cid, 1)
    if first != b"\x12":
        return size, [], None
    block, links, fs = _node(store, cid)
    return len(block), links, fs


def dag_plan(
    store: Blockstore,
    root: bytes,
    scope: str = "all",
    byte_range: str | None = None,
    already_sent: Iterable[bytes] = (),
    max_blocks: int = MAX_CAR_BLOCKS,
) -> list[tuple[bytes, int]]:
    """(CID, size) of the DAG's blocks in depth-first order without duplicates, limited by `dag-scope`; more than
    `max_blocks` blocks is a BadRequest."""
    seen: set[bytes] = {split(cid)[1] for cid in already_sent}
    plan: list[tuple[bytes, int]] = []
    stack: list[tuple[bytes, int, tuple[int, int] | None]] = [(root, 0, None)]  # a DAG can be deeper than the C stack
    while stack:
        cid, depth, window = stack.pop()
        mh = split(cid)[1]
        if mh in seen:
            continue
        seen.add(mh)
        if len(plan) == max_blocks:
            raise BadRequest(
                f"the DAG under {to_str(root)} has more than {max_blocks} blocks; ask for it in parts "
                "(dag-scope=entity&entity-bytes=from:to, or the CIDs it links)"
            )
        size, links, fs = _peek(store, cid)
        plan.append((cid, size))
        if scope == "block" and depth == 0:
            continue
        file = fs if fs is not None and fs.type in (pb.FILE, pb.RAW) else None
        if scope == "entity" and depth == 0 and file is None and fs is not None:
            continue  # a directory entity is its own node only
        if window is None and byte_range is not None and file is not None and depth == 0:
            window = parse_entity_bytes(byte_range, file.filesize or 0)
        children: list[tuple[bytes, int, tuple[int, int] | None]] = []
        if window is None or file is None or len(file.blocksizes) != len(links):
            children = [(link.cid, depth + 1, None) for link in links]
        else:
            start, stop = window
            offset = len(file.data or b"")
            for link, child_size in zip(links, file.blocksizes, strict=True):
                if offset < stop and offset + child_size > start and start < stop:
                    children.append((link.cid, depth + 1, (max(start - offset, 0), min(stop - offset, child_size))))
                offset += child_size
        stack.extend(reversed(children))
    return plan


def resolve(store: Blockstore, root: bytes, path: str) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """Follow a UnixFS path from `root`; return the target CID and the blocks on the way (for the CAR)."""
    cid, trail = root, []
    for name in [p for p in path.split("/") if p]:
        block, links, fs = _node(store, cid)
        if fs is None or fs.type != pb.DIRECTORY:
            raise BadRequest(f"{to_str(cid)} is not a directory, so it has no entry {name!r}")
        trail.append((cid, block))
        match = [link for link in links if link.name == name]
        if not match:
            raise web.HTTPNotFound(text=f"no entry {name!r} in directory {to_str(cid)}\n")
        cid = match[0].cid
    return cid, trail


def _wanted_format(request: web.Request) -> tuple[str | None, dict[str, str]]:
    fmt = request.query.get("format")
    if fmt == "raw":
        return RAW_TYPE, {}
    if fmt == "car":
        return CAR_TYPE, {}
    if fmt is not None:
        raise BadRequest(f"format={fmt!r} is not served here; use raw or car")
    for item in request.headers.get("Accept", "").split(","):
        kind, *params = [p.strip() for p in item.split(";")]
        if kind in (RAW_TYPE, CAR_TYPE):
            return kind, dict(p.split("=", 1) for p in params if "=" in p)
    return None, {}


def gateway_routes(store: Blockstore, max_car_blocks: int = MAX_CAR_BLOCKS) -> web.RouteTableDef:
    """Routes of the trustless gateway over `store`, for mounting in any aiohttp app."""
    routes = web.RouteTableDef()

    @routes.get("/ipfs/{cid}")
    @routes.get("/ipfs/{cid}/{path:.*}")
    async def get(request: web.Request) -> web.StreamResponse:
        try:
            root = bytes(parse(request.match_info["cid"]))
            kind, params = _wanted_format(request)
            if kind is None:
                raise web.HTTPNotAcceptable(
                    text=f"this is a trustless gateway: send Accept: {RAW_TYPE} or {CAR_TYPE} (or ?format=raw|car)\n"
                )
            cid, trail = resolve(store, root, request.match_info.get("path", ""))
            if kind == RAW_TYPE:
                if trail:
                    raise BadRequest("raw blocks are served for a bare CID only; request the CID of the block")
                return _raw_response(request, store, cid)
            return await _car_response(request, store, root, cid, trail, params, max_car_blocks)
        except (BadCID, BadRequest, pb.DecodeError) as exc:
            raise web.HTTPBadRequest(text=f"{exc}\n") from None
        except BlockNotFound as exc:
            raise web.HTTPNotFound(text=f"block {to_str(exc.cid)} is not on this gateway\n") from None
        except BlockstoreError as exc:  # corrupt or unreadable: the store's own words may name local paths
            log.warning("gateway cannot serve %s: %s", request.path, exc)
            raise web.HTTPInternalServerError(text="this gateway cannot read that block now\n") from None

    return routes


def _common_headers(etag: str, content_type: str, filename: str) -> dict[str, str]:
    return {
        "Content-Type": content_type,
        "ETag": etag,
        "Cache-Control": IMMUTABLE,
        "X-Content-Type-Options": "nosniff",
        "Content-Disposition": f'attachment; filename="{filename}"',
        "Vary": "Accept",
    }


def _raw_response(request: web.Request, store: Blockstore, cid: bytes) -> web.Response:
    name = to_str(cid)
    etag = f'"{name}.raw"'
    headers = _common_headers(etag, RAW_TYPE, f"{name}.bin")
    if request.headers.get("If-None-Match") == etag:
        return web.Response(status=304, headers=headers)
    return web.Response(body=store.get_unchecked(cid), headers=headers)


async def _car_response(
    request: web.Request,
    store: Blockstore,
    root: bytes,
    cid: bytes,
    trail: list[tuple[bytes, bytes]],
    params: dict[str, str],
    max_blocks: int,
) -> web.StreamResponse:
    if params.get("version", "1") != "1":
        raise BadRequest(f"CAR version {params['version']} is not served here; ask for version=1")
    if params.get("order", "dfs") not in ("dfs", "unk"):
        raise BadRequest(f"CAR order={params['order']} is not served here; ask for order=dfs")
    scope = request.query.get("dag-scope", "all")
    if scope not in ("all", "entity", "block"):
        raise BadRequest(f"dag-scope={scope!r} is not one of all, entity, block")
    byte_range = request.query.get("entity-bytes")
    if byte_range is not None and scope != "entity":
        raise BadRequest("entity-bytes needs dag-scope=entity")
    # every block is located before a byte is sent, so a missing one is a 404, not a cut stream; in a thread, so that
    # one big plan does not hold up every other request
    plan = await asyncio.to_thread(dag_plan, store, cid, scope, byte_range, [c for c, _ in trail], max_blocks)
    key = f"{request.path}|{scope}|{byte_range}".encode()
    etag = f'W/"{to_str(root)}.car.{hashlib.sha256(key).hexdigest()[:16]}"'
    headers = _common_headers(etag, f"{CAR_TYPE}; version=1; order=dfs; dups=n", f"{to_str(root)}.car")
    headers["X-Ipfs-Roots"] = ",".join(to_str(c) for c in [*(c for c, _ in trail), cid])
    if request.headers.get("If-None-Match") == etag:
        return web.Response(status=304, headers=headers)
    head = header([root])
    trail_sections = [b"".join(section(c, data)) for c, data in trail]
    response = web.StreamResponse(headers=headers)
    response.content_length = (
        len(head) + sum(map(len, trail_sections)) + sum(len(varint(len(c) + size)) + len(c) + size for c, size in plan)
    )
    await response.prepare(request)
    if request.method == "HEAD":
        return response
    await response.write(head + b"".join(trail_sections))
    try:
        for c, size in plan:
            await response.write(_section_of_file(store, c, size))
    except (BlockNotFound, CorruptBlock) as exc:
        log.warning("CAR for %s cut short: %s", to_str(root), exc)
        raise  # the connection is dropped, so the client sees a truncated CAR instead of a silent gap
    await response.write_eof()
    return response


def _section_of_file(store: Blockstore, cid: bytes, size: int) -> bytearray:
    """A block's CAR section (framing, then the file read in behind it): one buffer, one write, no join."""
    framing = varint(len(cid) + size) + cid
    buf = bytearray(len(framing) + size)
    buf[: len(framing)] = framing
    with store.open_block(cid) as f:
        if f.readinto(memoryview(buf)[len(framing) :]) != size or f.read(1):
            raise CorruptBlock(f"block {to_str(cid)} changed size while being served")
    return buf


def make_app(store: Blockstore, max_car_blocks: int = MAX_CAR_BLOCKS) -> web.Application:
    """A stand-alone gateway app (what `shardmarket ipfs serve` runs)."""
    app = web.Application()
    app.add_routes(gateway_routes(store, max_car_blocks))
    return app
