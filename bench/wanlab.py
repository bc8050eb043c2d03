"""A WAN lab: the client and each node in a network namespace of their own, joined by one user-space switch that holds
every Ethernet frame for its link's one-way delay (and, optionally, its link's rate). The kernel here has no sch_netem,
so the delay is made by a process: one TAP device per namespace, all read by the switch, which learns MAC addresses
like any switch and writes each frame to its destination's TAP once the frame's time has come. Real TCP runs end to
end (handshakes, slow start, acknowledgements all pay the delay); the switch runs under SCHED_FIFO so that compute on
every core cannot starve it. Needs root. Namespaces are named `wan<pid>x<n>-<host>` and deleted at teardown.

`python bench/wanlab.py --switch SPEC` is the switch process itself (the lab starts it)."""

from __future__ import annotations

import contextlib
import ctypes
import fcntl
import heapq
import itertools
import json
import os
import selectors
import shutil
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SUBNET = "10.98.0"  # host i of the lab is SUBNET.(i + 1)
TUNSETIFF, IFF_TAP, IFF_NO_PI = 0x400454CA, 0x0002, 0x1000
CLONE_NEWNET = 0x40000000
FIFO_PRIORITY = 50
_counter = itertools.count()


def missing() -> str | None:
    """Why the lab cannot run here, or None when it can."""
    if os.geteuid() != 0:
        return "the WAN lab needs root (network namespaces, TAP devices)"
    if not shutil.which("ip"):
        return "the WAN lab needs iproute2's `ip`"
    if not os.path.exists("/dev/net/tun"):
        return "the WAN lab needs /dev/net/tun (TAP devices)"
    if subprocess.run(["unshare", "--net", "true"], check=False, capture_output=True).returncode != 0:
        return "this machine does not allow network namespaces (a container without CAP_SYS_ADMIN?)"
    return None


def _setns(path: str) -> None:
    """Move the calling thread into the network namespace at `path`."""
    libc = ctypes.CDLL(None, use_errno=True)
    fd = os.open(path, os.O_RDONLY)
    try:
        if libc.setns(fd, CLONE_NEWNET) != 0:
            raise OSError(ctypes.get_errno(), f"setns({path}) failed")
    finally:
        os.close(fd)


def _sh(*argv: str) -> None:
    result = subprocess.run(argv, check=False, capture_output=True, text=True, timeout=30)
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")


