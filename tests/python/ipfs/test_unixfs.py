import io
import os
import random

import pytest

from shardmarket.ipfs import pb
from shardmarket.ipfs.cids import to_str
from shardmarket.ipfs.unixfs import (
    AddError,
    ExportError,
    ImportOptions,
    directory_node,
    export,
    import_bytes,
    import_path,
    import_stream,
    iter_file,
)


class DictStore(dict):
    def put(self, cid, parts):
        self[bytes(cid)] = b"".join(bytes(p) for p in parts)

    def get(self, cid):
        return dict.__getitem__(self, bytes(cid))


def data_of(size: int, seed: int = 1) -> bytes:
    return random.Random(seed).randbytes(size)


def test_known_kubo_cids():
    assert import_bytes(b"").cid_str == "QmbFMke1KXqnYyBBWxB74N4c5SBnJMVAiMNRcGu6x1AwQH"
    assert import_bytes(b"hello world\n").cid_str == "QmT78zSuBmuS4z925WZfrqQ1qHaJ56DQaTfyMUF7F8ff5o"
    assert directory_node(ImportOptions(), {}).cid_str == "QmUNLLsPACCz1vLxQVkXqqLX5R1X345qqfHbsf67hvA3Nn"
    # --cid-version 1 turns on raw leaves: a one-chunk file is a bare raw block
    v1 = import_bytes(b"hello world\n", ImportOptions(cid_version=1))
    assert v1.cid_str == "bafkreifjjcie6lypi6ny7amxnfftagclbuxndqonfipmb64f2km2devei4"
    assert v1.tsize == 12


def _root_links(size: int, chunk: int, **opts) -> tuple[list[pb.Link], pb.UnixFSData, DictStore]:
    store = DictStore()
    entry = import_bytes(data_of(size), ImportOptions(chunk_size=chunk, **opts), store)
    links, data = pb.decode_node(store[entry.cid])
    assert entry.size == size
    return links, pb.decode_unixfs(data), store


@pytest.mark.parametrize(
    ("size", "links", "depth"),
    [
        (256, 0, 0),  # one chunk: the leaf is the root
        (257, 2, 1),
        (174 * 256, 174, 1),  # exactly full: still one level
        (174 * 256 + 1, 2, 2),  # one byte more: a second level with a one-leaf subtree
        (174 * 174 * 256 + 1, 2, 3),
    ],
)
def test_balanced_layout_shape(size, links, depth):
    root_links, fs, store = _root_links(size, 256)
    assert len(root_links) == links
    assert fs.filesize == size and sum(fs.blocksizes) + len(fs.data or b"") == size
    d, node = 0, root_links
    while node:
        d += 1
        node, _ = pb.decode_node(store[node[-1].cid])
    assert d == depth


def test_tsize_is_block_size_plus_children():
    store = DictStore()
    entry = import_bytes(data_of(5000), ImportOptions(chunk_size=1024), store)
    assert entry.tsize == sum(len(block) for block in store.values())


def test_stream_and_bytes_agree_and_round_trip():
    data = data_of(300_000)
    store = DictStore()
    a = import_stream(io.BufferedReader(io.BytesIO(data), buffer_size=1000), ImportOptions(chunk_size=4096), store)
    b = import_bytes(data, ImportOptions(chunk_size=4096))
    assert a.cid == b.cid
    assert b"".join(iter_file(store, a.cid)) == data


SIZES = [0, 1, 255, 256, 257, 174 * 256 - 1, 174 * 256, 174 * 256 + 1, 3 * 174 * 256 + 17, 174 * 174 * 64 + 1]
CONFIGS = [(0, False), (0, True), (1, True), (1, False)]


def test_matches_npm_ipfs_unixfs_importer(tmp_path, js_import):
    jobs, ours = [], []
    for size in SIZES:
        path = tmp_path / f"f{size}"
        path.write_bytes(data_of(size, seed=size))
        for chunk in (64, 256, 1000, 262144):
            for version, raw in CONFIGS:
                jobs.append({"path": str(path), "cidVersion": version, "rawLeaves": raw, "chunkSize": chunk})
                entry = import_path(path, ImportOptions(cid_version=version, raw_leaves=raw, chunk_size=chunk))
                ours.append(entry.cid_str)
    assert js_import(jobs) == ours


def test_directory_matches_npm_and_kubo_output_order(tmp_path, js_import):
    root = tmp_path / "site"
    (root / "sub" / "deeper").mkdir(parents=True)
    (root / "b.txt").write_text("b\n")
    (root / "A.txt").write_text("upper A sorts first by bytes\n")
    (root / "sub" / "x.bin").write_bytes(data_of(70_000))
    (root / "sub" / "deeper" / "empty").write_bytes(b"")
    (root / ".hidden").write_text("skipped without --hidden\n")
    added = []
    for version in (0, 1):
        entry = import_path(
            root, ImportOptions(cid_version=version, chunk_size=1024), recursive=True, on_added=lambda name, e: added.append(name)
        )
        [js] = js_import([{"path": str(root), "cidVersion": version, "rawLeaves": version == 1, "chunkSize": 1024}])
        assert entry.cid_str == js
    # Kubo's order: files as they are added, then directories post-order
    assert added[:7] == [
        "site/A.txt",
        "site/b.txt",
        "site/sub/deeper/empty",
        "site/sub/x.bin",
        "site/sub/deeper",
        "site/sub",
        "site",
    ]


def test_directory_round_trip(tmp_path):
    root = tmp_path / "d"
    (root / "s").mkdir(parents=True)
    (root / "s" / "f").write_bytes(data_of(10_000))
    (root / "g").write_text("g")
    store = DictStore()
    entry = import_path(root, ImportOptions(chunk_size=512), store, recursive=True)
    export(store, entry.cid, tmp_path / "out")
    assert (tmp_path / "out" / "s" / "f").read_bytes() == data_of(10_000)
    assert (tmp_path / "out" / "g").read_text() == "g"


def test_path_escape_in_directory_is_refused(tmp_path):
    store = DictStore()
    leaf = import_bytes(b"evil", ImportOptions(), store)
    for bad in ("..", "../x", "a/b", ""):
        evil = directory_node(ImportOptions(), {bad: leaf}, store)
        with pytest.raises(ExportError, match="unsafe"):
            export(store, evil.cid, tmp_path / "out")
        assert not (tmp_path / "out").exists() and not (tmp_path / "x").exists()


def test_bad_options_and_inputs(tmp_path):
    with pytest.raises(AddError, match="chunker"):
        ImportOptions.from_chunker("rabin-1-2-3")
    with pytest.raises(AddError, match="chunk size"):
        ImportOptions(chunk_size=2 * 1024 * 1024)
    with pytest.raises(AddError, match="-r"):
        import_path(tmp_path)
    os.symlink("/etc/passwd", tmp_path / "link")
    with pytest.raises(AddError, match="symbolic link"):
        import_path(tmp_path / "link")


def test_inconsistent_file_node_is_refused():
    store = DictStore()
    entry = import_bytes(data_of(3000), ImportOptions(chunk_size=1000), store)
    links, _ = pb.decode_node(store[entry.cid])
    lying = pb.encode_node(links, pb.encode_unixfs(pb.FILE, None, 3000, [1000, 1000, 999]))
    from shardmarket.ipfs.cids import block_cid

    cid = block_cid(0, 0x70, lying)
    store[cid] = lying
    with pytest.raises(ExportError, match="parent says 999"):
        b"".join(iter_file(store, cid))
    assert to_str(cid).startswith("Qm")
