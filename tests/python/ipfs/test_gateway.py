"""The trustless gateway over real sockets, checked with our CAR reader and npm's `ipfs-car unpack`."""

import asyncio
import io
import random
import subprocess
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from multiformats import varint

from shardmarket.ipfs import pb
from shardmarket.ipfs.blockstore import Blockstore
from shardmarket.ipfs.car import CarError, read_car
from shardmarket.ipfs.cids import block_cid, to_str
from shardmarket.ipfs.gateway import make_app
from shardmarket.ipfs.unixfs import ImportOptions, directory_node, import_bytes, import_path

ROOT = Path(__file__).resolve().parents[3]
DATA = random.Random(7).randbytes(700_000)


async def serve(store: Blockstore) -> tuple[web.AppRunner, str]:
    runner = web.AppRunner(make_app(store))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, f"http://127.0.0.1:{port}"


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def store(tmp_path):
    return Blockstore(tmp_path / "store")


async def _get(store, path, headers=None):
    runner, base = await serve(store)
    try:
        async with aiohttp.ClientSession() as session, session.get(base + path, headers=headers or {}) as resp:
            return resp.status, resp.headers.copy(), await resp.read()
    finally:
        await runner.cleanup()


def test_raw_block(store):
    entry = import_bytes(DATA, ImportOptions(chunk_size=100_000), store)
    cid = entry.cid_str
    status, headers, body = run(_get(store, f"/ipfs/{cid}", {"Accept": "application/vnd.ipld.raw"}))
    assert status == 200 and body == store.get(entry.cid)
    assert headers["Content-Type"] == "application/vnd.ipld.raw"
    assert headers["ETag"] == f'"{cid}.raw"'
    assert "immutable" in headers["Cache-Control"] and headers["X-Content-Type-Options"] == "nosniff"
    status, _, body = run(_get(store, f"/ipfs/{cid}", {"Accept": "application/vnd.ipld.raw", "If-None-Match": f'"{cid}.raw"'}))
    assert status == 304 and body == b""
    assert run(_get(store, f"/ipfs/{cid}?format=raw"))[2] == store.get(entry.cid)


def test_errors(store):
    absent = import_bytes(b"not stored here").cid_str
    raw = {"Accept": "application/vnd.ipld.raw"}
    assert run(_get(store, f"/ipfs/{absent}", raw))[0] == 404
    status, _, body = run(_get(store, "/ipfs/not-a-cid", raw))
    assert status == 400 and b"not a valid CID" in body
    dag_cbor = "bafyreigh2akiscaildcqabsyg3dfr6chu3fgpregiymsck7e7aqa4s52zy"
    status, _, body = run(_get(store, f"/ipfs/{dag_cbor}", raw))
    assert status == 400 and b"codec dag-cbor" in body
    present = import_bytes(b"here", ImportOptions(), store).cid_str
    assert run(_get(store, f"/ipfs/{present}"))[0] == 406  # no trustless type asked for
    assert run(_get(store, f"/ipfs/{present}?format=car&dag-scope=nope"))[0] == 400
    assert run(_get(store, f"/ipfs/{present}", {"Accept": "application/vnd.ipld.car; version=2"}))[0] == 400


def _car(store, path, accept="application/vnd.ipld.car"):
    status, headers, body = run(_get(store, path, {"Accept": accept}))
    assert status == 200, body
    roots, blocks = read_car(io.BytesIO(body))
    return headers, roots, list(blocks)


def test_car_scopes(store):
    entry = import_bytes(DATA, ImportOptions(chunk_size=10_000), store)  # 70 leaves under one root
    cid = entry.cid_str
    headers, roots, blocks = _car(store, f"/ipfs/{cid}")
    assert headers["Content-Type"] == "application/vnd.ipld.car; version=1; order=dfs; dups=n"
    assert headers["ETag"].startswith(f'W/"{cid}.car.')
    assert roots == [entry.cid] and len(blocks) == 71 and blocks[0][0] == entry.cid
    _, _, blocks = _car(store, f"/ipfs/{cid}?dag-scope=block")
    assert [c for c, _ in blocks] == [entry.cid]
    _, _, blocks = _car(store, f"/ipfs/{cid}?dag-scope=entity&entity-bytes=25000:44999")
    assert len(blocks) == 1 + 3  # the root and leaves 2, 3, 4 (bytes 20000..49999)
    _, _, blocks = _car(store, f"/ipfs/{cid}?dag-scope=entity&entity-bytes=-5000:*")
    assert len(blocks) == 2


def test_car_of_a_path_and_directory_entity(store, tmp_path):
    (tmp_path / "d" / "sub").mkdir(parents=True)
    (tmp_path / "d" / "sub" / "f.bin").write_bytes(DATA[:50_000])
    root = import_path(tmp_path / "d", ImportOptions(chunk_size=10_000), store, recursive=True)
    headers, roots, blocks = _car(store, f"/ipfs/{root.cid_str}/sub/f.bin")
    assert roots == [root.cid] and len(blocks) == 2 + 1 + 5
    assert len(headers["X-Ipfs-Roots"].split(",")) == 3
    _, _, blocks = _car(store, f"/ipfs/{root.cid_str}?dag-scope=entity")
    assert [c for c, _ in blocks] == [root.cid]


