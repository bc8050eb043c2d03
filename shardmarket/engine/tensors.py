"""A tensor's raw bytes: what travels on the wire, is hashed into commitments and stored as dispute evidence."""

from __future__ import annotations

import torch


def tensor_bytes(tensor: torch.Tensor) -> bytes:
    """The raw little-endian bytes of a tensor in C order, as they travel."""
    if tensor.dtype == torch.bfloat16:  # numpy has no bfloat16: travel as its 16-bit patterns
        tensor = tensor.contiguous().view(torch.int16)
    return tensor.numpy(force=True).tobytes()
