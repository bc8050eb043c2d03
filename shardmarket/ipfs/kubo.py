"""Kubo RPC backend: add, verified block reads and pins through a user's Kubo daemon.

Speaks Kubo's documented RPC API (https://docs.ipfs.tech/reference/kubo/rpc/): every call is a POST to
/api/v0/<command>, arguments in the query string, files as multipart/form-data; streaming answers are
newline-delimited JSON; errors before the answer starts are JSON {"Message", "Code", "Type": "error"}.
An error after status 200 arrives only in the HTTP trailer `X-Stream-Error` (go-ipfs-cmds), which
aiohttp and http.client drop, so calls go over h11, which reads trailers.
"""

from __future__ import annotations

import json
import select
import socket
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from urllib.parse import quote, urlencode, urlsplit

import h11

from shardmarket.ipfs.blockstore import Blockstore, links_of
from shardmarket.ipfs.cids import to_str, verify
from shardmarket.ipfs.unixfs import ImportOptions, walk_tree

CONNECT_TIMEOUT_S = 30
READ_SIZE = 1 << 20
MAX_ERROR_BODY = 64 * 1024


class KuboError(RuntimeError):
    """Kubo answered with an error, cut its answer short, or could not be reached; the message says which."""


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


def _multipart(tree: Iterable[tuple[str, Path, bool]], boundary: str) -> Iterator[bytes]:
    """Kubo's multipart layout, one part per file or directory named by its escaped relative path; each file is open
    only while it is sent."""
    for name, path, is_dir in tree:
        kind = "application/x-directory" if is_dir else "application/octet-stream"
        yield (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{quote(name, safe="")}"\r\n'
            f"Content-Type: {kind}\r\n\r\n"
        ).encode()
        if not is_dir:
            with open(path, "rb") as f:
                while chunk := f.read(READ_SIZE):
                    yield chunk
        yield b"\r\n"
    yield f"--{boundary}--\r\n".encode()


def _error_message(body: bytes) -> str:
    try:
        return str(json.loads(body)["Message"])
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace").strip()[:300]


