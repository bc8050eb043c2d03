"""Start and stop real node processes on 127.0.0.1 for the network tests."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from shardmarket.cli.devmarket import node_command

ROOT = Path(__file__).resolve().parents[3]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def get_json(url: str, timeout: float = 5.0) -> dict:
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


@dataclass
class NodeProcess:
    """A `shardmarket node run` process and where it listens."""

    process: subprocess.Popen
    port: int  # HTTP and raw TCP sessions
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def info(self) -> dict:
        return get_json(f"{self.url}/info")

    def stop(self) -> None:
        stop_all([self])


def stop_all(nodes: list[NodeProcess]) -> None:
    """SIGTERM every node at once, then wait (kill after 15 s)."""
    running = [n.process for n in nodes if n.process.poll() is None]
    for process in running:
        process.send_signal(signal.SIGTERM)
    for process in running:
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def child_env(home: Path) -> dict:
    env = dict(os.environ, SHARDMARKET_HOME=str(home), OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
    env.pop("SHARDMARKET_CONFIG", None)
    return env


def start_node(
    checkpoint: Path, layers: str, home: Path, *extra: str, port: int | None = None, settings: dict | None = None
) -> NodeProcess:
    """Spawn a node (on `port` if given: a restart) with [node] `settings` (name -> value) besides the defaults; call
    `wait_ready` before using it."""
    port = port or free_port()
    home.mkdir(parents=True, exist_ok=True)
    log = home / "node.log"
    cmd = node_command(*extra, checkpoint=checkpoint, layers=layers, port=port, threads=1)
    env = child_env(home) | {f"SHARDMARKET_NODE_{name.upper()}": str(value) for name, value in (settings or {}).items()}
    process = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    return NodeProcess(process, port, log)


def wait_http(url: str, process: subprocess.Popen, log: Path, timeout: float = 180.0, headers: dict | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"process exited with {process.returncode}:\n{log.read_text()[-3000:]}")
        try:
            request = urllib.request.Request(url, headers=headers or {})
            with urllib.request.urlopen(request, timeout=2):
                return
        except OSError:
            time.sleep(0.2)
    raise RuntimeError(f"{url} not ready after {timeout} s:\n{log.read_text()[-3000:]}")


def wait_ready(*nodes: NodeProcess) -> None:
    for node in nodes:
        wait_http(f"{node.url}/health", node.process, node.log)


@contextlib.contextmanager
def running(*nodes: NodeProcess) -> Iterator[None]:
    """Wait until every one of `nodes` is ready; stop them all on leaving, also when one never got ready."""
    try:
        wait_ready(*nodes)
        yield
    finally:
        stop_all(list(nodes))
