"""IPFS content layer benchmark; prints JSON on its last line.

In one run, on the same bytes: importer throughput vs plain hashlib.sha256 (goal >= 0.8x), gateway
fetch + verify of a 200 MB file over loopback vs sha256 (goal >= 0.5x), and peak RSS of a process
adding a 1 GiB file (goal < 200 MB). Data is generated on the fly in a temporary folder and deleted.
Client and gateway share the machine's cores, so the fetch also reports the CPU seconds each side spent
and how many cores other processes kept busy meanwhile (a busy machine lowers the wall-clock ratio).
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from shardmarket.ipfs.blockstore import Blockstore, MemoryBlockstore
from shardmarket.ipfs.fetch import DagFetcher
from shardmarket.ipfs.unixfs import ImportOptions, import_path

ROOT = Path(__file__).resolve().parents[1]

MB = 1_000_000
REPEATS = 3


def make_file(path: Path, size: int) -> Path:
    """Random bytes written in 16 MiB pieces (never the whole file in memory)."""
    with open(path, "wb") as f:
        left = size
        while left:
            n = min(left, 16 * 1024 * 1024)
            f.write(os.urandom(n))
            left -= n
    return path


def sha256_file(path: Path) -> float:
    start = time.perf_counter()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            h.update(chunk)
    h.digest()
    return time.perf_counter() - start


def timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def paired(size: int, candidates: dict, sha, repeats: int = REPEATS) -> dict[str, tuple[float, float]]:
    """Time sha256 and each candidate back to back, `repeats` times: {name: (median MB/s, median ratio to sha256)}.

    Each ratio is taken within one round, so it stays meaningful while the machine's load changes."""
    rates: dict[str, list[float]] = {name: [] for name in ["sha256", *candidates]}
    ratios: dict[str, list[float]] = {name: [] for name in ["sha256", *candidates]}
    for _ in range(repeats):
        base = sha()
        rates["sha256"].append(size / MB / base)
        ratios["sha256"].append(1.0)
        for name, fn in candidates.items():
            took = fn()
            rates[name].append(size / MB / took)
            ratios[name].append(base / took)
    return {name: (round(statistics.median(rates[name]), 1), round(statistics.median(ratios[name]), 3)) for name in rates}


def bench_importer(tmp: Path) -> dict:
    size = 256 * 1024 * 1024
    path = make_file(tmp / "import.bin", size)

    def add_to_store() -> float:
        store = Blockstore(tmp / "store-import")
        took = timed(lambda: import_path(path, ImportOptions(), store))
        subprocess.run(["rm", "-rf", str(store.path)], check=True)
        return took

    r = paired(
        size,
        {
            "only_hash": lambda: timed(lambda: import_path(path, ImportOptions())),
            "cidv1": lambda: timed(lambda: import_path(path, ImportOptions(cid_version=1))),
            "add": add_to_store,
        },
        lambda: sha256_file(path),
    )
    path.unlink()
    return {
        "import_file_mib": 256,
        "sha256_mb_per_s": r["sha256"][0],
        "import_only_hash_mb_per_s": r["only_hash"][0],
        "import_only_hash_vs_sha256": r["only_hash"][1],
        "import_cidv1_mb_per_s": r["cidv1"][0],
        "import_cidv1_vs_sha256": r["cidv1"][1],
        "add_to_blockstore_mb_per_s": r["add"][0],
        "add_to_blockstore_vs_sha256": r["add"][1],
    }


def _process_cpu_s(pid: int) -> float:
    """CPU seconds of every live thread of a process, in nanoseconds' precision (Linux schedstat)."""
    tasks = Path(f"/proc/{pid}/task")
    return sum(int((t / "schedstat").read_text().split()[0]) for t in tasks.iterdir()) / 1e9


