"""EIP-712 types of shardmarket: payment receipts (PaymentEscrow) and result commitments (DisputeManager).

The one definition of what clients sign, nodes check and the contracts verify. Signatures are 65 bytes
r||s||v (v = 27 or 28) with a low s, exactly what OpenZeppelin's ECDSA.recover accepts.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import coincurve
import hashlib

from eth_abi import encode
from eth_hash.auto import keccak as keccak256
from eth_keys import keys
from eth_utils import is_address, keccak, to_checksum_address

DOMAIN_NAME = "shardmarket"
DOMAIN_VERSION = "1"
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
SECP256K1_HALF_N = SECP256K1_N // 2
UINT256_MAX = 2**256 - 1
UINT64_MAX = 2**64 - 1

EIP712_DOMAIN_TYPE = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]
RECEIPT_TYPE = [
    {"name": "client", "type": "address"},
    {"name": "node", "type": "address"},
    {"name": "cumulativeAmount", "type": "uint256"},
    {"name": "usageHash", "type": "bytes32"},
    {"name": "nonce", "type": "uint256"},
]
COMMITMENT_TYPE = [
    {"name": "requestId", "type": "bytes32"},
    {"name": "step", "type": "uint64"},
    {"name": "inputHash", "type": "bytes32"},
    {"name": "outputHash", "type": "bytes32"},
]
RECEIPT_TYPEHASH = keccak(
    text="Receipt(address client,address node,uint256 cumulativeAmount,bytes32 usageHash,uint256 nonce)"
)
COMMITMENT_TYPEHASH = keccak(text="Commitment(bytes32 requestId,uint64 step,bytes32 inputHash,bytes32 outputHash)")
DOMAIN_TYPEHASH = keccak(text="EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)")


class InvalidSignature(ValueError):
    """A signature that is malformed, has a high s, or recovers to no address."""


@dataclass(frozen=True)
class Domain:
    """Where a signature is valid: the chain and the contract that verifies it."""

    chain_id: int
    verifying_contract: str

    def __post_init__(self) -> None:
        _check_uint(self.chain_id, UINT256_MAX, "chain_id")
        _check_address(self.verifying_contract, "verifying_contract")


@dataclass(frozen=True)
class Receipt:
    """A client's promise to pay `node` a running total of `cumulative_amount` token units."""

    client: str
    node: str
    cumulative_amount: int
    usage_hash: bytes
    nonce: int

    def __post_init__(self) -> None:
        _check_address(self.client, "client")
        _check_address(self.node, "node")
        _check_uint(self.cumulative_amount, UINT256_MAX, "cumulative_amount")
        _check_bytes32(self.usage_hash, "usage_hash")
        _check_uint(self.nonce, UINT256_MAX, "nonce")


@dataclass(frozen=True)
class Commitment:
    """A node's signed statement that step `step` of `request_id` mapped `input_hash` to `output_hash`."""

    request_id: bytes
    step: int
    input_hash: bytes
    output_hash: bytes

    def __post_init__(self) -> None:
        _check_bytes32(self.request_id, "request_id")
        _check_uint(self.step, UINT64_MAX, "step")
        _check_bytes32(self.input_hash, "input_hash")
        _check_bytes32(self.output_hash, "output_hash")


@dataclass(frozen=True)
class UsageRecord:
    """One served request step, as chained into a receipt's usage hash."""

    request_id: bytes
    step: int
    tokens: int
    input_hash: bytes
    output_hash: bytes

    def __post_init__(self) -> None:
        _check_bytes32(self.request_id, "request_id")
        _check_uint(self.step, UINT64_MAX, "step")
        _check_uint(self.tokens, UINT64_MAX, "tokens")
        _check_bytes32(self.input_hash, "input_hash")
        _check_bytes32(self.output_hash, "output_hash")


# raw 32 bytes, hex, an eth_keys key, or (fastest, for a frequent signer) the result of `signing_key`
PrivateKeyLike = bytes | str | keys.PrivateKey | coincurve.PrivateKey


