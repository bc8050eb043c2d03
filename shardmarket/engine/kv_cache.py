"""Per-session KV caches, and the cache object a forward pass over one or more sessions hands to the layers."""

from __future__ import annotations

import time

import torch


class SessionCache:
    """Keys and values of one session for every layer of a stage, preallocated up to `max_length` positions."""

    def __init__(self, session_id: str, shapes: list[tuple[int, int, torch.device]], max_length: int, dtype: torch.dtype):
        self.session_id = session_id
        self.max_length = max_length
        self.length = 0
        self.last_used = time.monotonic()
        # torch.empty reserves address space; pages are only committed as positions are written (on CPU).
        # Inference tensors, like the forward passes that write them, whatever mode the caller is in.
        with torch.inference_mode():
            self.keys = [torch.empty(1, heads, max_length, dim, dtype=dtype, device=dev) for heads, dim, dev in shapes]
            self.values = [torch.empty(1, heads, max_length, dim, dtype=dtype, device=dev) for heads, dim, dev in shapes]

    @staticmethod
    def nbytes(shapes: list[tuple[int, int, torch.device]], max_length: int, dtype: torch.dtype) -> int:
        """Bytes that a session of `max_length` positions reserves."""
        item = torch.empty((), dtype=dtype).element_size()
        return sum(2 * heads * dim * max_length * item for heads, dim, _ in shapes)


class StepCache:
    """The `cache=` of one forward pass: writes the new keys/values of each session at its start position.

    `update` returns lists of per-session views (one per batch row) that shardmarket.engine.attention consumes.
    """

    def __init__(self, sessions: list[SessionCache], starts: list[int]):
        self.sessions = sessions
        self.starts = starts

    def update(self, key: torch.Tensor, value: torch.Tensor, layer_idx: int, *args, **kwargs):
        """Store key/value [B, kv_heads, T, head_dim] and return the keys/values seen by each row."""
        steps = key.shape[2]
        keys, values = [], []
        for row, (session, start) in enumerate(zip(self.sessions, self.starts, strict=True)):
            end = start + steps
            k_buf, v_buf = session.keys[layer_idx], session.values[layer_idx]
            k_buf[:, :, start:end] = key[row : row + 1]
            v_buf[:, :, start:end] = value[row : row + 1]
            keys.append(k_buf[:, :, :end])
            values.append(v_buf[:, :, :end])
        return keys, values
