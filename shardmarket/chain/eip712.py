"""EIP-712 types of shardmarket: payment tabs (PaymentEscrow) and result commitments (DisputeManager).

The one definition of what clients sign, nodes check and the contracts verify. Signatures are 65 bytes
r||s||v (v = 27 or 28) with a low s, exactly what OpenZeppelin's ECDSA.recover accepts.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass
from functools import lru_cache
from itertools import pairwise
from typing import TypeAlias

import coincurve
import sha3
from cchecksum import to_checksum_address
from eth_abi import encode
from eth_keys import datatypes
from eth_utils import keccak

DOMAIN_NAME = "shardmarket"
DOMAIN_VERSION = "1"
SECP256K1_N = 0xFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFFEBAAEDCE6AF48A03BBFD25E8CD0364141
SECP256K1_HALF_N = SECP256K1_N // 2
UINT256_MAX = 2**256 - 1
UINT64_MAX = 2**64 - 1
UINT32_MAX = 2**32 - 1
UINT16_MAX = 2**16 - 1
UINT128_MAX = 2**128 - 1
MAX_ENTRIES = 32  # PackedTab.MAX_ENTRIES: most nodes one tab may name

EIP712_DOMAIN_TYPE = [
    {"name": "name", "type": "string"},
    {"name": "version", "type": "string"},
    {"name": "chainId", "type": "uint256"},
    {"name": "verifyingContract", "type": "address"},
]
ENTRY_TYPE = [
    {"name": "node", "type": "address"},
    {"name": "amount", "type": "uint128"},
]
TAB_TYPE = [
    {"name": "client", "type": "address"},
    {"name": "seq", "type": "uint32"},
    {"name": "entries", "type": "Entry[]"},
    {"name": "usageHash", "type": "bytes32"},
]
STEP_CONTEXT_TYPE = [
    {"name": "modelId", "type": "bytes32"},
    {"name": "layerStart", "type": "uint16"},
    {"name": "layerEnd", "type": "uint16"},
    {"name": "requestId", "type": "bytes32"},
    {"name": "sessionNonce", "type": "bytes32"},
    {"name": "step", "type": "uint64"},
    {"name": "position", "type": "uint64"},
    {"name": "historyHash", "type": "bytes32"},
    {"name": "inputHash", "type": "bytes32"},
]
COMMITMENT_TYPE = [
    {"name": "context", "type": "StepContext"},
    {"name": "outputHash", "type": "bytes32"},
    {"name": "issuedAt", "type": "uint64"},
]
ENTRY_TYPEHASH = keccak(text="Entry(address node,uint128 amount)")
TAB_TYPEHASH = keccak(text="Tab(address client,uint32 seq,Entry[] entries,bytes32 usageHash)Entry(address node,uint128 amount)")
_STEP_CONTEXT = (
    "StepContext(bytes32 modelId,uint16 layerStart,uint16 layerEnd,bytes32 requestId,bytes32 sessionNonce,uint64 step,"
    "uint64 position,bytes32 historyHash,bytes32 inputHash)"
)
STEP_CONTEXT_TYPEHASH = keccak(text=_STEP_CONTEXT)
COMMITMENT_TYPEHASH = keccak(text="Commitment(StepContext context,bytes32 outputHash,uint64 issuedAt)" + _STEP_CONTEXT)
EMPTY_HISTORY = bytes(32)  # a session's history hash before its first step
DOMAIN_TYPEHASH = keccak(text="EIP712Domain(string name,string version,uint256 chainId,address verifyingContract)")


_HEX_ADDRESS = re.compile(r"0x[0-9a-fA-F]{40}")


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
class Entry:
    """What a client owes (in a tab) or has paid (in a paid vector) one node, cumulatively."""

    node: str
    amount: int

    def __post_init__(self) -> None:
        _check_address(self.node, "node")
        _check_uint(self.amount, UINT128_MAX, "amount")


@dataclass(frozen=True)
class Tab:
    """A client's cumulative promise to every node it pays: entries sorted by node, no duplicates, at most
    MAX_ENTRIES; `seq` grows by one per tab; `usage_hash` chains the usage records of every answered step."""

    client: str
    seq: int
    entries: tuple[Entry, ...]
    usage_hash: bytes

    def __post_init__(self) -> None:
        _check_address(self.client, "client")
        _check_uint(self.seq, UINT32_MAX, "seq")
        _check_bytes32(self.usage_hash, "usage_hash")
        check_entries(self.entries)

    def amount_for(self, node: str) -> int:
        """This tab's cumulative amount for `node` (0 when it is not named)."""
        node = node.lower()
        return next((e.amount for e in self.entries if e.node.lower() == node), 0)

    def covers(self, paid: tuple[Entry, ...]) -> bool:
        """Whether the escrow can settle this tab over paid vector `paid`: it names every node paid (an entry below what
        its node was paid pays that node nothing)."""
        named = {e.node.lower() for e in self.entries}
        return all(e.node.lower() in named for e in paid)


