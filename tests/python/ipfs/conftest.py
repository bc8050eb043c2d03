from __future__ import annotations

import email.parser
import email.policy
import json
import shutil
import socket
import socketserver
import subprocess
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, urlsplit

import h11
import pytest

from shardmarket.ipfs.blockstore import Blockstore, walk
from shardmarket.ipfs.cids import block_cid, parse, to_str

ROOT = Path(__file__).resolve().parents[3]
HERE = Path(__file__).parent


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """Every test gets its own SHARDMARKET_HOME and no Kubo API."""
    monkeypatch.setenv("SHARDMARKET_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SHARDMARKET_IPFS_API", raising=False)
    monkeypatch.delenv("SHARDMARKET_IPFS_GATEWAYS", raising=False)
    return tmp_path / "home"


@pytest.fixture
def js_import():
    """Root CIDs from npm's ipfs-unixfs-importer for each job {path, cidVersion, rawLeaves, chunkSize}."""
    return _js_import


def _js_import(jobs: list[dict]) -> list[str]:
    if not (ROOT / "node_modules" / "ipfs-unixfs-importer").exists() or not shutil.which("node"):
        pytest.fail("npm's ipfs-unixfs-importer is missing: run `make setup`")
    out = subprocess.run(
        ["node", str(HERE / "js_import.mjs")],
        input=json.dumps(jobs),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=True,
    ).stdout
    return out.split()


# A stand-in for Kubo's RPC API. No Kubo binary can be installed on this machine, so the server below implements the
# request and response formats of https://docs.ipfs.tech/reference/kubo/rpc/ and go-ipfs-cmds' http/responseemitter.go
# over a real socket (h11): POST only, query arguments, multipart files; answers of status 200 are chunked, declare
# `Trailer: X-Stream-Error` and carry an error that happens after the first output in that trailer only; an error
# before any output is a JSON {"Message", "Code", "Type"} with status 500.

CODECS = {"raw": 0x55, "dag-pb": 0x70}


@dataclass
class Answer:
    """What the stand-in sends: a status, output chunks, and how the answer ends."""

    status: int = 200
    chunks: list[bytes] = field(default_factory=list)
    stream_error: str = ""  # sent in the X-Stream-Error trailer
    cut: bool = False  # the connection closes before the last chunk


@dataclass
class Fault:
    """Make `command` go wrong after `after` output objects: an error in the trailer, or a cut connection."""

    after: int
    stream_error: str = ""
    cut: bool = False


