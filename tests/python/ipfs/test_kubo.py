"""Kubo RPC backend against a stand-in server speaking Kubo's RPC as go-ipfs-cmds serves it.

No Kubo binary can be installed on this machine, so the server below implements the request and response
formats of https://docs.ipfs.tech/reference/kubo/rpc/ and go-ipfs-cmds' http/responseemitter.go over a real
socket (h11): POST only, query arguments, multipart files with escaped relative paths; answers of status 200
are chunked, declare `Trailer: X-Stream-Error` and carry an error that happens after the first output in
that trailer only; an error before any output is a JSON {"Message", "Code", "Type"} with status 500.
"""

from __future__ import annotations

import email.parser
import email.policy
import json
import os
import random
import resource
import socketserver
import subprocess
import sys
import threading
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qsl, unquote, urlsplit

import h11
import pytest

from shardmarket.cli import main
from shardmarket.ipfs.blockstore import Blockstore
from shardmarket.ipfs.cids import parse
from shardmarket.ipfs.kubo import KuboClient, KuboError
from shardmarket.ipfs.unixfs import FileBuilder, ImportOptions, directory_node, import_path

ROOT = Path(__file__).resolve().parents[3]
ADD_OPTIONS = {"cid-version", "chunker", "recursive", "only-hash", "pin", "hidden", "raw-leaves"}


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
        kubo = self

        class Handler(socketserver.BaseRequestHandler):
            def handle(self) -> None:
                kubo.serve_connection(self.request)

        self.server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(10)

    def serve_connection(self, sock) -> None:
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
        query = dict(parse_qsl(target.query))
        content_type = dict(request.headers).get(b"content-type", b"").decode()
        handler = {
            "add": self.add,
            "block/get": self.block_get,
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

    def add(self, q: dict, body: bytes, content_type: str) -> list[dict]:
        if set(q) - ADD_OPTIONS:
            raise LookupError(f"unknown option {set(q) - ADD_OPTIONS}")
        raw = None if "raw-leaves" not in q else q["raw-leaves"] == "true"
        options = ImportOptions.from_chunker(
            q.get("chunker", "size-262144"), cid_version=int(q.get("cid-version", 0)), raw_leaves=raw
        )
        sink = None if q.get("only-hash") == "true" else self.store
        message = email.parser.BytesParser(policy=email.policy.HTTP).parsebytes(
            f"Content-Type: {content_type}\r\n\r\n".encode() + body
        )
        entries, dirs, lines = {}, [], []
        for part in message.iter_parts():
            name = unquote(part.get_param("filename", header="content-disposition"))
            if part.get_content_type() == "application/x-directory":
                dirs.append(name)
                continue
            builder = FileBuilder(options, sink)
            data = part.get_payload(decode=True)
            for start in range(0, len(data), options.chunk_size):
                builder.add_chunk(data[start : start + options.chunk_size])
            entries[name] = builder.finish()
            lines.append({"Name": name, "Hash": entries[name].cid_str, "Size": str(entries[name].tsize)})
        for d in sorted(dirs, key=lambda p: -p.count("/")):
            children = {n[len(d) + 1 :]: e for n, e in entries.items() if n.startswith(d + "/") and "/" not in n[len(d) + 1 :]}
            entries[d] = directory_node(options, children, sink)
            lines.append({"Name": d, "Hash": entries[d].cid_str, "Size": str(entries[d].tsize)})
        if q.get("pin", "true") == "true":
            self.pins.add(lines[-1]["Hash"])
        return lines

    def block_get(self, q: dict, body: bytes, content_type: str) -> bytes:
        cid = bytes(parse(q["arg"]))
        if not self.store.has(cid):
            raise LookupError(f"block was not found locally (offline): ipld: could not find {q['arg']}")
        block = self.store.get(cid)
        return block[:-1] + bytes([block[-1] ^ 1]) if self.lie else block

    def pin_add(self, q: dict, body: bytes, content_type: str) -> list[dict]:
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
    stand_in = StandInKubo(Blockstore(tmp_path / "kubo"))
    yield stand_in
    stand_in.stop()


def _tree(tmp_path: Path) -> Path:
    (tmp_path / "d" / "s").mkdir(parents=True)
    (tmp_path / "d" / "s" / "f.bin").write_bytes(random.Random(3).randbytes(20_000))
    (tmp_path / "d" / "g.txt").write_text("hello world\n")
    return tmp_path / "d"


def test_cli_add_cat_get_pin_through_kubo(kubo, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("SHARDMARKET_IPFS_API", kubo.url)
    d = _tree(tmp_path)
    assert main(["ipfs", "add", "-r", "--chunker", "size-4096", "--cid-version", "1", str(d)]) == 0
    lines = capsys.readouterr().out.splitlines()
    ours = import_path(d, ImportOptions(cid_version=1, chunk_size=4096), recursive=True)
    assert lines[-1] == f"added {ours.cid_str} d" and len(lines) == 4
    assert main(["ipfs", "get", ours.cid_str, "-o", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "s" / "f.bin").read_bytes() == (d / "s" / "f.bin").read_bytes()
    file_cid = next(line.split()[1] for line in lines if line.endswith("g.txt"))
    assert main(["ipfs", "cat", file_cid]) == 0
    assert capsys.readouterr().out.endswith("hello world\n")
    assert main(["ipfs", "pin", "ls"]) == 0
    assert f"{ours.cid_str} recursive" in capsys.readouterr().out
    assert main(["ipfs", "pin", "rm", "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o"]) == 1
    assert "not pinned" in capsys.readouterr().err


def test_an_error_after_status_200_is_an_error_not_a_root(kubo, tmp_path, monkeypatch, capsys):
    """Kubo fails partway through `add -r`: it has printed the files' CIDs, and reports the failure in the trailer."""
    monkeypatch.setenv("SHARDMARKET_IPFS_API", kubo.url)
    d = _tree(tmp_path)
    kubo.faults["add"] = Fault(after=2, stream_error="write /kubo/blocks/XY/XYZ.data: no space left on device")
    assert main(["ipfs", "add", "-r", "-Q", str(d)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "no space left on device" in err
    kubo.faults["add"] = Fault(after=2, cut=True)  # the daemon died mid-answer
    assert main(["ipfs", "add", "-r", "-Q", str(d)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "cut short" in err
    kubo.faults["add"] = Fault(after=3)  # a clean end, but without the root's line
    assert main(["ipfs", "add", "-r", "-Q", str(d)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "before it named the root d" in err
    del kubo.faults["add"]
    assert main(["ipfs", "add", "-r", "-Q", str(d)]) == 0
    assert capsys.readouterr().out == import_path(d, recursive=True).cid_str + "\n"


def test_errors_in_the_trailer_of_other_commands(kubo, tmp_path):
    kubo.faults["repo/gc"] = Fault(after=0, stream_error="could not remove block: permission denied")
    with KuboClient(kubo.url) as client, pytest.raises(KuboError, match="permission denied"):
        client.repo_gc()
    entry = import_path(_file(tmp_path), ImportOptions(), kubo.store)
    kubo.faults["block/get"] = Fault(after=0, cut=True)
    with KuboClient(kubo.url) as client:
        with pytest.raises(KuboError, match="cut short"):
            client.block_get(entry.cid)
        del kubo.faults["block/get"]
        assert client.block_get(entry.cid) == kubo.store.get(entry.cid)  # a new connection after the broken one


def test_adding_many_files_keeps_few_open(kubo, tmp_path):
    """1,500 files under a limit of 1,024 open files (a common default)."""
    d = tmp_path / "many"
    d.mkdir()
    for i in range(1500):
        (d / f"{i:04d}.txt").write_text(f"file {i}\n")
    env = {**os.environ, "SHARDMARKET_IPFS_API": kubo.url, "PYTHONPATH": str(ROOT)}

    def limit_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (1024, 1024))

    done = subprocess.run(
        [sys.executable, "-m", "shardmarket", "ipfs", "add", "-r", "-Q", str(d)],
        env=env,
        preexec_fn=limit_files,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == import_path(d, recursive=True).cid_str + "\n"


def test_symlinks_are_refused_by_both_backends(kubo, tmp_path, monkeypatch, capsys):
    d = _tree(tmp_path)
    (tmp_path / "secret").write_text("outside the tree\n")
    (d / "link").symlink_to(tmp_path / "secret")
    assert main(["ipfs", "add", "-r", str(d)]) == 1
    local = capsys.readouterr().err
    monkeypatch.setenv("SHARDMARKET_IPFS_API", kubo.url)
    assert main(["ipfs", "add", "-r", str(d)]) == 1
    assert capsys.readouterr().err == local and "is a symbolic link" in local
    assert not kubo.pins and not list(kubo.store.keys())  # nothing was sent


def test_lying_kubo_block_is_refused(kubo, tmp_path):
    entry = import_path(_file(tmp_path), ImportOptions(), kubo.store)
    kubo.lie = True
    with KuboClient(kubo.url) as client, pytest.raises(KuboError, match="do not match"):
        client.block_get(entry.cid)


def test_unreachable_kubo_says_what_to_do(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("SHARDMARKET_IPFS_API", "http://127.0.0.1:9")
    assert main(["ipfs", "add", str(_file(tmp_path))]) == 1
    assert "is `ipfs daemon` running?" in capsys.readouterr().err


def _file(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("some bytes\n")
    return path