class WanLab:
    """Hosts (namespaces) on one switched LAN, each pair's link with its own one-way delay; a context manager that always
    tears down. `delay_ms[(a, b)]` is the one-way delay between hosts a and b (both ways), `rate_mbit` each link's rate
    (None: unlimited)."""

    def __init__(self, hosts: list[str], delay_ms: dict[tuple[str, str], float], rate_mbit: float | None = None) -> None:
        self.hosts, self.rate_mbit = hosts, rate_mbit
        self.delay_ms = {**delay_ms, **{(b, a): d for (a, b), d in delay_ms.items()}}
        self.tag = f"wan{os.getpid() % 100000}x{next(_counter)}"
        self.dir = Path(tempfile.mkdtemp(prefix=f"{self.tag}-"))
        self.created: list[str] = []
        self.switch: subprocess.Popen | None = None
        self.procs: list[subprocess.Popen] = []

    def ns(self, host: str) -> str:
        return f"{self.tag}-{host}"

    def ip(self, host: str) -> str:
        return f"{SUBNET}.{self.hosts.index(host) + 1}"

    def argv_in(self, host: str, argv: list[str]) -> list[str]:
        return ["ip", "netns", "exec", self.ns(host), *argv]

    def spawn_in(self, host: str, argv: list[str], log: str, env: dict | None = None) -> subprocess.Popen:
        """Start a long-running process inside `host`; killed at teardown, its output in <lab dir>/<log>."""
        with open(self.dir / log, "w") as out:
            proc = subprocess.Popen(
                self.argv_in(host, argv), cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
            )
        self.procs.append(proc)
        return proc

    @contextlib.contextmanager
    def inside(self, host: str) -> Iterator[None]:
        """Run this thread's new sockets inside `host`'s namespace for the block (threads started before keep theirs)."""
        home = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
        try:
            _setns(f"/var/run/netns/{self.ns(host)}")
            yield
        finally:
            libc = ctypes.CDLL(None, use_errno=True)
            libc.setns(home, CLONE_NEWNET)
            os.close(home)

    def __enter__(self) -> WanLab:
        try:
            self.build()
        except BaseException:
            self.teardown()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.teardown()

    def build(self) -> None:
        for host in self.hosts:
            _sh("ip", "netns", "add", self.ns(host))
            self.created.append(self.ns(host))
            _sh("ip", "netns", "exec", self.ns(host), "ip", "link", "set", "lo", "up")
        spec = {
            "namespaces": [self.ns(h) for h in self.hosts],
            "delay_ms": [[self.delay_ms.get((a, b), 0.0) for b in self.hosts] for a in self.hosts],
            "rate_mbit": self.rate_mbit,
        }
        self.switch = subprocess.Popen(
            [sys.executable, __file__, "--switch", json.dumps(spec)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=open(self.dir / "switch.log", "w"),  # noqa: SIM115 (the child owns it)
            start_new_session=True,
        )
        assert self.switch.stdout is not None
        if self.switch.stdout.readline().strip() != b"ready":
            raise RuntimeError(f"the WAN switch did not start: {(self.dir / 'switch.log').read_text()}")
        for host in self.hosts:
            ns = self.ns(host)
            _sh("ip", "netns", "exec", ns, "ip", "addr", "add", f"{self.ip(host)}/24", "dev", "wan0")
            _sh("ip", "netns", "exec", ns, "ip", "link", "set", "wan0", "up")

    def set_delays(self, delay_ms: dict[tuple[str, str], float]) -> None:
        """Give the links new one-way delays (both ways; links not named get none), from the next frame on."""
        assert self.switch is not None and self.switch.stdin is not None and self.switch.stdout is not None
        self.delay_ms = {**delay_ms, **{(b, a): d for (a, b), d in delay_ms.items()}}
        matrix = [[self.delay_ms.get((a, b), 0.0) for b in self.hosts] for a in self.hosts]
        self.switch.stdin.write(json.dumps(matrix).encode() + b"\n")
        self.switch.stdin.flush()
        if self.switch.stdout.readline().strip() != b"ok":
            raise RuntimeError(f"the WAN switch did not take the new delays: {(self.dir / 'switch.log').read_text()}")

    def teardown(self) -> None:
        for proc in [*self.procs, *([self.switch] if self.switch else [])]:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()
        for ns in self.created:
            subprocess.run(["ip", "netns", "del", ns], check=False, capture_output=True)
        self.created = []
        shutil.rmtree(self.dir, ignore_errors=True)


def run_switch(spec: dict) -> None:
    """The switch: a TAP `wan0` in each namespace; each frame is written out once its link's delay has passed."""
    namespaces, delay_ms, rate = spec["namespaces"], spec["delay_ms"], spec["rate_mbit"]
    home_fd = os.open(f"/proc/self/task/{threading.get_native_id()}/ns/net", os.O_RDONLY)
    taps = []
    for ns in namespaces:  # a TAP is created in the namespace of the thread that creates it, and stays there
        _setns(f"/var/run/netns/{ns}")
        fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK)
        fcntl.ioctl(fd, TUNSETIFF, struct.pack("16sH", b"wan0", IFF_TAP | IFF_NO_PI))
        taps.append(fd)
    ctypes.CDLL(None, use_errno=True).setns(home_fd, CLONE_NEWNET)
    with contextlib.suppress(PermissionError):  # without it the delays stretch while compute fills every core
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(FIFO_PRIORITY))
    delays = [[d / 1000 for d in row] for row in delay_ms]
    seconds_per_byte = 8 / (rate * 1e6) if rate else 0.0
    busy_until = [[0.0] * len(taps) for _ in taps]
    where: dict[bytes, int] = {}  # MAC -> port, learnt from source addresses
    pending: list[tuple[float, int, int, bytes]] = []
    seq = itertools.count()
    selector = selectors.DefaultSelector()
    for port, fd in enumerate(taps):
        selector.register(fd, selectors.EVENT_READ, port)
    selector.register(sys.stdin, selectors.EVENT_READ, None)  # a line of JSON: new delays (WanLab.set_delays)
    print("ready", flush=True)
    while True:
        timeout = None if not pending else max(0.0, pending[0][0] - time.monotonic())
        for key, _ in selector.select(timeout):
            port = key.data
            if port is None:
                line = sys.stdin.readline()
                if not line:
                    return  # the lab is gone
                delays = [[d / 1000 for d in row] for row in json.loads(line)]
                print("ok", flush=True)
                continue
            while True:
                try:
                    frame = os.read(taps[port], 65536)
                except BlockingIOError:
                    break
                now = time.monotonic()
                where[frame[6:12]] = port
                dest = where.get(frame[0:6])
                for out in [dest] if dest is not None else [p for p in range(len(taps)) if p != port]:
                    due = now + delays[port][out]
                    if seconds_per_byte:  # the link sends one frame at a time at its rate
                        due = max(due, busy_until[port][out]) + len(frame) * seconds_per_byte
                        busy_until[port][out] = due
                    heapq.heappush(pending, (due, next(seq), out, frame))
        now = time.monotonic()
        while pending and pending[0][0] <= now:
            _, _, out, frame = heapq.heappop(pending)
            with contextlib.suppress(BlockingIOError, OSError):  # a full TAP queue drops, as a full link does
                os.write(taps[out], frame)


