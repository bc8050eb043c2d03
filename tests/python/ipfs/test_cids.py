from multiformats import CID, multihash

from shardmarket.ipfs.cids import block_cid, verify


def test_verify_checks_sha2_256_and_other_hashes():
    data = b"a block"
    sha2 = block_cid(1, 0x55, data)
    sha3 = bytes(CID("base32", 1, "raw", multihash.digest(data, "sha3-256")))
    for cid in (sha2, sha3):
        assert verify(cid, data)
        assert not verify(cid, b"another block")
