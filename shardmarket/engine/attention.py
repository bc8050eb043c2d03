"""The stage's attention: transformers' SDPA per session over its own KV cache, with explicit causal masks.

Registered in transformers' AttentionInterface as `shardmarket`; the decoder layers call it with the
per-session key/value lists that StepCache.update returns.
"""

from __future__ import annotations

import torch
from transformers import AttentionInterface
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.models.gemma2.modeling_gemma2 import eager_attention_forward

from shardmarket.engine.architecture import ATTENTION


def causal_mask(start: int, steps: int, length: int, window: int | None, device: torch.device) -> torch.Tensor | None:
    """Boolean mask [1, 1, steps, length] for queries at positions start..start+steps-1; None when plain causal works."""
    if start == 0 and steps == length and (window is None or window >= length):
        return None  # SDPA's is_causal is exact here
    return allowed_keys(start, steps, length, window, device)


def allowed_keys(start: int, steps: int, length: int, window: int | None, device: torch.device) -> torch.Tensor:
    """Boolean mask [1, 1, steps, length]: which keys each query at positions start..start+steps-1 sees."""
    query = torch.arange(start, start + steps, device=device)[:, None]
    key = torch.arange(length, device=device)[None, :]
    allowed = key <= query
    if window is not None:
        allowed &= key > query - window
    return allowed[None, None]


def softcapped_attention(module, query, key, value, allowed: torch.Tensor | None, dropout, scaling, softcap):
    """Gemma 2's eager attention, whose scores are soft-capped (SDPA cannot); `allowed` becomes its additive mask."""
    mask = None
    if allowed is not None:
        mask = torch.zeros(allowed.shape, dtype=query.dtype, device=query.device)
        mask.masked_fill_(~allowed, torch.finfo(query.dtype).min)
    return eager_attention_forward(module, query, key, value, mask, dropout, scaling, softcap)


def stage_attention(module, query, key, value, attention_mask, dropout=0.0, scaling=None, sliding_window=None, **kwargs):
    """Attention for a batch whose rows are different sessions; `key`/`value` are lists of per-row caches."""
    softcap = kwargs.pop("softcap", None)
    if isinstance(key, torch.Tensor):  # a plain forward without StepCache
        if softcap is not None:
            return eager_attention_forward(module, query, key, value, attention_mask, dropout, scaling, softcap)
        return sdpa_attention_forward(module, query, key, value, attention_mask, dropout, scaling, **kwargs)
    steps = query.shape[2]
    outputs = []
    for row, (row_key, row_value) in enumerate(zip(key, value, strict=True)):
        length = row_key.shape[2]
        start = length - steps
        if steps == 1 and sliding_window is not None and length > sliding_window:
            k, v = row_key[:, :, length - sliding_window :], row_value[:, :, length - sliding_window :]
            mask = None
        else:
            k, v = row_key, row_value
            mask = causal_mask(start, steps, length, sliding_window, query.device)
        if softcap is not None:
            if mask is None and steps > 1:
                mask = allowed_keys(start, steps, length, None, query.device)
            out, _ = softcapped_attention(module, query[row : row + 1], k, v, mask, dropout, scaling, softcap)
        else:
            out, _ = sdpa_attention_forward(module, query[row : row + 1], k, v, mask, dropout, scaling, **kwargs)
        outputs.append(out)
    return (outputs[0] if len(outputs) == 1 else torch.cat(outputs)), None


AttentionInterface.register(ATTENTION, stage_attention)