def check_entries(entries: tuple[Entry, ...], *, allow_empty: bool = False) -> None:
    """Raise ValueError unless `entries` are Entry objects sorted by node address, without duplicates, within the cap."""
    if not isinstance(entries, tuple) or not all(isinstance(e, Entry) for e in entries):
        raise ValueError("entries must be a tuple of Entry")
    if not entries and not allow_empty:
        raise ValueError("a tab names at least one node")
    if len(entries) > MAX_ENTRIES:
        raise ValueError(f"a tab names at most {MAX_ENTRIES} nodes, got {len(entries)}")
    nodes = [int(e.node, 16) for e in entries]
    if any(a >= b for a, b in pairwise(nodes)):
        raise ValueError("tab entries must be sorted by node address without duplicates")


@dataclass(frozen=True)
class StepContext:
    """Everything the output of one step depends on: the slice that ran it, the session (request id and the nonce
    the node chose when it opened), the step and its first token's position, every earlier input of the session
    (`history_hash`, see `chain_history`) and this input's hash."""

    model_id: bytes
    layer_start: int
    layer_end: int
    request_id: bytes
    session_nonce: bytes
    step: int
    position: int
    history_hash: bytes
    input_hash: bytes

    def __post_init__(self) -> None:
        _check_bytes32(self.model_id, "model_id")
        _check_uint(self.layer_start, UINT16_MAX, "layer_start")
        _check_uint(self.layer_end, UINT16_MAX, "layer_end")
        _check_bytes32(self.request_id, "request_id")
        _check_bytes32(self.session_nonce, "session_nonce")
        _check_uint(self.step, UINT64_MAX, "step")
        _check_uint(self.position, UINT64_MAX, "position")
        _check_bytes32(self.history_hash, "history_hash")
        _check_bytes32(self.input_hash, "input_hash")


@dataclass(frozen=True)
class Commitment:
    """A node's signed statement that it answered `context` with the output hashed `output_hash`, at `issued_at`
    (unix seconds, where the challenge window starts)."""

    context: StepContext
    output_hash: bytes
    issued_at: int

    def __post_init__(self) -> None:
        if not isinstance(self.context, StepContext):
            raise ValueError(f"context must be a StepContext, got {type(self.context).__name__}")
        _check_bytes32(self.output_hash, "output_hash")
        _check_uint(self.issued_at, UINT64_MAX, "issued_at")

    def as_tuple(self) -> tuple:
        """The commitment as the contract's ABI takes it: ((context fields...), outputHash, issuedAt)."""
        c = self.context
        context = (c.model_id, c.layer_start, c.layer_end, c.request_id, c.session_nonce, c.step, c.position, c.history_hash)
        return ((*context, c.input_hash), self.output_hash, self.issued_at)


@dataclass(frozen=True)
class UsageRecord:
    """One served request step, as chained into a tab's usage hash."""

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
PrivateKeyLike: TypeAlias = bytes | str | datatypes.PrivateKey | coincurve.PrivateKey


@lru_cache(maxsize=64)
def domain_separator(domain: Domain) -> bytes:
    """The EIP-712 domain separator, as the contract's `_domainSeparatorV4()` returns it."""
    return keccak(
        encode(
            ["bytes32", "bytes32", "bytes32", "uint256", "address"],
            [
                DOMAIN_TYPEHASH,
                keccak(text=DOMAIN_NAME),
                keccak(text=DOMAIN_VERSION),
                domain.chain_id,
                to_checksum_address(domain.verifying_contract),
            ],
        )
    )


