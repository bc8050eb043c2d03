"""The one wire format: a msgpack header plus raw tensor bytes, checked against limits before any allocation.

A message is `u32 header length | msgpack header | payload`. The header names the message type, the
session and step, and, when a tensor rides along, its dtype, shape and byte count. On a byte stream
each (encrypted) message travels as `u32 length | bytes`. Nothing is ever unpickled.
"""

from __future__ import annotations

import asyncio
import struct
import sys
from dataclasses import dataclass, field

import msgpack
import torch

from shardmarket.engine.tensors import tensor_bytes

WIRE_VERSION = 2  # 2: OPENED names the session nonce, COMMIT carries the history hash and issued_at
_U32 = struct.Struct(">I")

# The message types of an inference session (client -> node, node -> client).
HELLO, WELCOME = "hello", "welcome"
OPEN, OPENED = "open", "opened"
STEP, RESULT, COMMIT = "step", "result", "commit"
CLOSE, CLOSED = "close", "closed"
ERROR = "error"
MESSAGE_TYPES = frozenset({HELLO, WELCOME, OPEN, OPENED, STEP, RESULT, COMMIT, CLOSE, CLOSED, ERROR})

DTYPES: dict[str, torch.dtype] = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
if sys.byteorder != "little":  # tensors travel little-endian and are read in place
    raise ImportError("shardmarket's wire format needs a little-endian machine")
_HEADER_KEYS = {"v": int, "type": str, "session": bytes, "step": int, "dtype": str, "shape": list, "nbytes": int}


class WireError(ValueError):
    """A frame that breaks the wire format or its limits; `code` is the error frame's code."""

    def __init__(self, message: str, code: str = "bad_frame") -> None:
        super().__init__(message)
        self.code = code


class StreamDesync(WireError):
    """A byte stream whose frame boundaries are lost (a length over the limit): the connection must close."""


@dataclass(frozen=True)
class Limits:
    """Upper bounds every received frame is checked against before anything is allocated."""

    max_frame_bytes: int = 256 * 2**20
    max_header_bytes: int = 64 * 2**10
    max_ndim: int = 4
    max_elements: int = 64 * 2**20


DEFAULT_LIMITS = Limits()
# until the handshake completes a peer is a stranger: its hello is a few dozen bytes, so frames stay tiny
HANDSHAKE_LIMITS = Limits(max_frame_bytes=4 * 2**10, max_header_bytes=1024, max_ndim=1, max_elements=1)

# error codes that name the request, not the node, as the cause (a length past the model's context, a step larger than
# the node takes, a wrong shape): a client never counts one against the node
REQUEST_FAULTS = frozenset({"bad_open", "too_long", "too_large", "bad_tensor"})
# error codes of a node that cannot take this request now: it is full ("capacity": no room for another session; the
# frame carries the node's load), or this client has too many sessions there, or its payment does not cover the
# request. No fault of the node's: a client tries other nodes for the request, and keeps routing other requests to it
DECLINES = frozenset(
    {"capacity", "too_many_sessions", "payment_required", "insufficient_funds", "reserve_required", "payment_unavailable"}
)


@dataclass
class Message:
    """One decoded frame: its type, session and step, other header fields, and an optional tensor."""

    type: str
    session: bytes = b""
    step: int = 0
    fields: dict = field(default_factory=dict)
    tensor: torch.Tensor | None = None
    payload: bytes = b""  # the tensor's bytes exactly as they travelled (hashed into commitments)


def encode(message: Message) -> bytes:
    """Serialize `message`; the tensor's bytes are appended raw after the header."""
    if message.type not in MESSAGE_TYPES:
        raise WireError(f"unknown message type {message.type!r}")
    header = dict(message.fields)
    header.update(v=WIRE_VERSION, type=message.type, session=bytes(message.session), step=int(message.step))
    payload = b""
    if message.tensor is not None:
        if message.tensor.dtype not in _DTYPE_NAMES:
            raise WireError(f"dtype {message.tensor.dtype} cannot travel; use one of {', '.join(DTYPES)}")
        payload = message.payload or tensor_bytes(message.tensor)
        header.update(dtype=_DTYPE_NAMES[message.tensor.dtype], shape=list(message.tensor.shape), nbytes=len(payload))
    packed = msgpack.packb(header, use_bin_type=True)
    return _U32.pack(len(packed)) + packed + payload