class KuboClient:
    """Kubo's RPC API at `api` (e.g. `KuboClient("http://127.0.0.1:5001")`), one call at a time over one kept-alive
    connection; use it in a `with` block."""

    def __init__(self, api: str, timeout_s: float = 300) -> None:
        self.api = api.rstrip("/")
        parts = urlsplit(self.api)
        if parts.scheme != "http" or not parts.hostname:
            raise KuboError(f"the Kubo RPC API {api!r} is not an http:// URL; use e.g. http://127.0.0.1:5001")
        self.host, self.port, self.prefix = parts.hostname, parts.port or 80, parts.path
        self.timeout_s = timeout_s
        self.sock: socket.socket | None = None
        self.conn = h11.Connection(h11.CLIENT)

    def __enter__(self) -> KuboClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()
            self.sock = None

    # transport

    def _connect(self) -> socket.socket:
        if self.sock is not None and self.conn.our_state is h11.IDLE and not _readable(self.sock):
            return self.sock  # kept alive, and Kubo has not closed it meanwhile
        self.close()
        try:
            self.sock = socket.create_connection((self.host, self.port), timeout=CONNECT_TIMEOUT_S)
        except OSError as exc:
            raise KuboError(f"cannot reach the Kubo RPC API at {self.api} ({exc}); is `ipfs daemon` running?") from None
        self.sock.settimeout(self.timeout_s)
        self.conn = h11.Connection(h11.CLIENT)
        return self.sock

    def _call(
        self, command: str, params: dict[str, str] | None = None, body: Iterable[bytes] | None = None, content_type: str = ""
    ) -> Iterator[bytes]:
        """POST `command` and yield the answer's bytes. KuboError for an error status, an error in the trailer, or an
        answer cut short; an answer not read to its end closes the connection."""
        sock = self._connect()
        headers = [("Host", f"{self.host}:{self.port}"), ("User-Agent", "shardmarket")]
        if body is None:
            headers.append(("Content-Length", "0"))
        else:
            headers += [("Content-Type", content_type), ("Transfer-Encoding", "chunked")]
        target = f"{self.prefix}/api/v0/{command}" + (f"?{urlencode(params)}" if params else "")
        done = False
        try:
            sent = self._send(sock, self.conn.send(h11.Request(method="POST", target=target, headers=headers)))
            for piece in body if sent and body is not None else ():
                if not self._send(sock, self.conn.send(h11.Data(data=piece))):
                    break  # Kubo stopped reading (an error); its answer says why
            else:
                if body is not None:
                    self._send(sock, self.conn.send(h11.EndOfMessage()))
            response = self._event(sock)
            if not isinstance(response, h11.Response):
                raise KuboError(f"Kubo closed the connection without answering {command}")
            if response.status_code != 200:
                raise KuboError(f"Kubo {command} failed (HTTP {response.status_code}): {_error_message(self._rest(sock))}")
            while True:
                event = self._event(sock)
                if isinstance(event, h11.Data):
                    yield bytes(event.data)
                elif isinstance(event, h11.EndOfMessage):
                    trailer = dict(event.headers).get(b"x-stream-error")
                    if trailer:
                        raise KuboError(f"Kubo {command} failed partway: {trailer.decode(errors='replace')}")
                    done = True
                    return
                else:
                    raise KuboError(f"Kubo's answer to {command} was cut short (the connection closed)")
        finally:
            if done and self.conn.our_state is h11.DONE and self.conn.their_state is h11.DONE:
                self.conn.start_next_cycle()
            else:
                self.close()  # mid-answer or broken: this connection cannot carry another call

    def _send(self, sock: socket.socket, data: bytes) -> bool:
        """Write `data`, taking in what Kubo answers meanwhile: it writes while it still reads, and a peer that only
        writes would leave both sides waiting on full buffers. False when Kubo no longer reads."""
        view = memoryview(data)
        sock.setblocking(False)
        try:
            while view:
                readable, writable, _ = select.select([sock], [sock], [], self.timeout_s)
                if not readable and not writable:
                    raise KuboError(f"Kubo at {self.api} took no data for {self.timeout_s:.0f} s")
                if readable and not self._receive(sock):
                    return False  # Kubo closed the connection; what it answered is buffered
                if writable:
                    try:
                        view = view[sock.send(view) :]
                    except BlockingIOError:
                        continue
                    except OSError:
                        return False
            return True
        finally:
            sock.settimeout(self.timeout_s)

    def _receive(self, sock: socket.socket) -> bool:
        """Hand what arrived to h11; False at the end of the stream."""
        try:
            data = sock.recv(READ_SIZE)
        except BlockingIOError:
            return True
        except TimeoutError:
            raise KuboError(f"Kubo at {self.api} sent nothing for {self.timeout_s:.0f} s") from None
        except OSError as exc:
            raise KuboError(f"the connection to Kubo at {self.api} broke: {exc}") from None
        self.conn.receive_data(data)
        return bool(data)

    def _event(self, sock: socket.socket) -> h11.Event:
        """The next HTTP event of Kubo's answer (informational responses skipped)."""
        try:
            while True:
                event = self.conn.next_event()
                if event is h11.NEED_DATA:
                    self._receive(sock)
                elif isinstance(event, h11.Event) and not isinstance(event, h11.InformationalResponse):
                    return event
                elif event is h11.PAUSED:
                    raise KuboError("Kubo answered more than was asked for")
        except h11.RemoteProtocolError as exc:
            raise KuboError(f"Kubo's answer was cut short or malformed ({exc})") from None

    def _rest(self, sock: socket.socket) -> bytes:
        """The rest of an answer's body (an error's text), at most MAX_ERROR_BODY bytes of it."""
        body = b""
        while len(body) < MAX_ERROR_BODY and isinstance(event := self._event(sock), h11.Data):
            body += event.data
        return body

    def _objects(self, command: str, chunks: Iterable[bytes]) -> Iterator[dict]:
        """The JSON objects of a newline-delimited answer; an error object is a KuboError."""
        pending = b""
        for chunk in chunks:
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                if line.strip():
                    yield _object(command, line)
        if pending.strip():
            yield _object(command, pending)

    # commands

    def add(
        self,
        path: Path,
        options: ImportOptions = ImportOptions(),
        *,
        recursive: bool = False,
        only_hash: bool = False,
        pin: bool = True,
        hidden: bool = False,
    ) -> list[tuple[str, str]]:
        """`ipfs add`: (name, CID) of every entry, the root last, as Kubo reports them. What the local importer refuses
        (symlinks, special files) is refused here too, before anything is sent."""
        tree = list(walk_tree(Path(path), recursive=recursive, hidden=hidden))
        boundary = uuid.uuid4().hex
        params = _add_params(options, recursive=recursive, only_hash=only_hash, pin=pin, hidden=hidden)
        answer = self._call("add", params, _multipart(tree, boundary), f"multipart/form-data; boundary={boundary}")
        added = [(item["Name"], item["Hash"]) for item in self._objects("add", answer) if "Hash" in item]
        root = tree[0][0]
        if not added or added[-1][0] != root:
            raise KuboError(f"Kubo's answer to add ended before it named the root {root}; it may have stopped partway")
        return added

    def block_get(self, cid: bytes) -> bytes:
        """One block, checked against its CID (a daemon is trusted for nothing)."""
        data = b"".join(self._call("block/get", {"arg": to_str(cid)}))
        if not verify(cid, data):
            raise KuboError(f"Kubo returned bytes for {to_str(cid)} that do not match that CID")
        return data

    def _json(self, command: str, params: dict[str, str] | None = None) -> dict:
        body = b"".join(self._call(command, params))
        try:
            return json.loads(body)
        except ValueError:
            raise KuboError(f"Kubo's answer to {command} is not JSON") from None

    def pin_add(self, cid: str) -> list[str]:
        return self._json("pin/add", {"arg": cid, "recursive": "true"})["Pins"]

    def pin_rm(self, cid: str) -> list[str]:
        return self._json("pin/rm", {"arg": cid})["Pins"]

    def pin_ls(self) -> list[str]:
        return sorted(self._json("pin/ls", {"type": "recursive"})["Keys"])

    def repo_gc(self) -> int:
        """`ipfs repo gc`: how many blocks Kubo removed."""
        return sum("Key" in item for item in self._objects("repo/gc", self._call("repo/gc")))

    def fetch_dag(self, root: bytes, store: Blockstore) -> int:
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
                block = self.block_get(cid)
                store.put(cid, (block,))
                copied += 1
            stack.extend(reversed(links_of(cid, block)))
        return copied


def _object(command: str, line: bytes) -> dict:
    try:
        item = json.loads(line)
    except ValueError:
        raise KuboError(f"Kubo's answer to {command} holds a line that is not JSON: {line[:100]!r}") from None
    if not isinstance(item, dict):
        raise KuboError(f"Kubo's answer to {command} holds {line[:100]!r}, not a JSON object")
    if item.get("Type") == "error" or item.get("Err") or item.get("Error"):
        raise KuboError(f"Kubo {command} failed: {item.get('Message') or item.get('Err') or item.get('Error')}")
    return item


def _readable(sock: socket.socket) -> bool:
    """Whether an idle kept-alive socket has something to read: only an end of file, i.e. Kubo closed it."""
    return bool(select.select([sock], [], [], 0)[0])