class StandInKubo:
    """Kubo's RPC API over a real socket, one thread per connection as Kubo's HTTP server has."""

    def __init__(self, store: Blockstore) -> None:
        self.store = store
        self.pins: set[str] = set()
        self.faults: dict[str, Fault] = {}
        self.lie = False  # send every block with its last byte flipped
        self.calls: list[str] = []
        kubo = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                kubo.serve_connection(self.request)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def fail(self, command: str, after: int = 0, stream_error: str = "", cut: bool = False) -> None:
        """Make `command` go wrong after `after` output objects (see Fault) until `heal`."""
        self.faults[command] = Fault(after, stream_error, cut)

    def heal(self, command: str) -> None:
        self.faults.pop(command, None)

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)

    def serve_connection(self, sock) -> None:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)  # as Go's net/http does
        conn = h11.Connection(h11.SERVER)
        while True:
            request, body = None, b""
            while True:
                event = conn.next_event()
                if event is h11.NEED_DATA:
                    conn.receive_data(sock.recv(1 << 16))
                elif isinstance(event, h11.Request):
                    request = event
                elif isinstance(event, h11.Data):
                    body += event.data
                elif isinstance(event, h11.EndOfMessage):
                    break
                else:
                    return  # the client closed the connection
            answer = self.answer(request, body)
            if answer.status != 200:
                payload = b"".join(answer.chunks)
                headers = [("Content-Type", "application/json"), ("Content-Length", str(len(payload)))]
                sock.sendall(conn.send(h11.Response(status_code=answer.status, headers=headers)))
                sock.sendall(conn.send(h11.Data(data=payload)) + conn.send(h11.EndOfMessage()))
            else:
                headers = [
                    ("Content-Type", "application/json"),
                    ("Trailer", "X-Stream-Error"),
                    ("X-Chunked-Output", "1"),
                    ("Transfer-Encoding", "chunked"),
                ]
                sock.sendall(conn.send(h11.Response(status_code=200, headers=headers)))
                for chunk in answer.chunks:
                    sock.sendall(conn.send(h11.Data(data=chunk)))
                if answer.cut:
                    sock.close()
                    return
                trailers = [("X-Stream-Error", answer.stream_error)] if answer.stream_error else []
                sock.sendall(conn.send(h11.EndOfMessage(headers=trailers)))
            if conn.our_state is not h11.DONE or conn.their_state is not h11.DONE:
                return
            conn.start_next_cycle()

    def answer(self, request: h11.Request, body: bytes) -> Answer:
        """The answer to one call; a fault counts output objects (or, for a block, the one chunk of bytes)."""
        if request.method != b"POST":
            return Answer(405, [b"405 - Method Not Allowed"])
        target = urlsplit(request.target.decode())
        command = target.path.removeprefix("/api/v0/")
        self.calls.append(command)
        query = dict(parse_qsl(target.query))
        content_type = dict(request.headers).get(b"content-type", b"").decode()
        handler = {
            "block/put": self.block_put,
            "block/get": self.block_get,
            "refs": self.refs,
            "pin/add": self.pin_add,
            "pin/rm": self.pin_rm,
            "pin/ls": self.pin_ls,
            "repo/gc": self.gc,
        }.get(command)
        if handler is None:
            return _error(f"unknown command {command!r}", 404)
        try:
            objects = handler(query, body, content_type)
        except LookupError as exc:
            return _error(str(exc.args[0]))
        chunks = [objects] if isinstance(objects, bytes) else [json.dumps(o).encode() + b"\n" for o in objects]
        fault = self.faults.get(command)
        if fault is None:
            return Answer(chunks=chunks)
        return Answer(chunks=chunks[: fault.after], stream_error=fault.stream_error, cut=fault.cut)

    def block_put(self, q: dict, body: bytes, content_type: str) -> list[dict]:
        """Stores each file of the multipart body as a block and names it as Kubo does: a CIDv1 of `cid-codec`."""
        if q.get("mhtype") != "sha2-256" or q.get("cid-codec") not in CODECS:
            raise LookupError(f"unrecognized multihash function or codec: {q}")
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + body
        )
        stored = []
        for part in message.iter_parts():
            data = part.get_payload(decode=True)
            cid = block_cid(1, CODECS[q["cid-codec"]], data)
            self.store.put(cid, (data,))
            stored.append({"Key": to_str(cid), "Size": len(data)})
        return stored

    def refs(self, q: dict, body: bytes, content_type: str) -> list[dict]:
        try:
            return [{"Ref": to_str(cid), "Err": ""} for cid, _ in walk(self.store, bytes(parse(q["arg"])))][1:]
        except KeyError:
            raise LookupError(f"block was not found locally (offline): ipld: could not find {q['arg']}") from None

    def block_get(self, q: dict, body: bytes, content_type: str) -> bytes:
        cid = bytes(parse(q["arg"]))
        if not self.store.has(cid):
            raise LookupError(f"block was not found locally (offline): ipld: could not find {q['arg']}")
        block = self.store.get(cid)
        return block[:-1] + bytes([block[-1] ^ 1]) if self.lie else block

    def pin_add(self, q: dict, body: bytes, content_type: str) -> list[dict]:
        self.refs(q, body, content_type)  # Kubo pins only what it has or can fetch
        self.pins.add(q["arg"])
        return [{"Pins": [q["arg"]]}]

    def pin_rm(self, q: dict, body: bytes, content_type: str) -> list[dict]:
        if q["arg"] not in self.pins:
            raise LookupError("not pinned or pinned indirectly")
        self.pins.discard(q["arg"])
        return [{"Pins": [q["arg"]]}]

    def pin_ls(self, q: dict, body: bytes, content_type: str) -> list[dict]:
        return [{"Keys": {p: {"Type": "recursive"} for p in self.pins}}]

    def gc(self, q: dict, body: bytes, content_type: str) -> list[dict]:
        return []


def _error(message: str, status: int = 500) -> Answer:
    return Answer(status, [json.dumps({"Message": message, "Code": 0, "Type": "error"}).encode()])


@pytest.fixture
def kubo(tmp_path):
    """A stand-in Kubo daemon with its own block store, on a real socket."""
    stand_in = StandInKubo(Blockstore(tmp_path / "kubo"))
    yield stand_in
    stand_in.stop()