def decode(data: bytes | bytearray | memoryview, limits: Limits = DEFAULT_LIMITS) -> Message:
    """Parse and check one message; raises WireError (never allocates beyond `limits`)."""
    view = memoryview(data)
    if len(view) > limits.max_frame_bytes:
        raise WireError(f"frame of {len(view)} bytes exceeds the limit of {limits.max_frame_bytes}", "too_large")
    if len(view) < _U32.size:
        raise WireError(f"frame of {len(view)} bytes is shorter than its 4-byte header length", "truncated")
    (header_len,) = _U32.unpack_from(view)
    if header_len > limits.max_header_bytes:
        raise WireError(f"header of {header_len} bytes exceeds the limit of {limits.max_header_bytes}", "too_large")
    if _U32.size + header_len > len(view):
        raise WireError(f"header claims {header_len} bytes but only {len(view) - _U32.size} arrived", "truncated")
    header = _unpack_header(view[_U32.size : _U32.size + header_len], limits)
    payload = view[_U32.size + header_len :]
    version = header.get("v")
    if version != WIRE_VERSION:
        raise WireError(f"wire version {version!r} is not supported; this node speaks version {WIRE_VERSION}", "version")
    for key, kind in _HEADER_KEYS.items():
        if key in header and (not isinstance(header[key], kind) or isinstance(header[key], bool)):
            raise WireError(f"header field {key!r} must be {kind.__name__}, got {type(header[key]).__name__}")
    if header.get("type") not in MESSAGE_TYPES:
        raise WireError(f"unknown message type {header.get('type')!r}")
    step = header.get("step", 0)
    if not 0 <= step < 2**63:
        raise WireError(f"step {step} is out of range")
    tensor = None
    if "dtype" in header:
        tensor = _tensor(header, payload, limits)
    elif len(payload):
        raise WireError(f"{len(payload)} payload bytes arrived without a tensor header")
    fields = {k: v for k, v in header.items() if k not in _HEADER_KEYS}
    return Message(
        header["type"], header.get("session", b""), step, fields, tensor, bytes(payload) if tensor is not None else b""
    )


def _unpack_header(raw: memoryview, limits: Limits) -> dict:
    try:
        header = msgpack.unpackb(
            raw,
            raw=False,
            strict_map_key=True,
            max_str_len=limits.max_header_bytes,
            max_bin_len=limits.max_header_bytes,
            max_array_len=1024,
            max_map_len=64,
            max_ext_len=0,
        )
    except (ValueError, msgpack.UnpackException, TypeError) as exc:
        raise WireError(f"header is not valid msgpack: {exc}") from None
    if not isinstance(header, dict):
        raise WireError(f"header must be a map, got {type(header).__name__}")
    return header


def _tensor(header: dict, payload: memoryview, limits: Limits) -> torch.Tensor:
    dtype = DTYPES.get(header["dtype"])
    if dtype is None:
        raise WireError(f"dtype {header['dtype']!r} is not allowed; allowed: {', '.join(DTYPES)}", "bad_tensor")
    shape = header.get("shape")
    if shape is None or not 1 <= len(shape) <= limits.max_ndim:
        raise WireError(f"shape must have 1 to {limits.max_ndim} dimensions, got {shape!r}", "bad_tensor")
    if not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in shape):
        raise WireError(f"shape {shape} must hold positive integers", "bad_tensor")
    elements = 1
    for d in shape:
        elements *= d
        if elements > limits.max_elements:
            raise WireError(f"shape {shape} exceeds the limit of {limits.max_elements} elements", "too_large")
    itemsize = dtype.itemsize
    if header.get("nbytes") != elements * itemsize or len(payload) != elements * itemsize:
        raise WireError(
            f"shape {shape} of {header['dtype']} needs {elements * itemsize} bytes, "
            f"header says {header.get('nbytes')} and {len(payload)} arrived",
            "bad_tensor",
        )
    return torch.frombuffer(bytearray(payload), dtype=dtype).view(shape)  # a copy the receiver owns


def error_message(code: str, text: str, session: bytes = b"", step: int = 0) -> Message:
    """An error frame: a machine-readable code and a sentence saying what happened and what to do."""
    return Message(ERROR, session, step, {"code": code, "message": text})


async def read_stream_frame(reader: asyncio.StreamReader, limits: Limits = DEFAULT_LIMITS) -> bytes:
    """Read one `u32 length | bytes` frame from a byte stream, refusing lengths above the limit first."""
    (length,) = _U32.unpack(await reader.readexactly(_U32.size))
    if length > limits.max_frame_bytes:
        raise StreamDesync(f"frame of {length} bytes exceeds the limit of {limits.max_frame_bytes}; closing", "too_large")
    return await reader.readexactly(length)


def stream_frame(data: bytes) -> bytes:
    """`data` prefixed with its u32 length, for a byte stream."""
    return _U32.pack(len(data)) + data
