import io
import random

import pytest

from shardmarket.ipfs.car import CarError, CarReader, header, section
from shardmarket.ipfs.unixfs import ImportOptions, import_bytes


class Trickle(io.RawIOBase):
    """A stream that hands out at most `step` bytes per read, as a socket may."""

    def __init__(self, data: bytes, step: int) -> None:
        self.data, self.pos, self.step = data, 0, step

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self.step, len(self.data) - self.pos)
        b[:n] = self.data[self.pos : self.pos + n]
        self.pos += n
        return n


def blocks_of(data: bytes, step: int = 1 << 20) -> list:
    return list(CarReader(Trickle(data, step)))


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
    reader = CarReader(Trickle(data, step))
    assert reader.roots == [root]
    assert list(reader) == list(blocks.items())


def test_malformed_cars_are_refused(car):
    root, _, data = car
    with pytest.raises(CarError, match="before its header"):
        CarReader(io.BytesIO(b""))
    with pytest.raises(CarError, match="not a CAR v1"):
        CarReader(io.BytesIO(b"\xff\xff\xff\x7f" + b"\0" * 20))
    with pytest.raises(CarError, match="not dag-cbor"):
        CarReader(io.BytesIO(b"\x03abc"))
    huge = data[: len(header([root]))] + b"\xff\xff\xff\x0f"
    with pytest.raises(CarError, match="out of bounds"):  # refused before a byte of the section is read
        blocks_of(huge, step=1)
    with pytest.raises(CarError, match="unknown version"):
        blocks_of(data[: len(header([root]))] + b"\x05\x07abcd")
    with pytest.raises(CarError, match="shorter than its CID"):
        blocks_of(data[: len(header([root]))] + b"\x05\x12\x20abc")


@pytest.mark.parametrize("cut", [1, 3, 20, 1000])
def test_a_truncated_car_is_refused(car, cut):
    _, _, data = car
    with pytest.raises(CarError, match="truncated"):
        blocks_of(data[:-cut], step=4096)
    head = len(header([car[0]]))
    for end in (head + 1, head + 3, head + 5):  # inside a section's length, its CID's prefix, its digest
        with pytest.raises(CarError, match="truncated"):
            blocks_of(data[:end], step=1)


@pytest.mark.parametrize("step", [7, 1000, 4096, 65536])
@pytest.mark.parametrize("where", [0.5, -10])
def test_a_tampered_block_is_refused_at_any_chunking(car, step, where):
    _, _, data = car
    tampered = bytearray(data)
    tampered[int(len(data) * where) if where > 0 else where] ^= 1
    with pytest.raises(CarError, match="does not match"):
        blocks_of(bytes(tampered), step)
