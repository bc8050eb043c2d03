"""EIP-712 tabs and commitments: what a client/node signs is what the other side recovers."""

import pytest
from eth_abi import encode
from eth_account import Account
from eth_account.messages import encode_typed_data
from eth_keys import keys
from eth_utils import keccak

from shardmarket.chain.eip712 import (
    EMPTY_HISTORY,
    MAX_ENTRIES,
    PAID_BYTES,
    SECP256K1_N,
    TAB_PAID_COUNT,
    Commitment,
    Domain,
    Entry,
    InvalidSignature,
    StepContext,
    Tab,
    UsageRecord,
    chain_history,
    chain_usage_hash,
    commitment_digest,
    commitment_typed_data,
    context_hash,
    pack_tab,
    paid_vector_hash,
    recover_commitment_signer,
    recover_tab_signer,
    sign_commitment,
    sign_tab,
    split_packed_tabs,
    split_signature,
    tab_client,
    tab_digest,
    tab_typed_data,
    tensor_hash,
    unpack_tab,
)

CLIENT = Account.from_key(b"\x01" * 32)
NODE = Account.from_key(b"\x02" * 32)
OTHER_NODE = Account.from_key(b"\x03" * 32)
ESCROW = "0x" + "ab" * 20
DOMAIN = Domain(chain_id=31337, verifying_contract=ESCROW)


def tab(amount: int = 10**18, seq: int = 1) -> Tab:
    entries = sorted([Entry(NODE.address, amount), Entry(OTHER_NODE.address, 7)], key=lambda e: int(e.node, 16))
    return Tab(CLIENT.address, seq, tuple(entries), b"\x11" * 32)


def context(**change) -> StepContext:
    fields = {
        "model_id": b"\x0a" * 32,
        "layer_start": 2,
        "layer_end": 6,
        "request_id": b"\x22" * 32,
        "session_nonce": b"\x55" * 32,
        "step": 7,
        "position": 31,
        "history_hash": b"\x66" * 32,
        "input_hash": b"\x33" * 32,
    }
    return StepContext(**(fields | change))


def commitment(output: bytes = b"\x44" * 32) -> Commitment:
    return Commitment(context(), output, 1_700_000_000)


def high_s(signature: bytes) -> bytes:
    """The malleated twin of a valid signature: s -> n - s, v flipped."""
    s = int.from_bytes(signature[32:64], "big")
    return signature[:32] + (SECP256K1_N - s).to_bytes(32, "big") + bytes([55 - signature[64]])


def test_tab_round_trip_recovers_the_client():
    signature = sign_tab(CLIENT.key, tab(), DOMAIN)
    assert len(signature) == 65 and signature[64] in (27, 28)
    assert recover_tab_signer(tab(), signature, DOMAIN) == CLIENT.address


def test_commitment_round_trip_recovers_the_node():
    signature = sign_commitment(NODE.key, commitment(), DOMAIN)
    assert recover_commitment_signer(commitment(), signature, DOMAIN) == NODE.address


def test_a_commitment_binds_every_field_of_its_context_and_when_it_was_signed():
    """Changing anything the output depends on (or the signing time) changes the digest, so one signature never stands
    for another step, session, position, history or slice."""
    base = commitment_digest(commitment(), DOMAIN)
    changes = {
        "model_id": b"\x0b" * 32,
        "layer_start": 3,
        "layer_end": 5,
        "request_id": b"\x23" * 32,
        "session_nonce": b"\x56" * 32,
        "step": 8,
        "position": 30,
        "history_hash": b"\x67" * 32,
        "input_hash": b"\x34" * 32,
    }
    for name, value in changes.items():
        changed = Commitment(context(**{name: value}), b"\x44" * 32, 1_700_000_000)
        assert commitment_digest(changed, DOMAIN) != base, name
        assert context_hash(changed.context) != context_hash(commitment().context), name
    assert commitment_digest(Commitment(context(), b"\x44" * 32, 1_700_000_001), DOMAIN) != base
    assert context_hash(Commitment(context(), b"\x45" * 32, 1).context) == context_hash(commitment().context)


def test_the_history_hash_chains_every_input_in_order():
    a, b = b"\x01" * 32, b"\x02" * 32
    ab = chain_history(chain_history(EMPTY_HISTORY, a), b)
    assert ab == keccak(keccak(bytes(32) + a) + b)
    assert ab != chain_history(chain_history(EMPTY_HISTORY, b), a)


def test_digests_match_eth_account_typed_data_encoding():
    for digest, typed in (
        (tab_digest(tab(), DOMAIN), tab_typed_data(tab(), DOMAIN)),
        (commitment_digest(commitment(), DOMAIN), commitment_typed_data(commitment(), DOMAIN)),
    ):
        message = encode_typed_data(full_message=typed)
        assert digest == keccak(b"\x19" + message.version + message.header + message.body)