def ping_pong(lab: WanLab, a: str, b: str, rounds: int = 50, port: int = 7999) -> list[float]:
    """Round-trip times (ms) of a 64-byte TCP ping-pong from `a` to `b`, on one connection. Both ends run under SCHED_FIFO,
    as the switch does, so that what is measured is the links' delay rather than the probe waiting for a core."""
    echo = lab.spawn_in(b, [sys.executable, "-c", _ECHO, lab.ip(b), str(port)], f"echo-{b}.log")
    try:
        with lab.inside(a):
            deadline = time.monotonic() + 10
            while True:
                try:
                    sock = socket.create_connection((lab.ip(b), port), timeout=5)
                    break
                except OSError:
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        times = []
        policy, param = os.sched_getscheduler(0), os.sched_getparam(0)
        with contextlib.suppress(PermissionError):
            os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(FIFO_PRIORITY - 1))
        try:
            with sock:
                for _ in range(rounds):
                    started = time.perf_counter()
                    sock.sendall(b"x" * 64)
                    got = 0
                    while got < 64:
                        got += len(sock.recv(64 - got))
                    times.append((time.perf_counter() - started) * 1000)
        finally:
            os.sched_setscheduler(0, policy, param)
        return times
    finally:
        echo.terminate()
        echo.wait()


_ECHO = f"""
import contextlib, os, socket, sys
with contextlib.suppress(PermissionError):
    os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param({FIFO_PRIORITY - 1}))
server = socket.create_server((sys.argv[1], int(sys.argv[2])))
conn, _ = server.accept()
conn.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
while data := conn.recv(4096):
    conn.sendall(data)
"""

_BURN = """
import torch
torch.set_num_threads(2)
a = torch.randn(1024, 1024)
while True:
    a = torch.tanh(a @ a)
"""


@contextlib.contextmanager
def cores_busy() -> Iterator[None]:
    """torch matrix products on every core for the block (what nodes do while the switch must keep time)."""
    burn = subprocess.Popen([sys.executable, "-c", _BURN], start_new_session=True)
    try:
        time.sleep(1.0)  # torch's import: the burn starts after it
        yield
    finally:
        burn.terminate()
        burn.wait()


def measure_delays(rtts_ms: list[float], rounds: int = 40) -> list[dict]:
    """Configured vs measured RTT between two namespaces while torch keeps every core busy."""
    out = []
    for rtt in rtts_ms:
        with WanLab(["a", "b"], {("a", "b"): rtt / 2}) as lab, cores_busy():
            times = ping_pong(lab, "a", "b", rounds)
        times.sort()
        out.append(
            {
                "configured_rtt_ms": rtt,
                "median_ms": round(statistics.median(times), 2),
                "p90_ms": round(times[int(0.9 * (len(times) - 1))], 2),
                "max_ms": round(times[-1], 2),
            }
        )
    return out


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--switch":
        run_switch(json.loads(sys.argv[2]))
    else:
        print(json.dumps(measure_delays([10, 50, 100])))
