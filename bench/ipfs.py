"""IPFS content layer benchmark; prints JSON on its last line.

In one run, on the same bytes: importer throughput vs plain hashlib.sha256 (goal >= 0.8x), gateway
fetch + verify of a 200 MB file over loopback vs sha256 (goal >= 0.5x), and peak RSS of a process
adding a 1 GiB file (goal < 200 MB). Data is generated on the fly in a temporary folder and deleted.
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

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from ipfs.blockstore import Blockstore, MemoryBlockstore  # noqa: E402
from ipfs.fetch import DagFetcher  # noqa: E402
from ipfs.unixfs import ImportOptions, import_path  # noqa: E402

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


def median_rate(size: int, fn) -> float:
    return size / MB / statistics.median(fn() for _ in range(REPEATS))


def bench_importer(tmp: Path) -> dict:
    size = 256 * 1024 * 1024
    path = make_file(tmp / "import.bin", size)
    sha = median_rate(size, lambda: sha256_file(path))
    only_hash = median_rate(size, lambda: timed(lambda: import_path(path, ImportOptions())))
    v1 = median_rate(size, lambda: timed(lambda: import_path(path, ImportOptions(cid_version=1))))

    def add_to_store() -> float:
        store = Blockstore(tmp / "store-import")
        took = timed(lambda: import_path(path, ImportOptions(), store))
        subprocess.run(["rm", "-rf", str(store.path)], check=True)
        return took

    added = median_rate(size, add_to_store)
    path.unlink()
    return {"import_file_mb": size // MB, "sha256_mb_per_s": round(sha, 1),
            "import_only_hash_mb_per_s": round(only_hash, 1), "import_only_hash_vs_sha256": round(only_hash / sha, 3),
            "import_cidv1_mb_per_s": round(v1, 1), "import_cidv1_vs_sha256": round(v1 / sha, 3),
            "add_to_blockstore_mb_per_s": round(added, 1), "add_to_blockstore_vs_sha256": round(added / sha, 3)}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def bench_gateway(tmp: Path) -> dict:
    size = 200 * MB
    path = make_file(tmp / "serve.bin", size)
    sha = median_rate(size, lambda: sha256_file(path))
    home = tmp / "server"
    entry = import_path(path, ImportOptions(), Blockstore(home / "blocks"))
    path.unlink()
    port = _free_port()
    server = subprocess.Popen([sys.executable, "-m", "node", "ipfs", "serve", "--port", str(port)], cwd=ROOT,
                              env={**os.environ, "SHARDMARKET_HOME": str(home)}, stdout=subprocess.DEVNULL)
    try:
        for _ in range(300):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.1)

        def fetch_once(to_disk: bool) -> float:
            store = Blockstore(tmp / "client") if to_disk else MemoryBlockstore()
            fetcher = DagFetcher(store, [f"http://127.0.0.1:{port}"], progress=False)
            took = timed(lambda: asyncio.run(fetcher.fetch(entry.cid)))
            if to_disk:
                subprocess.run(["rm", "-rf", str(store.path)], check=True)
            return took

        fetched = median_rate(size, lambda: fetch_once(False))
        stored = median_rate(size, lambda: fetch_once(True))
    finally:
        server.terminate()
        server.wait(10)
    disk = median_rate(size, lambda: timed(lambda: _write_blocks(tmp / "disk", size)))
    return {"gateway_file_mb": size // MB, "gateway_sha256_mb_per_s": round(sha, 1),
            "gateway_fetch_verify_mb_per_s": round(fetched, 1), "gateway_fetch_vs_sha256": round(fetched / sha, 3),
            "gateway_fetch_to_blockstore_mb_per_s": round(stored, 1),
            "plain_256k_file_writes_mb_per_s": round(disk, 1)}


def _write_blocks(folder: Path, size: int) -> None:
    """The disk floor of a blockstore: the same bytes as 256 KiB files, no hashing."""
    folder.mkdir()
    block = os.urandom(262144)
    for i in range(size // len(block)):
        (folder / str(i)).write_bytes(block)
    subprocess.run(["rm", "-rf", str(folder)], check=True)


RSS_PROBE = """
import resource, sys
from ipfs.blockstore import Blockstore
from ipfs.unixfs import ImportOptions, import_path
if sys.argv[1] != "baseline":
    entry = import_path(sys.argv[1], ImportOptions(), Blockstore(sys.argv[2]))
    assert entry.size == 1024 ** 3, entry
print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
"""


def bench_rss(tmp: Path) -> dict:
    size = 1024 * 1024 * 1024
    path = make_file(tmp / "one-gib.bin", size)

    def probe(*args: str) -> float:
        out = subprocess.run([sys.executable, "-c", RSS_PROBE, *args], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout
        return int(out.split()[-1]) / 1024  # KiB -> MiB

    baseline = probe("baseline", "")
    peak = probe(str(path), str(tmp / "store-rss"))
    path.unlink()
    subprocess.run(["rm", "-rf", str(tmp / "store-rss")], check=True)
    return {"add_1gib_peak_rss_mb": round(peak, 1), "python_baseline_rss_mb": round(baseline, 1)}


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="bench-ipfs-") as tmp:
        tmp = Path(tmp)
        result = {}
        for name, bench in (("importer", bench_importer), ("gateway", bench_gateway), ("rss", bench_rss)):
            print(f"running {name} benchmark...", file=sys.stderr, flush=True)
            result.update(bench(tmp))
    result["goals"] = {"import_vs_sha256": 0.8, "gateway_fetch_vs_sha256": 0.5, "add_1gib_peak_rss_mb": 200}
    print(json.dumps(result))


if __name__ == "__main__":
    main()
