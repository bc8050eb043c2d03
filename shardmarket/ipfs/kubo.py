"""Kubo RPC backend: a Kubo daemon as a ContentStore (block get/put, refs, pins, gc) through its RPC API.

Speaks Kubo's documented RPC API (https://docs.ipfs.tech/reference/kubo/rpc/): every call is a POST to
/api/v0/<command>, arguments in the query string, files as multipart/form-data; streaming answers are
newline-delimited JSON; errors before the answer starts are JSON {"Message", "Code", "Type": "error"}.
An error after status 200 arrives only in the HTTP trailer `X-Stream-Error` (go-ipfs-cmds), which
aiohttp and http.client drop, so calls go over h11, which reads trailers. Blocks are hashed here (the
importer is Kubo's, CID for CID) and every block Kubo returns is checked against its CID.
"""

from __future__ import annotations

import json
import select
import socket
import uuid
from collections.abc import Iterable, Iterator, Sequence
from urllib.parse import urlencode, urlsplit

import h11
from multiformats import CID

from shardmarket.ipfs.cids import KNOWN_CODECS, parse, split, to_str, verify

CONNECT_TIMEOUT_S = 30
READ_SIZE = 1 << 20
MAX_ERROR_BODY = 64 * 1024


class KuboError(RuntimeError):
    """Kubo answered with an error, cut its answer short, or could not be reached; the message says which."""


def _error_message(body: bytes) -> str:
    try:
        return str(json.loads(body)["Message"])
    except (ValueError, KeyError, TypeError):
        return body.decode(errors="replace").strip()[:300]


class KuboStore:
    """The Kubo daemon whose RPC API is at `api` (e.g. `KuboStore("http://127.0.0.1:5001")`), one call at a time over
    one kept-alive connection."""

    def __init__(self, api: str, timeout_s: float = 300) -> None:
        self.api = api.rstrip("/")
        parts = urlsplit(self.api)
        if parts.scheme != "http" or not parts.hostname:
            raise KuboError(f"the Kubo RPC API {api!r} is not an http:// URL; use e.g. http://127.0.0.1:5001")
        self.host, self.port, self.prefix = parts.hostname, parts.port or 80, parts.path
        self.timeout_s = timeout_s
        self.sock: socket.socket | None = None
        self.conn = h11.Connection(h11.CLIENT)

    def __enter__(self) -> KuboStore:
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
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # one call is a few small writes
        self.sock.settimeout(self.timeout_s)
        self.conn = h11.Connection(h11.CLIENT)
        return self.sock

    def _call(
        self, command: str, params: dict[str, str] | None = None, body: bytes = b"", content_type: str = ""
    ) -> Iterator[bytes]:
        """POST `command` and yield the answer's bytes. KuboError for an error status, an error in the trailer, or an
        answer cut short; an answer not read to its end closes the connection."""
        sock = self._connect()
        headers = [("Host", f"{self.host}:{self.port}"), ("User-Agent", "shardmarket"), ("Content-Length", str(len(body)))]
        if content_type:
            headers.append(("Content-Type", content_type))
        target = f"{self.prefix}/api/v0/{command}" + (f"?{urlencode(params)}" if params else "")
        done = False
        try:
            request = self.conn.send(h11.Request(method="POST", target=target, headers=headers))
            self._send(sock, request + self.conn.send(h11.Data(data=body)) + self.conn.send(h11.EndOfMessage()))
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

    def _send(self, sock: socket.socket, data: bytes) -> None:
        """Write `data`, taking in what Kubo answers meanwhile: it may answer (an error) and stop reading before the
        request is whole, and its answer is then what was received."""
        view = memoryview(data)
        sock.setblocking(False)
        try:
            while view:
                readable, writable, _ = select.select([sock], [sock], [], self.timeout_s)
                if not readable and not writable:
                    raise KuboError(f"Kubo at {self.api} took no data for {self.timeout_s:.0f} s")
                if readable and not self._receive(sock):
                    return  # Kubo closed the connection
                if writable:
                    try:
                        view = view[sock.send(view) :]
                    except BlockingIOError:
                        continue
                    except OSError:
                        return
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

    def _json(self, command: str, params: dict[str, str] | None = None) -> dict:
        body = b"".join(self._call(command, params))
        try:
            return json.loads(body)
        except ValueError:
            raise KuboError(f"Kubo's answer to {command} is not JSON") from None

    # the ContentStore

    def get(self, cid: bytes) -> bytes:
        """One block, checked against its CID (a daemon is trusted for nothing)."""
        data = b"".join(self._call("block/get", {"arg": to_str(cid)}))
        if not verify(cid, data):
            raise KuboError(f"Kubo returned bytes for {to_str(cid)} that do not match that CID")
        return data

    def put(self, cid: bytes, parts: Sequence[bytes | memoryview]) -> None:
        """`ipfs block put` of a block this side hashed; Kubo must store it under the same multihash."""
        boundary = uuid.uuid4().hex
        head = f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="block"\r\n'
        head += "Content-Type: application/octet-stream\r\n\r\n"
        body = b"".join([head.encode(), *parts, f"\r\n--{boundary}--\r\n".encode()])
        params = {"cid-codec": KNOWN_CODECS[split(cid)[0]], "mhtype": CID.decode(cid).hashfun.name, "pin": "false"}
        answer = list(
            self._objects("block/put", self._call("block/put", params, body, f"multipart/form-data; boundary={boundary}"))
        )
        if not answer or "Key" not in answer[-1]:
            raise KuboError(f"Kubo's answer to block/put ended before it named the block {to_str(cid)}")
        if split(bytes(parse(answer[-1]["Key"])))[1] != split(cid)[1]:
            raise KuboError(f"Kubo stored block {to_str(cid)} as {answer[-1]['Key']}, which is another hash")

    def fetch(self, root: bytes) -> None:
        """`ipfs refs -r`: Kubo fetches every block under `root` from its network now."""
        for _ in self._objects("refs", self._call("refs", {"arg": to_str(root), "recursive": "true", "unique": "true"})):
            pass

    def pin(self, cid: bytes) -> None:
        """`ipfs pin add --progress`: Kubo fetches what it lacks, and says how far it got while it does."""
        params = {"arg": to_str(cid), "recursive": "true", "progress": "true"}
        answer = list(self._objects("pin/add", self._call("pin/add", params)))
        if not answer or "Pins" not in answer[-1]:
            raise KuboError(f"Kubo's answer to pin/add ended before it pinned {to_str(cid)}")

    def unpin(self, cid: bytes) -> None:
        self._json("pin/rm", {"arg": to_str(cid)})

    def pins(self) -> list[str]:
        return sorted(self._json("pin/ls", {"type": "recursive"})["Keys"])

    def gc(self) -> int:
        """`ipfs repo gc`: how many blocks Kubo removed."""
        return sum("Key" in item for item in self._objects("repo/gc", self._call("repo/gc")))


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
