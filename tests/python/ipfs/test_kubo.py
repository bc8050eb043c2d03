"""The Kubo RPC backend as a ContentStore, against the stand-in Kubo of conftest.py (no Kubo binary exists here): the
same commands and CIDs as the local store, errors Kubo sends after status 200, symlinks, open files."""

from __future__ import annotations

import io
import os
import random
import resource
import subprocess
import sys
from pathlib import Path

import pytest

from shardmarket.cli import main
from shardmarket.ipfs.blockstore import Blockstore, walk
from shardmarket.ipfs.car import read_car
from shardmarket.ipfs.cids import block_cid, parse
from shardmarket.ipfs.kubo import KuboError, KuboStore
from shardmarket.ipfs.unixfs import ImportOptions, import_path

ROOT = Path(__file__).resolve().parents[3]


def _tree(tmp_path: Path) -> Path:
    (tmp_path / "d" / "s").mkdir(parents=True)
    (tmp_path / "d" / "s" / "f.bin").write_bytes(random.Random(3).randbytes(20_000))
    (tmp_path / "d" / "g.txt").write_text("hello world\n")
    return tmp_path / "d"


def test_cli_add_cat_get_pin_through_kubo(kubo, tmp_path, monkeypatch, capsys, home):
    """The same commands and CIDs as with the local store; the blocks are in Kubo's store, none in the local one."""
    monkeypatch.setenv("SHARDMARKET_IPFS_API", kubo.url)
    d = _tree(tmp_path)
    assert main(["ipfs", "add", "-r", "--chunker", "size-4096", "--cid-version", "1", str(d)]) == 0
    lines = capsys.readouterr().out.splitlines()
    ours = import_path(d, ImportOptions(cid_version=1, chunk_size=4096), recursive=True)
    assert lines[-1] == f"added {ours.cid_str} d" and len(lines) == 4
    assert kubo.pins == {ours.cid_str} and len(list(walk(kubo.store, ours.cid))) == 9
    assert main(["ipfs", "get", ours.cid_str, "-o", str(tmp_path / "out")]) == 0
    assert (tmp_path / "out" / "s" / "f.bin").read_bytes() == (d / "s" / "f.bin").read_bytes()
    file_cid = next(line.split()[1] for line in lines if line.endswith("g.txt"))
    assert main(["ipfs", "cat", file_cid]) == 0
    assert capsys.readouterr().out.endswith("hello world\n")
    assert main(["ipfs", "pin", "ls"]) == 0
    assert f"{ours.cid_str} recursive" in capsys.readouterr().out
    assert main(["ipfs", "pin", "rm", "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o"]) == 1
    assert "not pinned" in capsys.readouterr().err
    assert not (home / "blocks").exists() or not list(Blockstore(home / "blocks").keys())
    assert main(["ipfs", "serve"]) == 1  # the local store it would serve is not where the blocks are
    assert "Kubo serves its own trustless gateway" in capsys.readouterr().err


