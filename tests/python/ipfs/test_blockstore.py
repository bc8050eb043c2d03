import base64
import hashlib
import os
import random
import subprocess

import pytest

from shardmarket.ipfs.blockstore import BlockNotFound, Blockstore, CorruptBlock, StoreFull
from shardmarket.ipfs.cids import block_cid
from shardmarket.ipfs.unixfs import ImportOptions, export, import_bytes, iter_file


def test_put_get_and_sharded_layout(tmp_path):
    store = Blockstore(tmp_path / "s")
    data = random.Random(0).randbytes(100_000)
    entry = import_bytes(data, ImportOptions(chunk_size=10_000), store)
    assert b"".join(iter_file(store, entry.cid)) == data
    files = list(store.keys())
    assert len(files) == 11  # 10 leaves + root
    assert all(f.parent.parent == store.blocks and len(f.parent.name) == 2 for f in files)
    assert not list(store.tmp.iterdir())


def test_corrupt_block_on_disk_is_detected_and_removed(tmp_path):
    store = Blockstore(tmp_path / "s")
    entry = import_bytes(b"precious bytes", ImportOptions(), store)
    store.block_path(entry.cid).write_bytes(b"rotten bytes!!")
    with pytest.raises(CorruptBlock, match="corrupt and has been removed"):
        store.get(entry.cid)
    assert not store.has(entry.cid)
    with pytest.raises(BlockNotFound):
        store.get(entry.cid)


def test_block_not_matching_its_cid_is_refused(tmp_path):
    store = Blockstore(tmp_path / "s")
    cid = block_cid(1, 0x55, b"the real bytes")
    with pytest.raises(CorruptBlock, match="does not hash"):
        store.add_block(cid, b"other bytes")
    assert not store.has(cid) and not list(store.keys())
    store.add_block(cid, b"the real bytes")
    assert store.get(cid) == b"the real bytes"


def test_pin_and_gc(tmp_path):
    store = Blockstore(tmp_path / "s")
    keep = import_bytes(random.Random(1).randbytes(50_000), ImportOptions(chunk_size=4096), store)
    drop = import_bytes(random.Random(2).randbytes(50_000), ImportOptions(chunk_size=4096), store)
    shared = import_bytes(random.Random(1).randbytes(4096), ImportOptions(chunk_size=4096), store)  # = keep's 1st leaf
    store.pin(keep.cid)
    removed, freed = store.gc()
    assert removed == 14 and freed > 50_000  # drop's 13 leaves + root; the shared leaf stays
    assert store.has(keep.cid) and store.has(shared.cid) and not store.has(drop.cid)
    assert len(b"".join(iter_file(store, keep.cid))) == 50_000
    store.unpin(keep.cid)
    store.gc()
    assert not list(store.keys())


def test_pin_needs_every_block(tmp_path):
    store = Blockstore(tmp_path / "s")
    entry = import_bytes(random.Random(3).randbytes(9000), ImportOptions(chunk_size=1000), store)
    next(p for p in store.keys() if p.name != store.block_path(entry.cid).name).unlink()
    with pytest.raises(BlockNotFound):
        store.pin(entry.cid)
    assert store.pins() == set()


@pytest.fixture
def tiny_disk(tmp_path):
    """A real 1 MiB tmpfs, so writes hit ENOSPC (needs root to mount)."""
    mount = tmp_path / "tiny"
    mount.mkdir()
    if os.geteuid() != 0:
        pytest.skip("mounting a 1 MiB tmpfs to fill the disk needs root")
    result = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)], check=False, capture_output=True)
    if result.returncode:
        pytest.skip(f"cannot mount a tmpfs here: {result.stderr.decode().strip()}")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_full_disk_leaves_nothing_half_written(tiny_disk):
    store = Blockstore(tiny_disk / "s")
    data = random.Random(4).randbytes(3 * 1024 * 1024)
    with pytest.raises(StoreFull, match=r"disk .* is full"):
        import_bytes(data, ImportOptions(chunk_size=262144), store)
    assert not list(store.tmp.iterdir())
    blocks = list(store.keys())
    assert blocks  # some blocks fit; each one that made it is whole: its name is the hash of its bytes
    for path in blocks:
        multihash = base64.b32decode(path.name.upper() + "=" * (-len(path.name) % 8))
        assert multihash[2:] == hashlib.sha256(path.read_bytes()).digest(), f"{path} is half-written"


def test_export_to_full_disk_leaves_no_partial_file(tiny_disk, tmp_path):
    store = Blockstore(tmp_path / "s")
    entry = import_bytes(random.Random(5).randbytes(2 * 1024 * 1024), ImportOptions(), store)
    with pytest.raises(OSError, match="No space left on device"):
        export(store, entry.cid, tiny_disk / "out.bin")
    assert list(tiny_disk.iterdir()) == []
