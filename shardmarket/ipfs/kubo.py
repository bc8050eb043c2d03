"""Kubo RPC backend (aiohttp): add, cat, verified block reads and pins through a user's Kubo daemon.

Speaks Kubo's documented RPC API (https://docs.ipfs.tech/reference/kubo/rpc/): every call is a POST
to /api/v0/<command>, arguments in the query string, files as multipart/form-data; streaming answers
are newline-delimited JSON; errors are JSON {"Message", "Code", "Type": "error"}.
"""

from __future__ import annotations

import json
import os
from collections.abc import AsyncIterator
from pathlib import Path
from urllib.parse import quote

import aiohttp

from shardmarket.ipfs.blockstore import Blockstore, links_of
from shardmarket.ipfs.cids import to_str, verify
from shardmarket.ipfs.unixfs import ImportOptions


class KuboError(RuntimeError):
    """Kubo answered with an error or could not be reached; the message says which."""


def _add_params(options: ImportOptions, *, recursive: bool, only_hash: bool, pin: bool, hidden: bool) -> dict[str, str]:
    params = {
        "cid-version": str(options.cid_version),
        "chunker": f"size-{options.chunk_size}",
        "recursive": str(recursive).lower(),
        "only-hash": str(only_hash).lower(),
        "pin": str(pin).lower(),
        "hidden": str(hidden).lower(),
    }
    if options.raw_leaves is not None:
        params["raw-leaves"] = str(options.raw_leaves).lower()
    return params


def _multipart(path: Path, hidden: bool) -> aiohttp.MultipartWriter:
    """Kubo's multipart layout: one part per file or directory, named by its escaped relative path."""
    writer = aiohttp.MultipartWriter("form-data")
    root = path.parent

    def add(entry: Path) -> None:
        name = quote(str(entry.relative_to(root)), safe="")
        if entry.is_dir():
            part = writer.append(b"", {"Content-Type": "application/x-directory"})
            part.set_content_disposition("form-data", name="file", filename=name, quote_fields=False)
            for child in sorted(os.listdir(entry)):
                if hidden or not child.startswith("."):
                    add(entry / child)
        else:
            file = open(entry, "rb")  # noqa: SIM115  (the multipart payload owns it and closes it once sent)
            part = writer.append(file, {"Content-Type": "application/octet-stream"})
            part.set_content_disposition("form-data", name="file", filename=name, quote_fields=False)

    add(path)
    return writer


class KuboClient:
    """A session with one Kubo RPC API, e.g. `KuboClient("http://127.0.0.1:5001")`."""

    def __init__(self, api: str, timeout_s: float = 300) -> None:
        self.api = api.rstrip("/")
        self.timeout = aiohttp.ClientTimeout(total=None, sock_connect=30, sock_read=timeout_s)

    async def __aenter__(self) -> KuboClient:
        self.session = aiohttp.ClientSession(timeout=self.timeout)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.session.close()

    async def _post(self, command: str, params: dict | list | None = None, data=None) -> aiohttp.ClientResponse:
        url = f"{self.api}/api/v0/{command}"
        try:
            resp = await self.session.post(url, params=params, data=data)
        except aiohttp.ClientError as exc:
            raise KuboError(f"cannot reach the Kubo RPC API at {self.api} ({exc}); is `ipfs daemon` running?") from None
        if resp.status != 200:
            body = await resp.text()
            try:
                message = json.loads(body)["Message"]
            except (ValueError, KeyError, TypeError):
                message = body.strip()[:300]
            resp.release()
            raise KuboError(f"Kubo {command} failed (HTTP {resp.status}): {message}")
        return resp

    async def _ndjson(self, resp: aiohttp.ClientResponse) -> AsyncIterator[dict]:
        async with resp:
            async for line in resp.content:
                if line.strip():
                    item = json.loads(line)
                    if item.get("Type") == "error":
                        raise KuboError(f"Kubo reported: {item.get('Message')}")
                    yield item

    async def add(
        self,
        path: Path,
        options: ImportOptions = ImportOptions(),
        *,
        recursive: bool = False,
        only_hash: bool = False,
        pin: bool = True,
        hidden: bool = False,
    ) -> list[tuple[str, str]]:
        """`ipfs add`: (name, CID) of every entry, the root last, as Kubo reports them."""
        path = Path(path)
        params = _add_params(options, recursive=recursive, only_hash=only_hash, pin=pin, hidden=hidden)
        resp = await self._post("add", params, _multipart(path, hidden))
        return [(item["Name"], item["Hash"]) async for item in self._ndjson(resp) if "Hash" in item]

    async def cat(self, cid: str) -> AsyncIterator[bytes]:
        """`ipfs cat`: the file's bytes as they stream in."""
        resp = await self._post("cat", {"arg": cid})
        async with resp:
            async for chunk in resp.content.iter_chunked(1 << 20):
                yield chunk

    async def block_get(self, cid: bytes) -> bytes:
        """One block, checked against its CID (a daemon is trusted for nothing)."""
        resp = await self._post("block/get", {"arg": to_str(cid)})
        async with resp:
            data = await resp.read()
        if not verify(cid, data):
            raise KuboError(f"Kubo returned bytes for {to_str(cid)} that do not match that CID")
        return data

    async def pin_add(self, cid: str) -> list[str]:
        resp = await self._post("pin/add", {"arg": cid, "recursive": "true"})
        async with resp:
            return (await resp.json())["Pins"]

    async def pin_rm(self, cid: str) -> list[str]:
        resp = await self._post("pin/rm", {"arg": cid})
        async with resp:
            return (await resp.json())["Pins"]

    async def pin_ls(self) -> list[str]:
        resp = await self._post("pin/ls", {"type": "recursive"})
        async with resp:
            return sorted((await resp.json())["Keys"])

    async def repo_gc(self) -> int:
        """`ipfs repo gc`: how many blocks Kubo removed."""
        return len([item async for item in self._ndjson(await self._post("repo/gc")) if "Key" in item])

    async def fetch_dag(self, root: bytes, store: Blockstore) -> int:
        """Copy the DAG under `root` into a local blockstore block by block, each verified; return blocks copied."""
        copied, stack, seen = 0, [bytes(root)], set()
        while stack:
            cid = stack.pop()
            if cid in seen:
                continue
            seen.add(cid)
            if store.has(cid):
                block = store.get(cid)
            else:
                block = await self.block_get(cid)
                store.put(cid, (block,))
                copied += 1
            stack.extend(reversed(links_of(cid, block)))
        return copied