def test_an_error_after_status_200_is_an_error_not_a_root(kubo, tmp_path, monkeypatch, capsys):
    """Kubo fails partway: it has started its answer, and reports the failure in the trailer only."""
    monkeypatch.setenv("SHARDMARKET_IPFS_API", kubo.url)
    d = _tree(tmp_path)
    kubo.fail("block/put", 0, stream_error="write /kubo/blocks/XY/XYZ.data: no space left on device")
    assert main(["ipfs", "add", "-r", "-Q", str(d)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "no space left on device" in err
    kubo.fail("block/put", 0, cut=True)  # the daemon died mid-answer
    assert main(["ipfs", "add", "-r", "-Q", str(d)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "cut short" in err
    kubo.fail("block/put", 0)  # a clean end, but without the block's name
    assert main(["ipfs", "add", "-r", "-Q", str(d)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "ended before it named the block" in err
    kubo.heal("block/put")
    kubo.fail("pin/add", 0, stream_error="context canceled")
    assert main(["ipfs", "add", "-r", "-Q", str(d)]) == 1
    out, err = capsys.readouterr()
    assert out == "" and "context canceled" in err
    kubo.heal("pin/add")
    assert main(["ipfs", "add", "-r", "-Q", str(d)]) == 0
    assert capsys.readouterr().out == import_path(d, recursive=True).cid_str + "\n"


def test_errors_in_the_trailer_of_other_commands(kubo, tmp_path):
    kubo.fail("repo/gc", 0, stream_error="could not remove block: permission denied")
    with KuboStore(kubo.url) as store, pytest.raises(KuboError, match="permission denied"):
        store.gc()
    entry = import_path(_file(tmp_path), ImportOptions(), kubo.store)
    kubo.fail("block/get", 0, cut=True)
    with KuboStore(kubo.url) as store:
        with pytest.raises(KuboError, match="cut short"):
            store.get(entry.cid)
        kubo.heal("block/get")
        assert store.get(entry.cid) == kubo.store.get(entry.cid)  # a new connection after the broken one


def test_a_block_kubo_names_by_another_hash_is_refused(kubo):
    """Kubo names what it stored (a CIDv1, whatever was asked); a daemon that hashed something else is caught at once."""
    with KuboStore(kubo.url) as store, pytest.raises(KuboError, match="which is another hash"):
        store.put(block_cid(1, 0x55, b"another block"), (b"a block",))
    node = b"\x0a\x02\x08\x01"  # an empty UnixFS file, as a CIDv0 block
    with KuboStore(kubo.url) as store:
        store.put(block_cid(0, 0x70, node), (node,))  # the same multihash under a CIDv1: accepted
        assert store.get(block_cid(0, 0x70, node)) == node


def test_adding_many_files_keeps_few_open(kubo, tmp_path):
    """More files than the process may keep open (as 1,500 files under the common limit of 1,024)."""
    d = tmp_path / "many"
    d.mkdir()
    for i in range(400):
        (d / f"{i:04d}.txt").write_text(f"file {i}\n")
    env = {**os.environ, "SHARDMARKET_IPFS_API": kubo.url, "PYTHONPATH": str(ROOT)}

    def limit_files() -> None:
        resource.setrlimit(resource.RLIMIT_NOFILE, (256, 256))

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
    assert not kubo.pins and not list(kubo.store.keys()) and not kubo.calls  # nothing was sent


def test_lying_kubo_block_is_refused(kubo, tmp_path):
    entry = import_path(_file(tmp_path), ImportOptions(), kubo.store)
    kubo.lie = True
    with KuboStore(kubo.url) as store, pytest.raises(KuboError, match="do not match"):
        store.get(entry.cid)


def test_unreachable_kubo_says_what_to_do(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("SHARDMARKET_IPFS_API", "http://127.0.0.1:9")
    assert main(["ipfs", "add", str(_file(tmp_path))]) == 1
    assert "is `ipfs daemon` running?" in capsys.readouterr().err


def _file(tmp_path):
    path = tmp_path / "f.txt"
    path.write_text("some bytes\n")
    return path


def test_dag_export_is_the_same_car_from_either_store(kubo, tmp_path, monkeypatch, capsysbinary):
    d = _tree(tmp_path)
    assert main(["ipfs", "add", "-r", "-Q", str(d)]) == 0
    root = capsysbinary.readouterr().out.decode().strip()
    assert main(["ipfs", "dag", "export", root]) == 0
    local = capsysbinary.readouterr().out
    monkeypatch.setenv("SHARDMARKET_IPFS_API", kubo.url)
    assert main(["ipfs", "add", "-r", "-Q", str(d)]) == 0
    capsysbinary.readouterr()
    assert main(["ipfs", "dag", "export", root]) == 0
    through_kubo = capsysbinary.readouterr().out
    roots, blocks = read_car(io.BytesIO(through_kubo))
    assert through_kubo == local and roots == [bytes(parse(root))] and len(list(blocks)) == 4