def _busy_cores_s() -> float:
    """CPU seconds the whole machine has spent busy since boot (all processes, /proc/stat)."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:8]]
    return (sum(fields) - fields[3] - fields[4]) / os.sysconf("SC_CLK_TCK")  # minus idle and iowait


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_gateway(tmp: Path) -> dict:
    size = 200 * MB
    path = make_file(tmp / "serve.bin", size)
    home = tmp / "server"
    entry = import_path(path, ImportOptions(), Blockstore(home / "blocks"))
    port = _free_port()
    server_process = subprocess.Popen(
        [sys.executable, "-m", "shardmarket", "ipfs", "serve", "--port", str(port)],
        cwd=ROOT,
        env={**os.environ, "SHARDMARKET_HOME": str(home)},
        stdout=subprocess.DEVNULL,
    )
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)

        cpu: dict[str, list[float]] = {"client": [], "server": [], "others": []}

        def fetch_once(to_disk: bool) -> float:
            store = Blockstore(tmp / "client") if to_disk else MemoryBlockstore()
            fetcher = DagFetcher(store, [f"http://127.0.0.1:{port}"], progress=False)
            client, server, machine = time.process_time(), _process_cpu_s(server_process.pid), _busy_cores_s()
            took = timed(lambda: asyncio.run(fetcher.fetch(entry.cid)))
            if not to_disk:
                client, server = time.process_time() - client, _process_cpu_s(server_process.pid) - server
                cpu["client"].append(client)
                cpu["server"].append(server)
                cpu["others"].append(max(_busy_cores_s() - machine - client - server, 0) / took)
            if to_disk:
                subprocess.run(["rm", "-rf", str(store.path)], check=True)
            return took

        r = paired(
            size,
            {
                "fetch": lambda: fetch_once(False),
                "fetch_store": lambda: fetch_once(True),
                "disk": lambda: timed(lambda: _write_blocks(tmp / "disk", size)),
            },
            lambda: sha256_file(path),
            repeats=5,
        )  # its ratio swings most with the machine's load
    finally:
        server_process.terminate()
        server_process.wait(10)
        path.unlink()
    return {
        "gateway_file_mb": 200,
        "gateway_sha256_mb_per_s": r["sha256"][0],
        "gateway_fetch_verify_mb_per_s": r["fetch"][0],
        "gateway_fetch_vs_sha256": r["fetch"][1],
        "gateway_fetch_to_blockstore_mb_per_s": r["fetch_store"][0],
        "gateway_fetch_to_blockstore_vs_sha256": r["fetch_store"][1],
        "plain_256k_file_writes_mb_per_s": r["disk"][0],
        "gateway_fetch_client_cpu_s": round(statistics.median(cpu["client"]), 3),
        "gateway_fetch_server_cpu_s": round(statistics.median(cpu["server"]), 3),
        "gateway_fetch_other_processes_cores": round(statistics.median(cpu["others"]), 2),
    }


def _write_blocks(folder: Path, size: int) -> None:
    """The disk floor of a blockstore: the same bytes as 256 KiB files, no hashing."""
    folder.mkdir()
    block = os.urandom(262144)
    for i in range(size // len(block)):
        (folder / str(i)).write_bytes(block)
    subprocess.run(["rm", "-rf", str(folder)], check=True)


RSS_PROBE = """
import re, resource, sys
from shardmarket.ipfs.blockstore import Blockstore
from shardmarket.ipfs.unixfs import ImportOptions, import_path
if sys.argv[1] != "baseline":
    entry = import_path(sys.argv[1], ImportOptions(), Blockstore(sys.argv[2]))
    assert entry.size == 1024 ** 3, entry
hwm = re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read()).group(1)
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, hwm)
"""


def bench_rss(tmp: Path) -> dict:
    size = 1024 * 1024 * 1024
    path = make_file(tmp / "one-gib.bin", size)

    def probe(*args: str) -> tuple[float, float]:
        """(ru_maxrss, VmHWM) in MiB of a fresh interpreter; this runs first, while the parent is still small,
        because Linux carries ru_maxrss across fork+exec."""
        out = subprocess.run(
            [sys.executable, "-c", RSS_PROBE, *args], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout
        maxrss, hwm = out.split()[-2:]
        return int(maxrss) / 1024, int(hwm) / 1024

    baseline, _ = probe("baseline", "")
    peak, hwm = probe(str(path), str(tmp / "store-rss"))
    path.unlink()
    subprocess.run(["rm", "-rf", str(tmp / "store-rss")], check=True)
    return {
        "add_1gib_peak_rss_mb": round(hwm, 1),
        "add_1gib_ru_maxrss_mb": round(peak, 1),
        "bare_interpreter_ru_maxrss_mb": round(baseline, 1),
    }


def main() -> None:
    """Run every part, or only those named on the command line (rss, importer, gateway)."""
    parts = {"rss": bench_rss, "importer": bench_importer, "gateway": bench_gateway}
    wanted = sys.argv[1:] or list(parts)
    if unknown := set(wanted) - set(parts):
        sys.exit(f"unknown part(s) {sorted(unknown)}; choose from {list(parts)}")
    with tempfile.TemporaryDirectory(prefix="bench-ipfs-") as tmp_name:
        tmp = Path(tmp_name)
        result = {}
        for name, bench in ((name, parts[name]) for name in wanted):
            print(f"running {name} benchmark...", file=sys.stderr, flush=True)
            result.update(bench(tmp))
    result["goals"] = {"import_vs_sha256": 0.8, "gateway_fetch_vs_sha256": 0.5, "add_1gib_peak_rss_mb": 200}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
