"""CIDs: fast binary CIDs on the hot path, `multiformats` for parsing and printing."""

from __future__ import annotations

import functools
import hashlib

from multiformats import CID, multihash

from shardmarket.ipfs.pb import read_varint

DAG_PB = 0x70
RAW = 0x55
KNOWN_CODECS = {DAG_PB: "dag-pb", RAW: "raw"}
SHA2_256 = 0x12
IDENTITY = 0x00
# Kubo's bounds on a multihash (boxo/verifcid): a shorter digest is no hash, a longer one no file name can hold
MIN_DIGEST = 20
MAX_DIGEST = 128


class BadCID(ValueError):
    """Text or bytes that are not a CID this node can use (bad encoding, unknown codec or hash)."""


def sha256_cid(version: int, codec: int, digest: bytes) -> bytes:
    """The binary CID of a sha2-256 digest: CIDv0 is the bare multihash, CIDv1 prefixes version and codec."""
    if version == 0:
        return b"\x12\x20" + digest
    return bytes((1, codec)) + b"\x12\x20" + digest


def block_cid(version: int, codec: int, data: bytes) -> bytes:
    """The binary sha2-256 CID of a block."""
    return sha256_cid(version, codec, hashlib.sha256(data).digest())


def parse(value: str | bytes | CID) -> CID:
    """Parse a CID (text or binary) and require a codec this node understands (dag-pb or raw) and a digest within
    Kubo's bounds."""
    cid = value if isinstance(value, CID) else _decode(value.strip() if isinstance(value, str) else bytes(value))
    if cid.codec.code not in KNOWN_CODECS:
        raise BadCID(f"CID {cid} uses codec {cid.codec.name}; only dag-pb and raw are supported")
    code, pos = read_varint(cid.digest, 0)
    size = read_varint(cid.digest, pos)[0]
    if size > MAX_DIGEST:
        raise BadCID(f"CID {str(cid)[:24]}... has a {size}-byte digest; digests are at most {MAX_DIGEST} bytes")
    if size < MIN_DIGEST and code != IDENTITY:
        raise BadCID(f"CID {cid} has a {size}-byte digest; a {cid.hashfun.name} digest is at least {MIN_DIGEST} bytes")
    return cid


def to_str(cid: bytes | CID) -> str:
    """Text form as Kubo prints it: base58btc for CIDv0, base32 for CIDv1."""
    return _text(cid if isinstance(cid, CID) else bytes(cid))


# multiformats validates every argument's type on every call: a gateway or fetcher that names the
# same few CIDs in every request (paths, ETags, CAR headers) remembers them
@functools.lru_cache(maxsize=4096)
def _decode(value: str | bytes) -> CID:
    try:
        return CID.decode(value)
    except Exception as exc:
        raise BadCID(f"{value!r} is not a valid CID: {exc}") from None


@functools.lru_cache(maxsize=4096)
def _text(cid: bytes | CID) -> str:
    cid = cid if isinstance(cid, CID) else CID.decode(cid)
    return str(cid) if cid.version == 0 else cid.encode("base32")


def split(cid: bytes) -> tuple[int, bytes]:
    """(codec, multihash) of a binary CID without building a CID object (CIDv0 is dag-pb)."""
    if cid[0] == 0x12:
        return DAG_PB, bytes(cid)
    if cid[0] != 1:
        raise BadCID(f"binary CID {bytes(cid[:8]).hex()}... has unknown version {cid[0]}")
    codec, pos = read_varint(cid, 1)
    return codec, bytes(cid[pos:])


def multihash_of(cid: bytes) -> bytes:
    """The multihash part of a binary CID."""
    return split(cid)[1]


def verify(cid: bytes, data: bytes | memoryview) -> bool:
    """Whether `data` hashes to the multihash inside `cid` (sha2-256 fast, other hashes via multiformats)."""
    mh = multihash_of(cid)
    if mh[0] == SHA2_256 and mh[1] == 0x20:
        return hashlib.sha256(data).digest() == mh[2:]
    try:
        code, _ = multihash.unwrap_raw(mh)
        return multihash.digest(bytes(data), code) == mh
    except Exception:
        return False
