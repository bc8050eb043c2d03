"""Session encryption: only the pinned key's holder can answer; replayed, reordered, tampered frames fail."""

import pytest
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from shardmarket.chain.keys import load_or_create_x25519_key
from shardmarket.net.crypto import ClientHandshake, DecryptError, node_handshake, public_bytes


def pair(node_key=None, pinned=None):
    node_key = node_key or X25519PrivateKey.generate()
    client = ClientHandshake(pinned or public_bytes(node_key))
    node_eph, node_cipher = node_handshake(node_key, client.hello_key)
    return client.finish(node_eph), node_cipher


def test_both_directions_round_trip():
    client, node = pair()
    for i in range(3):
        assert node.open(client.seal(b"to node %d" % i)) == b"to node %d" % i
        assert client.open(node.seal(b"to client %d" % i)) == b"to client %d" % i


def test_ciphertext_hides_the_plaintext_and_differs_per_session():
    a, _ = pair()
    b, _ = pair()
    plaintext = b"hidden states " * 10
    sealed_a, sealed_b = a.seal(plaintext), b.seal(plaintext)
    assert plaintext[:14] not in sealed_a and sealed_a != sealed_b


def test_replayed_frame_fails_and_the_session_goes_on():
    client, node = pair()
    first = client.seal(b"step 0")
    assert node.open(first) == b"step 0"
    with pytest.raises(DecryptError, match="replayed"):
        node.open(first)
    assert node.open(client.seal(b"step 1")) == b"step 1"


def test_reordered_frames_fail():
    client, node = pair()
    first, second = client.seal(b"a"), client.seal(b"b")
    with pytest.raises(DecryptError):
        node.open(second)
    assert node.open(first) == b"a"
    assert node.open(second) == b"b"


def test_tampered_frame_fails():
    client, node = pair()
    sealed = bytearray(client.seal(b"hidden"))
    sealed[0] ^= 1
    with pytest.raises(DecryptError):
        node.open(bytes(sealed))


def test_frame_reflected_back_to_its_sender_fails():
    client, _ = pair()
    with pytest.raises(DecryptError):
        client.open(client.seal(b"echo"))


def test_wrong_pinned_key_cannot_talk_to_the_node():
    node_key = X25519PrivateKey.generate()
    client, node = pair(node_key, pinned=public_bytes(X25519PrivateKey.generate()))
    with pytest.raises(DecryptError):
        client.open(node.seal(b"welcome"))
    with pytest.raises(DecryptError):
        node.open(client.seal(b"step"))


def test_bad_public_keys_are_refused():
    with pytest.raises(ValueError, match="X25519 public key is 32 bytes"):
        ClientHandshake(b"short")
    with pytest.raises(ValueError, match="shared key"):
        node_handshake(X25519PrivateKey.generate(), bytes(32))  # low-order point: all-zero shared secret


def test_static_key_is_created_once_with_private_permissions(tmp_path):
    path = tmp_path / "node" / "x25519.key"
    key = load_or_create_x25519_key(path)
    assert path.stat().st_mode & 0o777 == 0o600
    assert public_bytes(load_or_create_x25519_key(path)) == public_bytes(key)
    path.write_bytes(b"short")
    with pytest.raises(ValueError, match="not a 32-byte"):
        load_or_create_x25519_key(path)
