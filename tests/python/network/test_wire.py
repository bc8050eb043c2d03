"""The wire format: round trips, and every kind of bad frame refused with a clear error before allocation."""

import asyncio
import struct

import msgpack
import pytest
import torch

from shardmarket.engine.tensors import tensor_bytes
from shardmarket.net import wire
from shardmarket.net.wire import Limits, Message, WireError


def frame(header: dict, payload: bytes = b"") -> bytes:
    packed = msgpack.packb(header, use_bin_type=True)
    return struct.pack(">I", len(packed)) + packed + payload


def step_header(**overrides) -> dict:
    header = {
        "v": wire.WIRE_VERSION,
        "type": "step",
        "session": b"r" * 32,
        "step": 3,
        "dtype": "float32",
        "shape": [1, 2, 4],
        "nbytes": 32,
    }
    header.update(overrides)
    return header


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_round_trip_keeps_tensor_bits_and_fields(dtype):
    tensor = torch.randn(1, 5, 8).to(dtype)
    message = Message(wire.STEP, b"s" * 32, 7, {"position": 12, "tab": b"\x01\x02"}, tensor)
    decoded = wire.decode(wire.encode(message))
    assert (decoded.type, decoded.session, decoded.step) == (wire.STEP, b"s" * 32, 7)
    assert decoded.fields == {"position": 12, "tab": b"\x01\x02"}
    assert decoded.tensor.dtype == dtype and torch.equal(decoded.tensor, tensor)
    assert decoded.payload == tensor_bytes(tensor)


def test_message_without_tensor_has_no_payload():
    decoded = wire.decode(wire.encode(Message(wire.OPEN, b"x" * 32, 0, {"max_length": 64})))
    assert decoded.tensor is None and decoded.fields == {"max_length": 64}


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (b"", "truncated"),
        (b"\x00\x00", "truncated"),
        (struct.pack(">I", 100) + b"\x80", "truncated"),
        (struct.pack(">I", 3) + b"\xc1\xc1\xc1", "bad_frame"),  # not msgpack
        (frame([1, 2, 3]), "bad_frame"),  # not a map
        (frame({"v": wire.WIRE_VERSION + 1, "type": "step"}), "version"),
        (frame({"v": wire.WIRE_VERSION, "type": "launch_missiles"}), "bad_frame"),
        (frame({"v": wire.WIRE_VERSION, "type": "step", "step": "3"}), "bad_frame"),
        (frame({"v": wire.WIRE_VERSION, "type": "step", "step": -1}), "bad_frame"),
        (frame({"v": wire.WIRE_VERSION, "type": "open"}, b"extra"), "bad_frame"),
        (frame({"v": wire.WIRE_VERSION, "type": "step", 5: 1}), "bad_frame"),  # non-string map key
    ],
)
def test_malformed_frames_are_refused(data, code):
    with pytest.raises(WireError) as err:
        wire.decode(data)
    assert err.value.code == code


@pytest.mark.parametrize(
    ("header", "payload", "code"),
    [
        (step_header(dtype="int64"), bytes(32), "bad_tensor"),
        (step_header(dtype="object"), bytes(32), "bad_tensor"),
        (step_header(shape=[1, 2, 4, 1, 1]), bytes(32), "bad_tensor"),
        (step_header(shape=[1, 0, 4], nbytes=0), b"", "bad_tensor"),
        (step_header(shape=[1, -2, 4]), bytes(32), "bad_tensor"),
        (step_header(shape=[1, 2.0, 4]), bytes(32), "bad_tensor"),
        (step_header(nbytes=64), bytes(32), "bad_tensor"),
        (step_header(), bytes(31), "bad_tensor"),  # truncated payload
        (step_header(), bytes(33), "bad_tensor"),
    ],
)
def test_bad_tensor_headers_are_refused(header, payload, code):
    with pytest.raises(WireError) as err:
        wire.decode(frame(header, payload))
    assert err.value.code == code


def test_huge_claims_are_refused_before_allocating():
    # 2**62 elements would be exabytes: refused by arithmetic on the header alone
    header = step_header(shape=[1, 2**31, 2**31], nbytes=2**63)
    with pytest.raises(WireError) as err:
        wire.decode(frame(header, bytes(32)))
    assert err.value.code == "too_large"


def test_limits_apply_to_frame_and_header_sizes():
    small = Limits(max_frame_bytes=1000, max_header_bytes=100)
    with pytest.raises(WireError, match="exceeds the limit") as err:
        wire.decode(bytes(1001), small)
    assert err.value.code == "too_large"
    with pytest.raises(WireError) as err:
        wire.decode(frame({"v": wire.WIRE_VERSION, "type": "open", "pad": "x" * 200}), small)
    assert err.value.code == "too_large"


def test_stream_frame_length_is_checked_before_reading_the_body():
    async def read(data: bytes, limits: Limits) -> bytes:
        reader = asyncio.StreamReader()
        reader.feed_data(data)
        reader.feed_eof()
        return await wire.read_stream_frame(reader, limits)

    assert asyncio.run(read(wire.stream_frame(b"abc"), Limits())) == b"abc"
    with pytest.raises(WireError, match="exceeds the limit"):
        asyncio.run(read(struct.pack(">I", 2**31) + b"abc", Limits(max_frame_bytes=1024)))
    with pytest.raises(asyncio.IncompleteReadError):
        asyncio.run(read(struct.pack(">I", 10) + b"abc", Limits()))


def test_encode_refuses_a_dtype_that_cannot_travel():
    with pytest.raises(WireError, match="cannot travel"):
        wire.encode(Message(wire.STEP, tensor=torch.zeros(2, dtype=torch.int64)))


def test_node_cli_offers_exactly_the_wire_dtypes():
    from shardmarket.cli.node import DTYPE_NAMES

    assert sorted(DTYPE_NAMES) == sorted(wire.DTYPES)