def test_signatures_equal_what_a_wallet_signs_for_the_typed_data():
    assert sign_tab(CLIENT.key, tab(), DOMAIN) == bytes(
        Account.sign_message(encode_typed_data(full_message=tab_typed_data(tab(), DOMAIN)), CLIENT.key).signature
    )
    assert sign_commitment(NODE.key.hex(), commitment(), DOMAIN) == bytes(
        Account.sign_message(encode_typed_data(full_message=commitment_typed_data(commitment(), DOMAIN)), NODE.key).signature
    )


@pytest.mark.parametrize(
    "other",
    [Domain(chain_id=1, verifying_contract=ESCROW), Domain(chain_id=31337, verifying_contract="0x" + "cd" * 20)],
    ids=["other-chain-id", "other-contract"],
)
def test_signature_for_another_domain_recovers_someone_else(other):
    signature = sign_tab(CLIENT.key, tab(), other)
    assert recover_tab_signer(tab(), signature, DOMAIN) != CLIENT.address


def test_changed_amount_recovers_someone_else():
    signature = sign_tab(CLIENT.key, tab(amount=1), DOMAIN)
    assert recover_tab_signer(tab(amount=2), signature, DOMAIN) != CLIENT.address


def test_high_s_twin_is_rejected():
    signature = sign_tab(CLIENT.key, tab(), DOMAIN)
    twin = high_s(signature)
    # the twin is a valid ECDSA signature for the same key: only the low-s rule rejects it
    v, r, s = twin[64] - 27, int.from_bytes(twin[:32], "big"), int.from_bytes(twin[32:64], "big")
    assert (
        keys.Signature(vrs=(v, r, s)).recover_public_key_from_msg_hash(tab_digest(tab(), DOMAIN)).to_checksum_address()
        == CLIENT.address
    )
    with pytest.raises(InvalidSignature, match="lower half"):
        recover_tab_signer(tab(), twin, DOMAIN)


@pytest.mark.parametrize(
    ("signature", "message"),
    [
        (b"", "65 bytes"),
        (b"\x01" * 64, "65 bytes"),
        (b"\x01" * 66, "65 bytes"),
        ("0x" + "01" * 65, "65 bytes"),
        (b"\x01" * 64 + b"\x00", "v must be 27 or 28"),
        (b"\x00" * 32 + b"\x01" * 32 + b"\x1b", "out of range"),
        (b"\x01" * 32 + b"\x00" * 32 + b"\x1b", "out of range"),
        (SECP256K1_N.to_bytes(32, "big") + b"\x01" * 32 + b"\x1b", "out of range"),
    ],
)
def test_malformed_signature_is_rejected(signature, message):
    with pytest.raises(InvalidSignature, match=message):
        recover_tab_signer(tab(), signature, DOMAIN)


def test_signature_with_r_off_the_curve_is_rejected():
    # r = 5 is below n but no curve point has x = 5 with this parity: recovery must fail cleanly
    bad = (5).to_bytes(32, "big") + (1).to_bytes(32, "big") + b"\x1b"
    with pytest.raises(InvalidSignature):
        recover_commitment_signer(commitment(), bad, DOMAIN)


@pytest.mark.parametrize(
    "make",
    [
        lambda: Tab("0x1234", 1, (Entry(NODE.address, 1),), b"\x00" * 32),
        lambda: Entry(NODE.address, -1),
        lambda: Entry(NODE.address, 2**128),
        lambda: Tab(CLIENT.address, 2**32, (Entry(NODE.address, 1),), b"\x00" * 32),
        lambda: Tab(CLIENT.address, 1, (Entry(NODE.address, 1),), b"\x00" * 31),
        lambda: Tab(CLIENT.address, 1, [Entry(NODE.address, 1)], b"\x00" * 32),
        lambda: context(step=2**64),
        lambda: context(layer_end=2**16),
        lambda: context(session_nonce=b"\x00" * 31),
        lambda: context(input_hash="00" * 32),
        lambda: Commitment(context(), b"\x00" * 32, -1),
        lambda: Commitment("context", b"\x00" * 32, 1),
        lambda: Domain(chain_id=1, verifying_contract="not an address"),
        lambda: UsageRecord(b"\x00" * 32, 0, -5, b"\x00" * 32, b"\x00" * 32),
    ],
)
def test_bad_fields_raise_a_clear_value_error(make):
    with pytest.raises(ValueError, match="must be"):
        make()


