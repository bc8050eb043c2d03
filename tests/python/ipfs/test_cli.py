"""`shardmarket ipfs ...` as a user runs it: Kubo's flags, defaults and output."""

import random

from shardmarket.cli import main
from shardmarket.config import load_config
from shardmarket.ipfs.blockstore import Blockstore
from shardmarket.ipfs.unixfs import ImportOptions, directory_node, import_bytes


def store() -> Blockstore:
    return Blockstore(load_config().ipfs.store)


def test_add_output_and_flags(tmp_path, capsys):
    hello = tmp_path / "hello.txt"
    hello.write_text("hello world\n")
    assert main(["ipfs", "add", str(hello)]) == 0
    assert capsys.readouterr().out == "added QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o hello.txt\n"
    assert main(["ipfs", "add", "-q", "--cid-version", "1", str(hello)]) == 0
    assert capsys.readouterr().out == "bafkreifjjcie6lypi6ny7amxnfftagclbuxndqonfipmb64f2km2devei4\n"
    assert main(["ipfs", "add", "-Q", "--cid-version", "1", "--no-raw-leaves", str(hello)]) == 0
    assert capsys.readouterr().out.startswith("bafybei")
    big = tmp_path / "big.bin"
    big.write_bytes(random.Random(0).randbytes(5000))
    assert main(["ipfs", "add", "-Q", "--chunker", "size-1000", "--raw-leaves", str(big)]) == 0
    expected = import_bytes(big.read_bytes(), ImportOptions(chunk_size=1000, raw_leaves=True)).cid_str
    assert capsys.readouterr().out == expected + "\n"


def test_only_hash_writes_nothing(tmp_path, capsys):
    f = tmp_path / "f"
    f.write_bytes(b"x" * 10_000)
    assert main(["ipfs", "add", "-n", "-Q", str(f)]) == 0
    assert not load_config().ipfs.store.exists() or not list(store().keys())


def test_directory_needs_r_and_then_round_trips(tmp_path, capsys):
    (tmp_path / "site" / "css").mkdir(parents=True)
    (tmp_path / "site" / "index.html").write_text("<h1>hi</h1>")
    (tmp_path / "site" / "css" / "a.css").write_text("h1{}")
    assert main(["ipfs", "add", str(tmp_path / "site")]) == 1
    assert "use -r" in capsys.readouterr().err
    assert main(["ipfs", "add", "-r", str(tmp_path / "site")]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [line.split()[2] for line in lines] == ["site/css/a.css", "site/index.html", "site/css", "site"]
    root = lines[-1].split()[1]
    assert main(["ipfs", "cat", root]) == 1
    assert "is a directory" in capsys.readouterr().err
    assert main(["ipfs", "get", root, "-o", str(tmp_path / "copy")]) == 0
    assert (tmp_path / "copy" / "css" / "a.css").read_text() == "h1{}"
    assert main(["ipfs", "get", root, "-o", str(tmp_path / "copy")]) == 1  # never overwrites


def test_get_refuses_a_path_escape(tmp_path, capsys):
    s = store()
    leaf = import_bytes(b"owned", ImportOptions(), s)
    evil = directory_node(ImportOptions(), {"../escaped": leaf}, s)
    assert main(["ipfs", "get", evil.cid_str, "-o", str(tmp_path / "out")]) == 1
    assert "path escape" in capsys.readouterr().err
    assert not (tmp_path / "escaped").exists() and not (tmp_path / "out").exists()


def test_pin_and_gc(tmp_path, capsys):
    a, b = tmp_path / "a", tmp_path / "b"
    a.write_bytes(b"a" * 1000)
    b.write_bytes(b"b" * 1000)
    assert main(["ipfs", "add", "-Q", str(a)]) == 0
    assert main(["ipfs", "add", "-Q", "--pin=false", str(b)]) == 0
    cid_a, cid_b = capsys.readouterr().out.split()
    assert main(["ipfs", "gc"]) == 0
    assert capsys.readouterr().out.startswith("removed 1 blocks")
    assert main(["ipfs", "cat", cid_a]) == 0 and capsys.readouterr().out == "a" * 1000
    assert main(["ipfs", "cat", cid_b]) == 1
    assert "no gateway" in capsys.readouterr().err
    assert main(["ipfs", "pin", "rm", cid_a]) == 0
    assert main(["ipfs", "gc"]) == 0
    assert "removed 1 blocks" in capsys.readouterr().out


def test_bad_cid_is_a_clear_error(capsys):
    assert main(["ipfs", "cat", "QmNotACid"]) == 1
    assert "is not a valid CID" in capsys.readouterr().err


def test_dag_import_of_an_npm_ipfs_car_pack(tmp_path, capsys):
    import subprocess
    from pathlib import Path

    root = Path(__file__).resolve().parents[3]
    data = tmp_path / "data.bin"
    data.write_bytes(random.Random(9).randbytes(600_000))
    car = tmp_path / "data.car"
    subprocess.run(
        [str(root / "node_modules/.bin/ipfs-car"), "pack", str(data), "--no-wrap", "--output", str(car)],
        check=True,
        capture_output=True,
        timeout=120,
    )
    assert main(["ipfs", "dag", "import", str(car)]) == 0
    cid = capsys.readouterr().out.split()[2]
    assert cid == import_bytes(data.read_bytes(), ImportOptions(cid_version=1, chunk_size=1048576)).cid_str
    assert main(["ipfs", "get", cid, "-o", str(tmp_path / "back.bin")]) == 0
    assert (tmp_path / "back.bin").read_bytes() == data.read_bytes()
    # a truncated CAR: a clear error, and every block that was stored is whole
    truncated = tmp_path / "cut.car"
    truncated.write_bytes(car.read_bytes()[:-1000])
    assert main(["ipfs", "pin", "rm", cid]) == 0 and main(["ipfs", "gc"]) == 0
    capsys.readouterr()
    assert main(["ipfs", "dag", "import", str(truncated)]) == 1
    assert "truncated" in capsys.readouterr().err
    assert store().pins() == set() and not list(store().keys())


def test_kubo_boolean_flag_syntax(tmp_path, capsys):
    """`--flag=true|false` as Kubo takes it; a word after a flag is a path, as in Kubo."""
    hello = tmp_path / "hello.txt"
    hello.write_text("hello world\n")
    assert main(["ipfs", "add", "-Q", "--cid-version", "1", "--raw-leaves=false", str(hello)]) == 0
    assert (
        capsys.readouterr().out == import_bytes(b"hello world\n", ImportOptions(cid_version=1, raw_leaves=False)).cid_str + "\n"
    )
    assert main(["ipfs", "add", "--quieter=true", "--raw-leaves", "--pin=False", str(hello)]) == 0
    cid = capsys.readouterr().out.strip()
    assert cid == import_bytes(b"hello world\n", ImportOptions(raw_leaves=True)).cid_str and cid not in store().pins()
    assert main(["ipfs", "add", "--quiet=1", "--recursive=f", str(tmp_path)]) == 1
    assert "use -r" in capsys.readouterr().err