@lru_cache(maxsize=64)
def domain_separator(domain: Domain) -> bytes:
    """The EIP-712 domain separator, as the contract's `_domainSeparatorV4()` returns it."""
    return keccak(
        encode(
            ["bytes32", "bytes32", "bytes32", "uint256", "address"],
            [DOMAIN_TYPEHASH, keccak(text=DOMAIN_NAME), keccak(text=DOMAIN_VERSION), domain.chain_id,
             to_checksum_address(domain.verifying_contract)],
        )
    )


def receipt_digest(receipt: Receipt, domain: Domain) -> bytes:
    """The 32-byte digest a client signs for `receipt` (PaymentEscrow's `receiptDigest`)."""
    struct_hash = keccak(
        encode(
            ["bytes32", "address", "address", "uint256", "bytes32", "uint256"],
            [RECEIPT_TYPEHASH, receipt.client, receipt.node, receipt.cumulative_amount, receipt.usage_hash, receipt.nonce],
        )
    )
    return keccak(b"\x19\x01" + domain_separator(domain) + struct_hash)


def commitment_digest(commitment: Commitment, domain: Domain) -> bytes:
    """The 32-byte digest a node signs for `commitment` (DisputeManager's `commitmentDigest`)."""
    c = commitment  # every field is 32 bytes or a checked uint64: abi.encode is plain concatenation (hot path)
    struct_hash = keccak256(b"".join((COMMITMENT_TYPEHASH, c.request_id, c.step.to_bytes(32, "big"), c.input_hash, c.output_hash)))
    return keccak256(b"\x19\x01" + domain_separator(domain) + struct_hash)


def receipt_typed_data(receipt: Receipt, domain: Domain) -> dict:
    """The receipt as an EIP-712 typed-data message (for wallets' eth_signTypedData_v4)."""
    return _typed_data(
        "Receipt",
        RECEIPT_TYPE,
        {
            "client": to_checksum_address(receipt.client),
            "node": to_checksum_address(receipt.node),
            "cumulativeAmount": receipt.cumulative_amount,
            "usageHash": receipt.usage_hash,
            "nonce": receipt.nonce,
        },
        domain,
    )


def commitment_typed_data(commitment: Commitment, domain: Domain) -> dict:
    """The commitment as an EIP-712 typed-data message (for wallets' eth_signTypedData_v4)."""
    return _typed_data(
        "Commitment",
        COMMITMENT_TYPE,
        {
            "requestId": commitment.request_id,
            "step": commitment.step,
            "inputHash": commitment.input_hash,
            "outputHash": commitment.output_hash,
        },
        domain,
    )


def _typed_data(primary: str, fields: list[dict], message: dict, domain: Domain) -> dict:
    return {
        "types": {"EIP712Domain": EIP712_DOMAIN_TYPE, primary: fields},
        "primaryType": primary,
        "domain": {
            "name": DOMAIN_NAME,
            "version": DOMAIN_VERSION,
            "chainId": domain.chain_id,
            "verifyingContract": to_checksum_address(domain.verifying_contract),
        },
        "message": message,
    }


def sign_receipt(private_key: PrivateKeyLike, receipt: Receipt, domain: Domain) -> bytes:
    """Sign `receipt` as its client; returns 65 bytes r||s||v."""
    return _sign(private_key, receipt_digest(receipt, domain))


def recover_receipt_signer(receipt: Receipt, signature: bytes, domain: Domain) -> str:
    """The checksum address that signed `receipt`; raises InvalidSignature on a malformed or high-s signature."""
    return _recover(receipt_digest(receipt, domain), signature)


def sign_commitment(private_key: PrivateKeyLike, commitment: Commitment, domain: Domain) -> bytes:
    """Sign `commitment` as a node's operator; returns 65 bytes r||s||v."""
    return _sign(private_key, commitment_digest(commitment, domain))


def recover_commitment_signer(commitment: Commitment, signature: bytes, domain: Domain) -> str:
    """The checksum address that signed `commitment`; raises InvalidSignature on a malformed or high-s signature."""
    return _recover(commitment_digest(commitment, domain), signature)


def is_commitment_signer(commitment: Commitment, signature: bytes, domain: Domain, address: str) -> bool:
    """Whether `address` signed `commitment` (the per-step check: no checksum formatting); raises InvalidSignature
    on a malformed or high-s signature."""
    return _recover_address(commitment_digest(commitment, domain), signature) == bytes.fromhex(address.removeprefix("0x"))