def test_usage_hash_chain_depends_on_every_record_and_their_order():
    a = UsageRecord(b"\x01" * 32, 0, 5, tensor_hash(b"in"), tensor_hash(b"out"))
    b = UsageRecord(b"\x01" * 32, 1, 1, tensor_hash(b"out"), tensor_hash(b"next"))
    start = b"\x00" * 32
    ab = chain_usage_hash(chain_usage_hash(start, a), b)
    ba = chain_usage_hash(chain_usage_hash(start, b), a)
    assert len(ab) == 32 and ab != ba

    def documented(previous, r):  # keccak256(abi.encode(previous, requestId, step, tokens, inputHash, outputHash))
        return keccak(
            encode(
                ["bytes32", "bytes32", "uint64", "uint64", "bytes32", "bytes32"],
                [previous, r.request_id, r.step, r.tokens, r.input_hash, r.output_hash],
            )
        )

    link = documented(start, a)
    assert chain_usage_hash(start, a) == link
    big = UsageRecord(b"\x02" * 32, 2**64 - 1, 2**63, a.input_hash, a.output_hash)
    assert chain_usage_hash(link, big) == documented(link, big)
    assert ab != chain_usage_hash(chain_usage_hash(start, a), UsageRecord(b"\x01" * 32, 1, 2, b.input_hash, b.output_hash))
    with pytest.raises(ValueError, match="previous must be 32 bytes"):
        chain_usage_hash(b"short", a)


def test_tensor_hash_is_sha256():
    assert tensor_hash(b"").hex() == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"


def test_split_signature_gives_v_r_s():
    signature = sign_tab(CLIENT.key, tab(), DOMAIN)
    v, r, s = split_signature(signature)
    assert v in (27, 28) and bytes([*r, *s, v]) == signature
    with pytest.raises(InvalidSignature, match="65 bytes"):
        split_signature(signature[:64])


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ((), "at least one node"),
        (tuple(Entry("0x" + f"{i + 1:040x}", 1) for i in range(MAX_ENTRIES + 1)), f"at most {MAX_ENTRIES}"),
        ((Entry("0x" + "02" * 20, 1), Entry("0x" + "01" * 20, 1)), "sorted"),
        ((Entry("0x" + "01" * 20, 1), Entry("0x" + "01" * 20, 2)), "sorted"),
    ],
    ids=["empty", "over-the-cap", "unsorted", "duplicate"],
)
def test_malformed_entries_are_refused(entries, message):
    with pytest.raises(ValueError, match=message):
        Tab(CLIENT.address, 1, entries, b"\x00" * 32)


def test_changed_entry_or_seq_recovers_someone_else():
    signature = sign_tab(CLIENT.key, tab(), DOMAIN)
    moved = Tab(
        CLIENT.address, 1, tuple(Entry(e.node, e.amount + 1) if e.amount == 7 else e for e in tab().entries), b"\x11" * 32
    )
    assert recover_tab_signer(moved, signature, DOMAIN) != CLIENT.address
    assert recover_tab_signer(tab(seq=2), signature, DOMAIN) != CLIENT.address


def test_paid_amounts_travel_aligned_with_the_entries_and_only_nodes_paid_something_are_in_a_paid_vector():
    signature = sign_tab(CLIENT.key, tab(), DOMAIN)
    first, second = tab().entries
    data = pack_tab(tab(), signature, (Entry(first.node, 0), Entry(second.node, 4)))
    assert data[TAB_PAID_COUNT] == 2 and data[-2 * PAID_BYTES :] == (0).to_bytes(PAID_BYTES, "big") + (4).to_bytes(
        PAID_BYTES, "big"
    )
    assert unpack_tab(data)[2] == (Entry(second.node, 4),)
    assert paid_vector_hash((Entry(first.node, 0), Entry(second.node, 4))) == paid_vector_hash((Entry(second.node, 4),))
    with pytest.raises(ValueError, match="does not name every node the escrow paid"):
        pack_tab(tab(), signature, (Entry(CLIENT.address, 1),))


def test_a_packed_tab_round_trips_and_truncation_is_refused():
    signature = sign_tab(CLIENT.key, tab(), DOMAIN)
    paid = (Entry(NODE.address, 5),)
    data = pack_tab(tab(), signature, paid)
    assert unpack_tab(data) == (tab(), signature, paid)
    assert unpack_tab(pack_tab(tab(), signature)) == (tab(), signature, ())
    assert tab_client(data) == CLIENT.address.lower() and tab_client(data[:19]) is None
    assert split_packed_tabs(data + pack_tab(tab(), signature)) == [data, pack_tab(tab(), signature)]
    assert paid_vector_hash(()) == 0 and paid_vector_hash(paid) != paid_vector_hash((Entry(NODE.address, 6),))
    for bad in (data[:-1], data + b"\x00", data[:100]):
        with pytest.raises(ValueError, match="signed tab"):
            unpack_tab(bad)
    with pytest.raises(ValueError, match="cut short"):
        split_packed_tabs(data + data[:100])
