"""The client's part of a model: tokenizer and chat template, embeddings, final norm, LM head."""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from transformers import AutoConfig, AutoTokenizer

from shardmarket.engine.architecture import family_of
from shardmarket.engine.errors import EngineError, ShapeError
from shardmarket.engine.weights import read_tensors, tensor_index

EMBED, NORM, LM_HEAD = "model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"


class Head:
    """Embeds token ids and turns the last layer's hidden states into logits."""

    def __init__(
        self,
        config,
        tokenizer,
        embed_weight: torch.Tensor,
        norm: torch.nn.Module,
        lm_head_weight: torch.Tensor,
        embed_scale: float | None = None,
    ):
        self.config = config
        self.tokenizer = tokenizer
        self.num_layers = config.num_hidden_layers
        self.hidden_size = config.hidden_size
        self.dtype = embed_weight.dtype
        self.embed_weight = embed_weight
        self.norm = norm
        self.lm_head_weight = lm_head_weight
        self.embed_scale = embed_scale  # Gemma multiplies its embeddings by sqrt(hidden_size)
        self.logit_softcap = getattr(config, "final_logit_softcapping", None)  # Gemma 2: logits = c * tanh(logits / c)
        eos = config.eos_token_id if config.eos_token_id is not None else tokenizer.eos_token_id
        self.eos_token_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [])

    @classmethod
    def load(cls, checkpoint: Path, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu") -> Head:
        """Read the embeddings, final norm and LM head (the embeddings again when they are tied) and the tokenizer."""
        checkpoint = Path(checkpoint)
        if not (checkpoint / "config.json").exists():
            raise EngineError(f"{checkpoint} has no config.json; give a Hugging Face checkpoint folder")
        config = AutoConfig.from_pretrained(checkpoint)
        family = family_of(config)
        index = tensor_index(checkpoint)
        tied = getattr(config, "tie_word_embeddings", False) or LM_HEAD not in index
        tensors = read_tensors(index, [EMBED, NORM] + ([] if tied else [LM_HEAD]))
        tensors = {name: t.to(device=device, dtype=dtype) for name, t in tensors.items()}
        norm = family.rms_norm(config.hidden_size, eps=config.rms_norm_eps)
        norm.weight = torch.nn.Parameter(tensors[NORM], requires_grad=False)
        embed = tensors[EMBED]
        tokenizer = AutoTokenizer.from_pretrained(checkpoint)
        scale = config.hidden_size**0.5 if family.scales_embeddings else None
        return cls(config, tokenizer, embed, norm.to(device), embed if tied else tensors[LM_HEAD], scale)

    @torch.no_grad()
    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Token ids [1, T] -> hidden states [1, T, H]."""
        if (
            not isinstance(input_ids, torch.Tensor)
            or input_ids.dtype != torch.int64
            or input_ids.dim() != 2
            or input_ids.shape[0] != 1
        ):
            raise ShapeError("input ids must be an int64 tensor [1, T]")
        vocab = self.embed_weight.shape[0]
        if input_ids.numel() and (int(input_ids.min()) < 0 or int(input_ids.max()) >= vocab):
            raise ShapeError(f"token ids must be within 0..{vocab - 1}")
        hidden = F.embedding(input_ids.to(self.embed_weight.device), self.embed_weight)
        # in the embeddings' dtype, as transformers does: sqrt(3072) is 55.5 in bfloat16
        return hidden if self.embed_scale is None else hidden * torch.tensor(self.embed_scale, dtype=hidden.dtype)

    @torch.no_grad()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Hidden states [1, T, H] of the last layer -> logits [1, T, vocab] (final norm, then LM head)."""
        if hidden.dim() != 3 or hidden.shape[-1] != self.hidden_size:
            raise ShapeError(f"hidden states must be [1, T, {self.hidden_size}], got {tuple(hidden.shape)}")
        hidden = hidden.to(device=self.embed_weight.device, dtype=self.dtype)
        logits = F.linear(self.norm(hidden), self.lm_head_weight)
        if self.logit_softcap is not None:
            logits = torch.tanh(logits / self.logit_softcap) * self.logit_softcap
        return logits