def tab_digest(tab: Tab, domain: Domain) -> bytes:
    """The 32-byte digest a client signs for `tab` (PaymentEscrow's `tabDigest`). Static ABI words are
    concatenated by hand: a node computes this on every step (the tests check it against eth-account)."""
    entries = b"".join(_keccak(ENTRY_TYPEHASH + _word_address(e.node) + e.amount.to_bytes(32, "big")) for e in tab.entries)
    struct_hash = _keccak(
        TAB_TYPEHASH + _word_address(tab.client) + tab.seq.to_bytes(32, "big") + _keccak(entries) + tab.usage_hash
    )
    return _keccak(b"\x19\x01" + domain_separator(domain) + struct_hash)


# A packed tab: how a signed tab travels with every step, how a node stores it, and what PaymentEscrow reads (settleTabs,
# claim). contracts/PackedTab.sol documents the layout; its TAB_*, ENTRY_*, PAID_BYTES and MAX_ENTRIES constants are
# these (tests/python/chain/test_contract_data.py checks it):
#   client (20 bytes) || seq (uint32, 4) || usageHash (32) || r (32) || s (32) || v (1) || n, the entry count (1) ||
#   m, the paid count (1) || n entries || m paid amounts (uint128, 16 each)
# A packed entry is node (20 bytes) || amount (uint128, 16). m is 0 in the form that travels and that claim takes, and n
# when the tab goes to settleTabs: the k-th paid amount is what the escrow has paid the k-th entry's node so far.
# Each constant is the byte offset where a field starts (the client's is 0); a field ends where the next one starts.
TAB_SEQ = 20
TAB_USAGE_HASH = 24
TAB_R = 56
TAB_S = 88
TAB_V = 120
TAB_COUNT = 121
TAB_PAID_COUNT = 122
TAB_HEADER_BYTES = 123  # where the entries start
ENTRY_AMOUNT = 20
ENTRY_BYTES = 36
PAID_BYTES = 16
_SEQ_BYTES = TAB_USAGE_HASH - TAB_SEQ
_AMOUNT_BYTES = ENTRY_BYTES - ENTRY_AMOUNT


def pack_entries(entries: tuple[Entry, ...]) -> bytes:
    """Entries as PaymentEscrow packs them (a tab's entries, paid vectors in TabSettled, Claimed and claim's argument):
    node || amount, ENTRY_BYTES each."""
    return b"".join(bytes.fromhex(e.node[2:]) + e.amount.to_bytes(_AMOUNT_BYTES, "big") for e in entries)


def unpack_entries(data: bytes) -> tuple[Entry, ...]:
    """The entries of `pack_entries`' bytes (a TabSettled or Claimed paid vector); raises ValueError if malformed."""
    if len(data) % ENTRY_BYTES:
        raise ValueError(f"packed entries are a multiple of {ENTRY_BYTES} bytes, got {len(data)}")
    entries = tuple(
        Entry(
            to_checksum_address(data[i : i + ENTRY_AMOUNT].hex()), int.from_bytes(data[i + ENTRY_AMOUNT : i + ENTRY_BYTES], "big")
        )
        for i in range(0, len(data), ENTRY_BYTES)
    )
    check_entries(entries, allow_empty=True)
    return entries


def paid_vector(entries: tuple[Entry, ...]) -> tuple[Entry, ...]:
    """A paid vector as the escrow keeps it: sorted by node, the nodes paid nothing left out."""
    check_entries(entries, allow_empty=True)
    return tuple(e for e in entries if e.amount)


def paid_vector_hash(paid: tuple[Entry, ...]) -> int:
    """PaymentEscrow's 128-bit hash of a paid vector: the low half of keccak256 of its packed entries (the nodes paid
    nothing left out); 0 when empty."""
    paid = paid_vector(paid)
    return int.from_bytes(_keccak(pack_entries(paid))[16:], "big") if paid else 0


def pack_tab(tab: Tab, signature: bytes, paid: tuple[Entry, ...] = ()) -> bytes:
    """The packed tab: `tab` and its client's 65-byte signature; for settleTabs, followed by what the client's current
    paid vector `paid` says each entry's node was paid (none when nothing was paid: the form that travels, too).
    Raises ValueError when `paid` names a node the tab does not (the escrow would reject the tab)."""
    v, r, s = split_signature(signature)
    paid = paid_vector(paid)
    if not tab.covers(paid):
        raise ValueError(f"tab {tab.seq} does not name every node the escrow paid; the escrow would reject it")
    by_node = {e.node.lower(): e.amount for e in paid}
    amounts = b"".join(by_node.get(e.node.lower(), 0).to_bytes(PAID_BYTES, "big") for e in tab.entries) if paid else b""
    return (
        bytes.fromhex(tab.client[2:])
        + tab.seq.to_bytes(_SEQ_BYTES, "big")
        + tab.usage_hash
        + r
        + s
        + bytes((v, len(tab.entries), len(tab.entries) if paid else 0))
        + pack_entries(tab.entries)
        + amounts
    )