def test_car_unpacks_with_npm_ipfs_car(store, tmp_path):
    for options in (ImportOptions(chunk_size=4096), ImportOptions(cid_version=1, chunk_size=1000)):
        entry = import_bytes(DATA, options, store)
        status, _, body = run(_get(store, f"/ipfs/{entry.cid_str}", {"Accept": "application/vnd.ipld.car"}))
        assert status == 200
        car = tmp_path / f"{entry.cid_str}.car"
        car.write_bytes(body)
        out = tmp_path / f"{entry.cid_str}.out"
        subprocess.run(
            [str(ROOT / "node_modules/.bin/ipfs-car"), "unpack", str(car), "--output", str(out)],
            check=True,
            capture_output=True,
            timeout=120,
        )
        assert out.read_bytes() == DATA


def test_truncated_or_lying_car_is_refused(store):
    entry = import_bytes(DATA, ImportOptions(chunk_size=10_000), store)
    _, _, body = run(_get(store, f"/ipfs/{entry.cid_str}", {"Accept": "application/vnd.ipld.car"}))
    with pytest.raises(CarError, match="truncated"):
        list(read_car(io.BytesIO(body[:-100]))[1])
    tampered = bytearray(body)
    tampered[-5] ^= 1
    with pytest.raises(CarError, match="does not match its CID"):
        list(read_car(io.BytesIO(bytes(tampered)))[1])


def _identity_cid(digest: bytes) -> bytes:
    """A raw-codec CIDv1 whose multihash is the identity hash of `digest` (the bytes are the content)."""
    mh = b"\x00" + bytes(varint.encode(len(digest))) + digest
    return b"\x01\x55" + mh


def test_hostile_cids_are_a_clear_4xx_that_shows_no_local_path(store):
    raw = {"Accept": "application/vnd.ipld.raw"}
    for cid, what in (
        (_identity_cid(b"x" * 300), b"at most 128"),  # a file name longer than any file system allows
        (b"\x01\x55\x12\xac\x02" + b"x" * 300, b"at most 128"),  # sha2-256 claiming a 300-byte digest
        (b"\x01\x55\x12\x04abcd", b"at least 20"),
    ):
        status, _, body = run(_get(store, f"/ipfs/{to_str(cid)}", raw))
        assert status == 400 and what in body, body
    absent = import_bytes(b"not stored here").cid_str
    answers = [
        run(_get(store, f"/ipfs/{absent}", raw)),
        run(_get(store, f"/ipfs/{absent}?format=car")),
        run(_get(store, f"/ipfs/{absent}/a/b?format=car")),
    ]
    for status, _, body in answers:
        assert status == 404 and absent.encode() in body and str(store.path).encode() not in body
        assert b"/" + store.path.name.encode() not in body


def test_a_link_no_store_can_hold_is_a_404_not_a_crash(store):
    """A DAG from a stranger (dispute evidence) can link a CID whose block cannot be a file here."""
    long_link = pb.Link(_identity_cid(b"y" * 200), "inline", 200)
    node = pb.encode_node([long_link], pb.encode_unixfs(pb.DIRECTORY))
    cid = block_cid(1, 0x70, node)
    store.put(cid, (node,))
    store.block_path(long_link.cid).parent.mkdir(exist_ok=True)  # the file system then sees the long name itself
    status, _, body = run(_get(store, f"/ipfs/{to_str(cid)}?format=car"))
    assert status == 404 and b"is not on this gateway" in body and str(store.path).encode() not in body


def test_a_deep_dag_is_served(store):
    entry = import_bytes(b"at the bottom", ImportOptions(), store)
    for _ in range(1500):  # deeper than Python's recursion limit
        entry = directory_node(ImportOptions(), {"d": entry}, store)
    _, roots, blocks = _car(store, f"/ipfs/{entry.cid_str}")
    assert roots == [entry.cid] and len(blocks) == 1501


def test_one_request_is_bounded_in_blocks(store):
    entry = import_bytes(DATA, ImportOptions(chunk_size=10_000), store)  # 71 blocks

    async def get(path):
        runner = web.AppRunner(make_app(store, max_car_blocks=50))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]
        try:
            async with aiohttp.ClientSession() as session, session.get(f"http://127.0.0.1:{port}{path}") as resp:
                return resp.status, await resp.read()
        finally:
            await runner.cleanup()

    status, body = run(get(f"/ipfs/{entry.cid_str}?format=car"))
    assert status == 400 and b"more than 50 blocks" in body and b"entity-bytes" in body
    status, body = run(get(f"/ipfs/{entry.cid_str}?format=car&dag-scope=entity&entity-bytes=0:99999"))
    assert status == 200 and len(list(read_car(io.BytesIO(body))[1])) == 11
