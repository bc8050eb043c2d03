"""Fetching from several real gateways (sockets), some of which misbehave on purpose."""

import asyncio
import random
import socket
import time
from collections import Counter

import aiohttp
import pytest
from aiohttp import web

from shardmarket.ipfs.blockstore import Blockstore
from shardmarket.ipfs.car import section
from shardmarket.ipfs.fetch import DagFetcher, FetchError
from shardmarket.ipfs.gateway import gateway_routes
from shardmarket.ipfs.unixfs import ImportOptions, import_bytes, import_path, iter_file

DATA = random.Random(11).randbytes(1_000_000)


async def start(app: web.Application) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"


def honest(store: Blockstore, hits: Counter, name: str) -> web.Application:
    @web.middleware
    async def count(request, handler):
        hits[name] += 1
        return await handler(request)

    app = web.Application(middlewares=[count])
    app.add_routes(gateway_routes(store))
    return app


def misbehaving(upstream: str, mode: str, hits: Counter) -> web.Application:
    """A gateway that relays an honest one but truncates, tampers with, or pads its CARs."""
    unrelated = import_bytes(b"a block nobody asked for", ImportOptions(cid_version=1))

    async def handler(request):
        hits[mode] += 1
        async with aiohttp.ClientSession() as s, s.get(upstream + request.path_qs, headers=request.headers) as r:
            body = await r.read()
            if r.status != 200 or "car" not in r.headers["Content-Type"]:
                return web.Response(status=r.status, body=body, headers={"Content-Type": r.headers["Content-Type"]})
        if mode == "truncate":
            body = body[: len(body) // 2]
        elif mode == "tamper":
            body = body[:-3] + bytes([body[-3] ^ 0xFF]) + body[-2:]
        elif mode == "pad":
            body += b"".join(section(unrelated.cid, b"a block nobody asked for"))
        return web.Response(body=body, content_type="application/vnd.ipld.car")

    app = web.Application()
    app.router.add_get("/ipfs/{tail:.*}", handler)
    return app


def redirecting(upstream: str, hits: Counter) -> web.Application:
    """A gateway that answers every request with a redirect to another one (as subdomain gateways do)."""

    async def handler(request):
        hits["redirect"] += 1
        raise web.HTTPFound(upstream + request.path_qs)

    app = web.Application()
    app.router.add_get("/ipfs/{tail:.*}", handler)
    return app


async def start_broken_http(mode: str, hits: Counter) -> tuple[asyncio.AbstractServer, str]:
    """A raw TCP "gateway" that breaks HTTP itself: hangs up, answers garbage, sends a bad chunk, or never answers."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        hits[mode] += 1
        try:
            await reader.readuntil(b"\r\n\r\n")
            if mode == "stall":
                await asyncio.sleep(30)
            elif mode == "garbage":
                writer.write(b"this is not HTTP\r\n\r\n")
            elif mode == "bad-chunk":
                writer.write(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/vnd.ipld.car\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n"
                )
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    return server, f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"


@pytest.fixture
def source(tmp_path):
    store = Blockstore(tmp_path / "source")
    return store, import_bytes(DATA, ImportOptions(chunk_size=8192), store)  # 123 leaves


def fetch(store, gateways, root, range_bytes=100_000):
    return DagFetcher(store, gateways, range_bytes=range_bytes, progress=False).fetch(root)


def from_two_honest_gateways(src: Blockstore, dest: Blockstore, root: bytes) -> tuple[Blockstore, Counter]:
    """Fetch `root` into `dest` from two honest gateways over `src`; returns dest and the requests each one served."""

    async def main():
        hits = Counter()
        a, url_a = await start(honest(src, hits, "a"))
        b, url_b = await start(honest(src, hits, "b"))
        try:
            await fetch(dest, [url_a, url_b], root)
            return dest, hits
        finally:
            await a.cleanup()
            await b.cleanup()

    return asyncio.run(main())


def test_blocks_spread_over_gateways(tmp_path, source):
    src, entry = source

    dest, hits = from_two_honest_gateways(src, Blockstore(tmp_path / "dest"), entry.cid)
    assert b"".join(iter_file(dest, entry.cid)) == DATA
    assert hits["a"] >= 2 and hits["b"] >= 2 and hits["a"] + hits["b"] == 1 + 10  # root + 10 ranges


@pytest.mark.parametrize("mode", ["truncate", "tamper", "pad"])
def test_bad_gateway_is_survived(tmp_path, source, mode):
    src, entry = source

    async def main():
        hits = Counter()
        good, url = await start(honest(src, hits, "good"))
        bad, bad_url = await start(misbehaving(url, mode, hits))
        try:
            dest = Blockstore(tmp_path / "dest")
            await fetch(dest, [bad_url, url], entry.cid)
            return dest, hits
        finally:
            await bad.cleanup()
            await good.cleanup()

    dest, hits = asyncio.run(main())
    assert hits[mode] >= 1
    assert b"".join(iter_file(dest, entry.cid)) == DATA
    assert {p.name for p in dest.keys()} == {p.name for p in src.keys()}  # nothing unrelated was stored


@pytest.mark.parametrize("mode", ["hangup", "garbage", "bad-chunk", "stall"])
def test_gateway_that_breaks_http_is_survived(tmp_path, source, mode):
    src, entry = source

    async def main():
        hits = Counter()
        good, url = await start(honest(src, hits, "good"))
        bad, bad_url = await start_broken_http(mode, hits)
        try:
            dest = Blockstore(tmp_path / "dest")
            fetcher = DagFetcher(dest, [bad_url, url], range_bytes=100_000, progress=False, timeout_s=0.3)
            await fetcher.fetch(entry.cid)
            return dest, hits
        finally:
            bad.close()
            await good.cleanup()

    dest, hits = asyncio.run(main())
    assert hits[mode] >= 2  # the root block and at least one range were asked of it
    assert b"".join(iter_file(dest, entry.cid)) == DATA


def test_a_cancelled_fetch_stops_at_once(tmp_path, source):
    src, entry = source

    async def main():
        hits = Counter()
        good, url = await start(honest(src, hits, "good"))
        stall, stall_url = await start_broken_http("stall", hits)
        fetcher = DagFetcher(Blockstore(tmp_path / "dest"), [url, stall_url], range_bytes=100_000, progress=False, timeout_s=60)
        started = time.monotonic()
        try:
            with pytest.raises(asyncio.TimeoutError):
                await asyncio.wait_for(fetcher.fetch(entry.cid), 1)  # two ranges hang on the silent gateway
        finally:
            stall.close()
            await good.cleanup()
        return time.monotonic() - started

    assert asyncio.run(main()) < 5  # not the 60 s socket timeout


def test_a_fetch_cancelled_while_asking_for_the_root_stops_at_once(tmp_path, source):
    _, entry = source
    silent = socket.create_server(("127.0.0.1", 0))  # the kernel completes connections; nobody ever answers
    url = f"http://127.0.0.1:{silent.getsockname()[1]}"

    async def main():
        fetcher = DagFetcher(Blockstore(tmp_path / "dest"), [url], progress=False, timeout_s=60)
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(fetcher.fetch(entry.cid), 0.5)

    started = time.monotonic()
    with silent:
        asyncio.run(main())  # returns once every thread is done
        assert time.monotonic() - started < 5  # not the 60 s socket timeout


def test_redirects_are_followed(tmp_path, source):
    src, entry = source

    async def main():
        hits = Counter()
        good, url = await start(honest(src, hits, "good"))
        redirect, redirect_url = await start(redirecting(url, hits))
        try:
            dest = Blockstore(tmp_path / "dest")
            await fetch(dest, [redirect_url], entry.cid)
            return dest, hits
        finally:
            await redirect.cleanup()
            await good.cleanup()

    dest, hits = asyncio.run(main())
    assert hits["redirect"] == hits["good"] == 1 + 10  # the root block and 10 ranges, each redirected once
    assert b"".join(iter_file(dest, entry.cid)) == DATA


def test_failure_then_resume(tmp_path, source):
    src, entry = source
    dest = Blockstore(tmp_path / "dest")

    async def attempt(mode):
        hits = Counter()
        good, url = await start(honest(src, hits, "good"))
        bad, bad_url = await start(misbehaving(url, mode, hits))
        try:
            await fetch(dest, [bad_url] if mode == "truncate" else [url], entry.cid)
        finally:
            await bad.cleanup()
            await good.cleanup()
        return hits

    with pytest.raises(FetchError, match="run the same command again to resume"):
        asyncio.run(attempt("truncate"))
    kept = len(list(dest.keys()))
    assert kept > 1  # the halves that arrived were verified and kept
    hits = asyncio.run(attempt("resume"))
    assert b"".join(iter_file(dest, entry.cid)) == DATA
    assert hits["good"] < 1 + 10  # ranges already complete were not asked for again


def test_directory_and_missing_root(tmp_path):
    src = Blockstore(tmp_path / "src")
    (tmp_path / "d" / "s").mkdir(parents=True)
    (tmp_path / "d" / "s" / "x").write_bytes(DATA[:30_000])
    (tmp_path / "d" / "y").write_bytes(DATA[30_000:40_000])
    root = import_path(tmp_path / "d", ImportOptions(chunk_size=4096), src, recursive=True)
    absent = import_bytes(b"nobody has this")

    async def main():
        runner, url = await start(honest(src, Counter(), "g"))
        try:
            dest = Blockstore(tmp_path / "dest")
            await fetch(dest, [url], root.cid)
            with pytest.raises(FetchError, match="HTTP 404"):
                await fetch(dest, [url], absent.cid)
            return dest
        finally:
            await runner.cleanup()

    dest = asyncio.run(main())
    assert {p.name for p in dest.keys()} == {p.name for p in src.keys()}


def test_big_file_inside_a_directory_is_split_into_ranges(tmp_path):
    src = Blockstore(tmp_path / "src")
    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "big.bin").write_bytes(DATA)
    (tmp_path / "d" / "small.txt").write_text("small\n")
    root = import_path(tmp_path / "d", ImportOptions(chunk_size=8192), src, recursive=True)

    dest, hits = from_two_honest_gateways(src, Blockstore(tmp_path / "dest"), root.cid)
    assert {p.name for p in dest.keys()} == {p.name for p in src.keys()}
    # the directory and big.bin's root block, then 10 ranges of big.bin and small.txt whole, over both gateways
    assert hits["a"] + hits["b"] == 2 + 10 + 1 and hits["a"] >= 3 and hits["b"] >= 3