def split_signature(signature: bytes) -> tuple[int, bytes, bytes]:
    """(v, r, s) of a 65-byte r||s||v signature, as PaymentEscrow.redeemBatch takes it."""
    if not isinstance(signature, (bytes, bytearray)) or len(signature) != 65:
        raise InvalidSignature(f"a signature is 65 bytes r||s||v, got {_describe(signature)}")
    return signature[64], bytes(signature[:32]), bytes(signature[32:64])


def chain_usage_hash(previous: bytes, record: UsageRecord) -> bytes:
    """Next link of a usage-hash chain: keccak256(abi.encode(previous, requestId, step, tokens, inputHash, outputHash))."""
    _check_bytes32(previous, "previous")
    return keccak(
        encode(
            ["bytes32", "bytes32", "uint64", "uint64", "bytes32", "bytes32"],
            [previous, record.request_id, record.step, record.tokens, record.input_hash, record.output_hash],
        )
    )


def tensor_hash(data: bytes) -> bytes:
    """sha256 of a tensor's raw bytes as they travel (no contract hashes tensors; sha256 is the cheapest hash here,
    and a commitment is hashed four times per hop)."""
    return hashlib.sha256(data).digest()


def signing_key(private_key: PrivateKeyLike) -> coincurve.PrivateKey:
    """`private_key` ready to sign (libsecp256k1 through coincurve); keep it when signing every step."""
    if isinstance(private_key, coincurve.PrivateKey):
        return private_key
    if isinstance(private_key, keys.PrivateKey):
        return coincurve.PrivateKey(private_key.to_bytes())
    raw = bytes.fromhex(private_key.removeprefix("0x")) if isinstance(private_key, str) else bytes(private_key)
    return coincurve.PrivateKey(raw)


def _sign(private_key: PrivateKeyLike, digest: bytes) -> bytes:
    """Sign an EIP-712 digest (the tests check it equals eth-account's typed-data encoding); v in {27, 28}, and s is
    low because libsecp256k1 always signs in lower-s form."""
    signature = signing_key(private_key).sign_recoverable(digest, hasher=None)
    return signature[:64] + bytes([signature[64] + 27])


def _recover(digest: bytes, signature: bytes) -> str:
    return to_checksum_address(_recover_address(digest, signature))


def _recover_address(digest: bytes, signature: bytes) -> bytes:
    """The 20-byte address that made `signature` over `digest`."""
    if not isinstance(signature, (bytes, bytearray)) or len(signature) != 65:
        raise InvalidSignature(f"a signature is 65 bytes r||s||v, got {_describe(signature)}")
    r = int.from_bytes(signature[:32], "big")
    s = int.from_bytes(signature[32:64], "big")
    v = signature[64]
    if v not in (27, 28):
        raise InvalidSignature(f"signature v must be 27 or 28, got {v}")
    if not 0 < r < SECP256K1_N or not 0 < s <= SECP256K1_HALF_N:
        raise InvalidSignature("signature r or s out of range (s must be in the lower half of the curve order)")
    try:
        public_key = coincurve.PublicKey.from_signature_and_message(bytes(signature[:64]) + bytes([v - 27]), digest, hasher=None)
    except ValueError as exc:
        raise InvalidSignature(f"signature recovers to no public key: {exc}") from None
    return keccak256(public_key.format(compressed=False)[1:])[-20:]


def _describe(value: object) -> str:
    return f"{len(value)} bytes" if isinstance(value, (bytes, bytearray)) else type(value).__name__


def _check_address(value: object, name: str) -> None:
    if not isinstance(value, str) or not is_address(value):
        raise ValueError(f"{name} must be a 0x-prefixed 20-byte address, got {value!r}")


def _check_uint(value: object, maximum: int, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= maximum:
        raise ValueError(f"{name} must be an integer in [0, {maximum}], got {value!r}")


def _check_bytes32(value: object, name: str) -> None:
    if not isinstance(value, (bytes, bytearray)) or len(value) != 32:
        raise ValueError(f"{name} must be 32 bytes, got {_describe(value)}")