def tab_client(data: object) -> str | None:
    """The client a packed tab names, in lower-case hex, read without checking anything else; None if `data` is too
    short to name one."""
    return "0x" + bytes(data[:TAB_SEQ]).hex() if isinstance(data, (bytes, bytearray)) and len(data) >= TAB_SEQ else None


def unpack_tab(data: bytes) -> tuple[Tab, bytes, tuple[Entry, ...]]:
    """(tab, signature, paid vector) of a packed tab (the paid vector empty when it carries no paid amounts); raises
    ValueError if malformed."""
    if not isinstance(data, (bytes, bytearray)) or len(data) < TAB_HEADER_BYTES:
        raise ValueError(f"a signed tab is at least {TAB_HEADER_BYTES} bytes, got {_describe(data)}")
    count, paid_count = data[TAB_COUNT], data[TAB_PAID_COUNT]
    entries_end = TAB_HEADER_BYTES + ENTRY_BYTES * count
    end = entries_end + PAID_BYTES * paid_count
    if len(data) != end:
        raise ValueError(f"a signed tab naming {count} node(s) with {paid_count} paid amount(s) is {end} bytes, got {len(data)}")
    if paid_count not in (0, count):
        raise ValueError(f"a signed tab carries no paid amounts or one per entry, got {paid_count} for {count} entries")
    entries = unpack_entries(bytes(data[TAB_HEADER_BYTES:entries_end]))
    tab = Tab(
        to_checksum_address(data[:TAB_SEQ].hex()),
        int.from_bytes(data[TAB_SEQ:TAB_USAGE_HASH], "big"),
        entries,
        bytes(data[TAB_USAGE_HASH:TAB_R]),
    )
    amounts = [int.from_bytes(data[at : at + PAID_BYTES], "big") for at in range(entries_end, end, PAID_BYTES)]
    paid = tuple(Entry(e.node, a) for e, a in zip(entries, amounts, strict=True) if a) if amounts else ()
    return tab, bytes(data[TAB_R:TAB_COUNT]), paid


def split_packed_tabs(data: bytes) -> list[bytes]:
    """The packed tabs of a settleTabs argument, one after another (what a node reads back from a settlement's calldata)."""
    tabs, at = [], 0
    while at < len(data):
        if len(data) - at < TAB_HEADER_BYTES:
            raise ValueError(f"the packed tab at byte {at} is cut short")
        end = at + TAB_HEADER_BYTES + ENTRY_BYTES * data[at + TAB_COUNT] + PAID_BYTES * data[at + TAB_PAID_COUNT]
        tabs.append(bytes(data[at:end]))
        at = end
    return tabs


def _word_address(address: str) -> bytes:
    return bytes(12) + bytes.fromhex(address[2:])


def context_hash(context: StepContext) -> bytes:
    """The EIP-712 struct hash of `context` (DisputeManager's `contextHash`): what equivocation compares."""
    c = context  # every field is 32 bytes or a checked uint: abi.encode is plain concatenation (hot path)
    return _keccak(
        b"".join(
            (
                STEP_CONTEXT_TYPEHASH,
                c.model_id,
                c.layer_start.to_bytes(32, "big"),
                c.layer_end.to_bytes(32, "big"),
                c.request_id,
                c.session_nonce,
                c.step.to_bytes(32, "big"),
                c.position.to_bytes(32, "big"),
                c.history_hash,
                c.input_hash,
            )
        )
    )


def commitment_digest(commitment: Commitment, domain: Domain) -> bytes:
    """The 32-byte digest a node signs for `commitment` (DisputeManager's `commitmentDigest`)."""
    c = commitment
    struct_hash = _keccak(COMMITMENT_TYPEHASH + context_hash(c.context) + c.output_hash + c.issued_at.to_bytes(32, "big"))
    return _keccak(b"\x19\x01" + domain_separator(domain) + struct_hash)


