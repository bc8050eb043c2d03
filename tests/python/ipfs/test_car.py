import random

import pytest

from ipfs.car import CarError, CarParser, header, section
from ipfs.unixfs import ImportOptions, import_bytes


class Blocks(dict):
    def put(self, cid, parts):
        self[bytes(cid)] = b"".join(bytes(p) for p in parts)


@pytest.fixture(scope="module")
def car():
    blocks = Blocks()
    entry = import_bytes(random.Random(1).randbytes(300_000), ImportOptions(chunk_size=1000), blocks)
    return entry.cid, blocks, header([entry.cid]) + b"".join(b"".join(section(c, b)) for c, b in blocks.items())


@pytest.mark.parametrize("step", [1, 2, 7, 999, 1000, 1001, 4096, 65536, 10**7])
def test_any_chunking_gives_the_same_verified_blocks(car, step):
    root, blocks, data = car
    parser = CarParser()
    got = []
    for i in range(0, len(data), step):
        got += [(cid, bytes(block)) for cid, block in parser.feed(data[i : i + step])]
    parser.close()
    assert parser.roots == [root]
    assert got == list(blocks.items())


def test_malformed_cars_are_refused(car):
    _, _, data = car
    with pytest.raises(CarError, match="before its header"):
        CarParser().close()
    with pytest.raises(CarError, match="not a CAR v1"):
        CarParser().feed(b"\xff\xff\xff\x7f" + b"\0" * 20)
    with pytest.raises(CarError, match="not dag-cbor"):
        CarParser().feed(b"\x03abc")
    huge = bytearray(data[: len(header([car[0]]))]) + b"\xff\xff\xff\x0f"
    with pytest.raises(CarError, match="out of bounds"):
        CarParser().feed(bytes(huge))
    parser = CarParser()
    parser.feed(bytes(huge[:-2]))
    with pytest.raises(CarError, match="out of bounds"):  # a length cut across chunks, refused before buffering
        parser.feed(bytes(huge[-2:]))


@pytest.mark.parametrize("step", [7, 1000, 4096, 65536])
@pytest.mark.parametrize("where", [0.5, -10])
def test_a_tampered_block_is_refused_at_any_chunking(car, step, where):
    _, _, data = car
    tampered = bytearray(data)
    tampered[int(len(data) * where) if where > 0 else where] ^= 1
    parser = CarParser()
    with pytest.raises(CarError, match="does not match"):
        for i in range(0, len(tampered), step):
            parser.feed(bytes(tampered[i : i + step]))
