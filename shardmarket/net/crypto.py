"""End-to-end encryption of a session: X25519 key agreement to the node's pinned key, then AES-GCM frames.

The handshake is Noise NK in spirit: the client sends an ephemeral key; the node answers with its own
ephemeral key and a first encrypted frame. Keys come from HKDF over DH(client eph, node static) and
DH(client eph, node eph), so only the holder of the pinned static key can answer and past sessions stay
secret. Each direction has its own key and a counter nonce that is never sent: a replayed, reordered,
dropped or tampered frame fails authentication.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

PROTOCOL = b"shardmarket-session-v1"
KEY_BYTES = 32


class DecryptError(ValueError):
    """A frame that fails authentication: wrong key, tampered, replayed, reordered or dropped."""


def public_bytes(key: X25519PrivateKey | X25519PublicKey) -> bytes:
    """The 32 raw bytes of an X25519 public key."""
    public = key.public_key() if isinstance(key, X25519PrivateKey) else key
    return public.public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)


def load_public_key(raw: bytes) -> X25519PublicKey:
    """An X25519 public key from 32 raw bytes; raises ValueError on anything else."""
    if not isinstance(raw, (bytes, bytearray)) or len(raw) != KEY_BYTES:
        raise ValueError(f"an X25519 public key is {KEY_BYTES} bytes")
    return X25519PublicKey.from_public_bytes(bytes(raw))


SEAL_OVERHEAD = 16  # bytes a sealed frame carries beyond its plaintext (the AES-GCM tag)


class _Direction:
    """One direction of a session: an AEAD key and the counter of the next frame."""

    def __init__(self, key: bytes) -> None:
        self._aead = AESGCM(key)
        self._counter = 0

    def _nonce(self) -> bytes:
        return self._counter.to_bytes(12, "big")

    def seal(self, plaintext: bytes) -> bytes:
        sealed = self._aead.encrypt(self._nonce(), plaintext, None)
        self._counter += 1
        return sealed

    def open(self, ciphertext: bytes) -> bytes:
        try:
            plaintext = self._aead.decrypt(self._nonce(), ciphertext, None)
        except InvalidTag:
            raise DecryptError(
                f"frame {self._counter} failed authentication: wrong key, or a tampered, replayed or reordered frame"
            ) from None
        self._counter += 1
        return plaintext


@dataclass
class SessionCipher:
    """Seals outgoing and opens incoming frames of one session."""

    outgoing: _Direction
    incoming: _Direction

    def seal(self, plaintext: bytes) -> bytes:
        return self.outgoing.seal(plaintext)

    def open(self, ciphertext: bytes) -> bytes:
        return self.incoming.open(ciphertext)


def _derive(es: bytes, ee: bytes, client_eph: bytes, node_static: bytes, node_eph: bytes) -> tuple[bytes, bytes]:
    transcript = hashlib.sha256(PROTOCOL + client_eph + node_static + node_eph).digest()
    okm = HKDF(hashes.SHA256(), 2 * KEY_BYTES, salt=transcript, info=PROTOCOL).derive(es + ee)
    return okm[:KEY_BYTES], okm[KEY_BYTES:]  # client->node, node->client


class ClientHandshake:
    """The client's side: an ephemeral key, then the session keys once the node's ephemeral key arrives."""

    def __init__(self, node_static_public: bytes) -> None:
        self._node_static = load_public_key(node_static_public)
        self._ephemeral = X25519PrivateKey.generate()
        self.hello_key = public_bytes(self._ephemeral)

    def finish(self, node_ephemeral_public: bytes) -> SessionCipher:
        node_eph = load_public_key(node_ephemeral_public)
        es = self._ephemeral.exchange(self._node_static)
        ee = self._ephemeral.exchange(node_eph)
        c2n, n2c = _derive(es, ee, self.hello_key, public_bytes(self._node_static), public_bytes(node_eph))
        return SessionCipher(outgoing=_Direction(c2n), incoming=_Direction(n2c))


def node_handshake(static_key: X25519PrivateKey, client_ephemeral_public: bytes) -> tuple[bytes, SessionCipher]:
    """The node's side: returns its ephemeral public key (sent in clear) and the session cipher."""
    client_eph = load_public_key(client_ephemeral_public)
    ephemeral = X25519PrivateKey.generate()
    es = static_key.exchange(client_eph)
    ee = ephemeral.exchange(client_eph)
    c2n, n2c = _derive(es, ee, bytes(client_ephemeral_public), public_bytes(static_key), public_bytes(ephemeral))
    return public_bytes(ephemeral), SessionCipher(outgoing=_Direction(n2c), incoming=_Direction(c2n))