def chain_history(history: bytes, input_hash: bytes) -> bytes:
    """A session's history hash once one more input (hashed `input_hash`) was answered: keccak256(history || input_hash),
    starting from EMPTY_HISTORY."""
    return _keccak(bytes(history) + bytes(input_hash))


ROLLBACK_TAG = keccak(text="shardmarket.rollback")


def chain_rollback(history: bytes, position: int) -> bytes:
    """A session's history hash once its KV cache dropped every position from `position` on (a step that starts before
    the previous one ended, e.g. after rejected draft tokens): keccak256(history || ROLLBACK_TAG || uint256 position).
    It hashes 96 bytes where an input's link hashes 64, so the two kinds of link never collide."""
    _check_uint(position, UINT64_MAX, "position")
    return _keccak(bytes(history) + ROLLBACK_TAG + position.to_bytes(32, "big"))


def tab_typed_data(tab: Tab, domain: Domain) -> dict:
    """The tab as an EIP-712 typed-data message (for wallets' eth_signTypedData_v4: they show every entry)."""
    data = _typed_data(
        "Tab",
        TAB_TYPE,
        {
            "client": to_checksum_address(tab.client),
            "seq": tab.seq,
            "entries": [{"node": to_checksum_address(e.node), "amount": e.amount} for e in tab.entries],
            "usageHash": tab.usage_hash,
        },
        domain,
    )
    data["types"]["Entry"] = ENTRY_TYPE
    return data


def commitment_typed_data(commitment: Commitment, domain: Domain) -> dict:
    """The commitment as an EIP-712 typed-data message (for wallets' eth_signTypedData_v4)."""
    c = commitment.context
    data = _typed_data(
        "Commitment",
        COMMITMENT_TYPE,
        {
            "context": {
                "modelId": c.model_id,
                "layerStart": c.layer_start,
                "layerEnd": c.layer_end,
                "requestId": c.request_id,
                "sessionNonce": c.session_nonce,
                "step": c.step,
                "position": c.position,
                "historyHash": c.history_hash,
                "inputHash": c.input_hash,
            },
            "outputHash": commitment.output_hash,
            "issuedAt": commitment.issued_at,
        },
        domain,
    )
    data["types"]["StepContext"] = STEP_CONTEXT_TYPE
    return data


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


def sign_tab(private_key: PrivateKeyLike, tab: Tab, domain: Domain) -> bytes:
    """Sign `tab` as its client; returns 65 bytes r||s||v."""
    return _sign(private_key, tab_digest(tab, domain))


def recover_tab_signer(tab: Tab, signature: bytes, domain: Domain) -> str:
    """The checksum address that signed `tab`; raises InvalidSignature on a malformed or high-s signature."""
    return _recover(tab_digest(tab, domain), signature)


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
    """(v, r, s) of a 65-byte r||s||v signature (a packed tab holds r, s, v in that order)."""
    if not isinstance(signature, (bytes, bytearray)) or len(signature) != 65:
        raise InvalidSignature(f"a signature is 65 bytes r||s||v, got {_describe(signature)}")
    return signature[64], bytes(signature[:32]), bytes(signature[32:64])


def chain_usage_hash(previous: bytes, record: UsageRecord) -> bytes:
    """Next link of a usage-hash chain: _keccak(abi.encode(previous, requestId, step, tokens, inputHash, outputHash))."""
    _check_bytes32(previous, "previous")
    # abi.encode of fixed-size fields is each one in a 32-byte word (the record checked them): packed by hand, as
    # eth_abi's general encoder is slow for a path every step takes
    return _keccak(
        bytes(previous)
        + record.request_id
        + record.step.to_bytes(32, "big")
        + record.tokens.to_bytes(32, "big")
        + record.input_hash
        + record.output_hash
    )


def tensor_hash(data: bytes) -> bytes:
    """sha256 of a tensor's raw bytes as they travel (no contract hashes tensors; sha256 is the cheapest hash here,
    and a commitment is hashed four times per hop)."""
    return hashlib.sha256(data).digest()


def signing_key(private_key: PrivateKeyLike) -> coincurve.PrivateKey:
    """`private_key` ready to sign (libsecp256k1 through coincurve); keep it when signing every step."""
    if isinstance(private_key, coincurve.PrivateKey):
        return private_key
    if isinstance(private_key, datatypes.PrivateKey):
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
    return _keccak(public_key.format(compressed=False)[1:])[-20:]


