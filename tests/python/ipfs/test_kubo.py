"""Kubo RPC backend against a stand-in server speaking Kubo's documented RPC formats.

No Kubo daemon can be installed on this machine, so the server below implements the request and
response formats of https://docs.ipfs.tech/reference/kubo/rpc/ (POST only, query arguments,
multipart files with escaped relative paths, NDJSON answers, JSON errors) over a real socket.
"""

import asyncio
import json
import random
import threading
from urllib.parse import unquote

import pytest
from aiohttp import web

from shardmarket.cli import main
from shardmarket.ipfs.blockstore import Blockstore
from shardmarket.ipfs.cids import parse
from shardmarket.ipfs.kubo import KuboClient, KuboError
from shardmarket.ipfs.unixfs import FileBuilder, ImportOptions, directory_node, import_path, iter_file

ADD_OPTIONS = {"cid-version", "chunker", "recursive", "only-hash", "pin", "hidden", "raw-leaves"}


def kubo_app(store: Blockstore, lie: bool = False) -> web.Application:
    pins: set[str] = set()

    def error(message, status=500):
        return web.json_response({"Message": message, "Code": 0, "Type": "error"}, status=status)

    async def add(request):
        q = request.query
        if set(q) - ADD_OPTIONS:
            return error(f"unknown option {set(q) - ADD_OPTIONS}", 400)
        raw = None if "raw-leaves" not in q else q["raw-leaves"] == "true"
        options = ImportOptions.from_chunker(
            q.get("chunker", "size-262144"), cid_version=int(q.get("cid-version", 0)), raw_leaves=raw
        )
        reader = await request.multipart()
        entries, dirs, lines = {}, [], []
        while (part := await reader.next()) is not None:
            name = unquote(part.filename)
            if part.headers.get("Content-Type") == "application/x-directory":
                dirs.append(name)
                continue
            builder = FileBuilder(options, None if q.get("only-hash") == "true" else store)
            pending = bytearray()
            while chunk := await part.read_chunk(options.chunk_size):
                pending += chunk
                while len(pending) >= options.chunk_size:
                    builder.add_chunk(bytes(pending[: options.chunk_size]))
                    del pending[: options.chunk_size]
            if pending:
                builder.add_chunk(bytes(pending))
            entries[name] = builder.finish()
            lines.append({"Name": name, "Hash": entries[name].cid_str, "Size": str(entries[name].tsize)})
        for d in sorted(dirs, key=lambda p: -p.count("/")):
            children = {n[len(d) + 1 :]: e for n, e in entries.items() if n.startswith(d + "/") and "/" not in n[len(d) + 1 :]}
            entries[d] = directory_node(options, children, store)
            lines.append({"Name": d, "Hash": entries[d].cid_str, "Size": str(entries[d].tsize)})
        if q.get("pin", "true") == "true":
            pins.add(lines[-1]["Hash"])
        return web.Response(text="".join(json.dumps(line) + "\n" for line in lines), content_type="application/json")

    async def cat(request):
        return web.Response(body=b"".join(iter_file(store, bytes(parse(request.query["arg"])))))

    async def block_get(request):
        cid = bytes(parse(request.query["arg"]))
        if not store.has(cid):
            return error(f"block was not found locally (offline): ipld: could not find {request.query['arg']}")
        block = store.get(cid)
        return web.Response(body=block[:-1] + b"?" if lie else block, content_type="text/plain")

    async def pin_add(request):
        pins.add(request.query["arg"])
        return web.json_response({"Pins": [request.query["arg"]]})

    async def pin_rm(request):
        if request.query["arg"] not in pins:
            return error("not pinned or pinned indirectly")
        pins.discard(request.query["arg"])
        return web.json_response({"Pins": [request.query["arg"]]})

    async def pin_ls(request):
        return web.json_response({"Keys": {p: {"Type": "recursive"} for p in pins}})

    async def gc(request):
        return web.Response(text="")

    async def not_post(request):
        return web.Response(status=405, text="405 - Method Not Allowed")

    app = web.Application()
    for path, handler in (
        ("add", add),
        ("cat", cat),
        ("block/get", block_get),
        ("pin/add", pin_add),
        ("pin/rm", pin_rm),
        ("pin/ls", pin_ls),
        ("repo/gc", gc),
    ):
        app.router.add_post(f"/api/v0/{path}", handler)
        app.router.add_get(f"/api/v0/{path}", not_post)
    return app


@pytest.fixture
def kubo(tmp_path):
    """The stand-in daemon in a thread of its own, as a separate daemon would be."""
    store = Blockstore(tmp_path / "kubo")
    loop = asyncio.new_event_loop()
    ready = threading.Event()
    box = {}

    async def up():
        runner = web.AppRunner(kubo_app(store))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        box["runner"], box["url"] = runner, f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"
        ready.set()

    thread = threading.Thread(target=lambda: (loop.run_until_complete(up()), loop.run_forever()), daemon=True)
    thread.start()
    ready.wait(10)
    yield box["url"], store
    asyncio.run_coroutine_threadsafe(box["runner"].cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


def test_cli_add_cat_get_pin_through_kubo(kubo, tmp_path, monkeypatch, capsys):
    url, _ = kubo
    monkeypatch.setenv("SHARDMARKET_IPFS_API", url)
    (tmp_path / "d" / "s").mkdir(parents=True)
    data = random.Random(3).randbytes(20_000)
    (tmp_path / "d" / "s" / "f.bin").write_bytes(data)
    (tmp_path / "d" / "g.txt").write_text("hello world\n")
    assert main(["ipfs", "add", "-r", "--chunker", "size-4096", "--cid-version", "1", str(tmp_path / "d")]) == 0
    lines = capsys.readouterr().out.splitlines()
    ours = import_path(tmp_path / "d", ImportOptions(cid_version=1, chunk_size=4096), recursive=True)
    assert lines[-1] == f"added {ours.cid_str} d" and len(lines) == 4
    assert main(["ipfs", "get", ours.cid_str, "-o", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "s" / "f.bin").read_bytes() == data
    file_cid = next(line.split()[1] for line in lines if line.endswith("g.txt"))
    assert main(["ipfs", "cat", file_cid]) == 0
    assert capsys.readouterr().out.endswith("hello world\n")
    assert main(["ipfs", "pin", "ls"]) == 0
    assert f"{ours.cid_str} recursive" in capsys.readouterr().out
    assert main(["ipfs", "pin", "rm", "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o"]) == 1
    assert "not pinned" in capsys.readouterr().err


def test_lying_kubo_block_is_refused(tmp_path):
    store = Blockstore(tmp_path / "kubo")
    entry = import_path(_file(tmp_path), ImportOptions(), store)

    async def main_():
        runner = web.AppRunner(kubo_app(store, lie=True))
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        try:
            async with KuboClient(f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}") as k:
                with pytest.raises(KuboError, match="do not match"):
                    await k.block_get(entry.cid)
        finally:
            await runner.cleanup()

    asyncio.run(main_())


def test_unreachable_kubo_says_what_to_do(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("SHARDMARKET_IPFS_API", "http://127.0.0.1:9")
    assert main(["ipfs", "add", str(_file(tmp_path))]) == 1
    assert "is `ipfs daemon` running?" in capsys.readouterr().err


def _file(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("some bytes\n")
    return path