def _keccak(data: bytes) -> bytes:
    """keccak256 through safe-pysha3's C code, much faster than eth_utils' on the per-step tab digest."""
    return sha3.keccak_256(data).digest()


def _describe(value: object) -> str:
    return f"{len(value)} bytes" if isinstance(value, (bytes, bytearray)) else type(value).__name__


def _check_address(value: object, name: str) -> None:
    if not isinstance(value, str) or not (
        _HEX_ADDRESS.fullmatch(value) and (value[2:].islower() or value[2:].isupper() or to_checksum_address(value) == value)
    ):
        raise ValueError(f"{name} must be a 0x-prefixed 20-byte address, got {value!r}")


def _check_uint(value: object, maximum: int, name: str) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not 0 <= value <= maximum:
        raise ValueError(f"{name} must be an integer in [0, {maximum}], got {value!r}")


def _check_bytes32(value: object, name: str) -> None:
    if not isinstance(value, (bytes, bytearray)) or len(value) != 32:
        raise ValueError(f"{name} must be 32 bytes, got {_describe(value)}")


PERMIT_TYPE = [
    {"name": "owner", "type": "address"},
    {"name": "spender", "type": "address"},
    {"name": "value", "type": "uint256"},
    {"name": "nonce", "type": "uint256"},
    {"name": "deadline", "type": "uint256"},
]
PERMIT_TYPEHASH = keccak(text="Permit(address owner,address spender,uint256 value,uint256 nonce,uint256 deadline)")
PERMIT_VERSION = "1"  # OpenZeppelin's ERC20Permit signs under version "1"


@dataclass(frozen=True)
class Permit:
    """An EIP-2612 permit: `owner` lets `spender` move `value` of the token until `deadline`, with the owner's `nonce`."""

    owner: str
    spender: str
    value: int
    nonce: int
    deadline: int


def permit_typed_data(permit: Permit, token_name: str, domain: Domain) -> dict:
    """The permit as EIP-712 typed data, in the token's domain (its name, version 1, chain, address)."""
    message = {
        "owner": to_checksum_address(permit.owner),
        "spender": to_checksum_address(permit.spender),
        "value": permit.value,
        "nonce": permit.nonce,
        "deadline": permit.deadline,
    }
    data = _typed_data("Permit", PERMIT_TYPE, message, domain)
    data["domain"] |= {"name": token_name, "version": PERMIT_VERSION}
    return data


def permit_digest(permit: Permit, token_name: str, domain: Domain) -> bytes:
    """The digest the token's `permit` checks the owner's signature against."""
    separator = _keccak(
        DOMAIN_TYPEHASH
        + encode(
            ["bytes32", "bytes32", "uint256", "address"],
            [keccak(text=token_name), keccak(text=PERMIT_VERSION), domain.chain_id, domain.verifying_contract],
        )
    )
    struct_hash = _keccak(
        PERMIT_TYPEHASH
        + encode(
            ["address", "address", "uint256", "uint256", "uint256"],
            [permit.owner, permit.spender, permit.value, permit.nonce, permit.deadline],
        )
    )
    return _keccak(b"\x19\x01" + separator + struct_hash)


def sign_permit(private_key: PrivateKeyLike, permit: Permit, token_name: str, domain: Domain) -> tuple[int, bytes, bytes]:
    """Sign `permit` as its owner; returns (v, r, s) as the token's `permit` takes them."""
    signature = _sign(private_key, permit_digest(permit, token_name, domain))
    return signature[64], signature[:32], signature[32:64]


def published_types() -> dict:
    """What a wallet needs to show what a client signs (tabs) and what a node signs (commitments): the domain, with the
    values that vary per deployment named, and every type. eip712.json in the repository is this, checked by a test."""
    return {
        "domain": {
            "name": DOMAIN_NAME,
            "version": DOMAIN_VERSION,
            "chainId": "the chain's id",
            "verifyingContract": "PaymentEscrow (tabs) or DisputeManager (commitments), deployments/<chain id>.json",
        },
        "types": {
            "EIP712Domain": EIP712_DOMAIN_TYPE,
            "Tab": TAB_TYPE,
            "Entry": ENTRY_TYPE,
            "Commitment": COMMITMENT_TYPE,
            "StepContext": STEP_CONTEXT_TYPE,
        },
        "primaryTypes": {"tab": "Tab", "commitment": "Commitment"},
    }
