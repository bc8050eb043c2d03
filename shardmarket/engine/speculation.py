"""Speculative decoding on the client: a drafter proposes the next tokens, one pass through the layers scores them all,
and the longest prefix the model agrees with is kept (then one token of the model's own), so each pass through the
route yields one token or more. The kept tokens are distributed exactly as without speculation: greedy keeps a draft
token only when it is the argmax, sampling uses the speculative sampling rule (Leviathan et al. 2023, Chen et al.
2023): accept draft token t with probability min(1, p(t)/q(t)), on rejection draw from max(p - q, 0) renormalised."""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol

import torch

from shardmarket.engine.errors import EngineError

if TYPE_CHECKING:
    from shardmarket.engine.head import Head
    from shardmarket.engine.sampling import SamplingParams
    from shardmarket.engine.stage import Stage


@dataclass(frozen=True)
class Draft:
    """Proposed next tokens and, per token, the distribution over the vocabulary it was drawn from ([len, vocab]); None
    when the drafter chose them deterministically (prompt lookup): each is then a point mass."""

    tokens: list[int] = field(default_factory=list)
    probs: torch.Tensor | None = None


class Drafter(Protocol):
    """Proposes up to `k` tokens to follow `tokens` (the prompt and every token kept so far), with the distributions it
    drew them from when it sampled; `close` frees what it holds once the request is over."""

    def propose(self, tokens: Sequence[int], k: int) -> Draft: ...

    def close(self) -> None: ...


class PromptLookup:
    """Drafts by prompt lookup: the tokens that followed the latest earlier occurrence of the context's last n tokens
    (the longest n from `max_ngram` down to `min_ngram` that occurred before). Free to compute, and good wherever the
    answer repeats its input: rewriting, summarising, editing code, quoting."""

    def __init__(self, max_ngram: int = 4, min_ngram: int = 3) -> None:
        if not 1 <= min_ngram <= max_ngram:
            raise EngineError(f"n-gram sizes must satisfy 1 <= min_ngram <= max_ngram, got {min_ngram}, {max_ngram}")
        self.max_ngram, self.min_ngram = max_ngram, min_ngram
        self._seen: dict[tuple[int, ...], int] = {}  # an n-gram -> where the token after its latest occurrence is
        self._indexed = 0  # tokens[:_indexed] are in `_seen` (each as the token following an n-gram)
        self._context: list[int] = []

    def propose(self, tokens: Sequence[int], k: int) -> Draft:
        if len(tokens) < len(self._context) or list(tokens[: len(self._context)]) != self._context[: len(tokens)]:
            self._seen, self._indexed, self._context = {}, 0, []  # another context: index it afresh
        self._context = list(tokens)
        # index every n-gram that has a token after it (the last token has none yet)
        for end in range(max(self._indexed, 1), len(tokens)):
            for n in range(self.min_ngram, self.max_ngram + 1):
                if end >= n:
                    self._seen[tuple(tokens[end - n : end])] = end
        self._indexed = max(self._indexed, len(tokens))
        if k < 1:
            return Draft()
        for n in range(min(self.max_ngram, len(tokens)), self.min_ngram - 1, -1):
            found = self._seen.get(tuple(tokens[len(tokens) - n :]))
            if found is not None:
                return Draft(list(tokens[found : found + k]))
        return Draft()

    def close(self) -> None:
        pass


class ModelDrafter:
    """Drafts with a small model the client runs itself (sharing the target's vocabulary): each draft token is its argmax
    at `temperature` 0 (a point mass), else drawn from its softmax at `temperature`, whose rows come with the draft. Its
    KV cache keeps the tokens it has seen and is cut back where the kept tokens part from its drafts."""

    def __init__(self, head: Head, stage: Stage, *, max_length: int, temperature: float = 0.0, seed: int | None = None):
        if head.num_layers != stage.end - stage.start or stage.start != 0:
            raise EngineError("a draft model runs every layer of its model in one stage")
        self.head, self.stage, self.temperature = head, stage, temperature
        self.generator = torch.Generator().manual_seed(seed if seed is not None else torch.seed())
        self.session = f"draft-{uuid.uuid4().hex}"
        stage.open_session(self.session, max_length)
        self._cached: list[int] = []  # the tokens whose keys and values the draft model's cache holds

    def propose(self, tokens: Sequence[int], k: int) -> Draft:
        if k < 1:
            return Draft()
        common = 0
        limit = min(len(self._cached), len(tokens) - 1)  # the last token is always fed: its output drafts the first
        while common < limit and self._cached[common] == tokens[common]:
            common += 1
        hidden = self._run(list(tokens[common:]), common)
        self._cached = list(tokens)
        drafted: list[int] = []
        rows: list[torch.Tensor] = []
        for _ in range(k):
            logits = self.head.logits(hidden[:, -1:])[0, -1]
            if self.temperature == 0:
                token = int(torch.argmax(logits))
            else:
                probs = torch.softmax(logits.float() / self.temperature, dim=-1)
                token = int(torch.multinomial(probs, 1, generator=self.generator))
                rows.append(probs)
            drafted.append(token)
            if len(drafted) < k:
                hidden = self._run([token], len(self._cached))
                self._cached.append(token)
        return Draft(drafted, torch.stack(rows) if rows else None)

    def _run(self, ids: list[int], start: int) -> torch.Tensor:
        positions = torch.arange(start, start + len(ids))[None]
        with torch.inference_mode():
            return self.stage.step(self.session, self.head.embed(torch.tensor([ids])), positions)

    def close(self) -> None:
        self.stage.close_session(self.session)


@dataclass
class SpeculationStats:
    """What speculation did for one request."""

    passes: int = 0  # decode passes through the layers
    drafted: int = 0  # draft tokens sent with them
    accepted: int = 0  # draft tokens kept

    @property
    def acceptance_rate(self) -> float:
        return self.accepted / self.drafted if self.drafted else 0.0

    def as_dict(self) -> dict:
        return {"passes": self.passes, "drafted_tokens": self.drafted, "accepted_draft_tokens": self.accepted}


class Speculator:
    """One request's speculation: its drafter, how long a draft to ask for, and the counts. The draft length grows while
    drafts are kept and shrinks to what was kept; while drafts keep failing it stops drafting, then tries a short draft
    again after a pause that doubles with every failed try, so that a workload drafts cannot help pays almost nothing."""

    def __init__(self, drafter: Drafter, max_draft: int = 8, min_rate: float = 0.3) -> None:
        if max_draft < 1:
            raise EngineError(f"max_draft must be at least 1, got {max_draft}")
        self.drafter, self.max_draft, self.min_rate = drafter, max_draft, min_rate
        self.stats = SpeculationStats()
        # a request starts with short drafts and pauses after two that fail: a free-form answer pays for few of them
        self.length = min(2, max_draft)
        self._rate = 0.5  # moving average of the kept fraction of recent drafts
        self._pause, self._paused = 0, 0  # passes to skip drafting after a failed try, and how many skipped so far

    def propose(self, tokens: Sequence[int], room: int) -> Draft:
        """A draft for the next pass, of at most `room` tokens (those the request still has use for)."""
        if self._paused < self._pause:
            self._paused += 1
            return Draft()
        draft = self.drafter.propose(tokens, min(self.length, room))
        if len(draft.tokens) > room or (draft.probs is not None and draft.probs.shape[0] != len(draft.tokens)):
            raise EngineError("the drafter returned a longer draft than asked for, or one probability row per token")
        return draft

    def update(self, drafted: int, accepted: int) -> None:
        """Count one pass that carried `drafted` draft tokens, `accepted` of them kept."""
        self.stats.passes += 1
        if not drafted:
            return
        self.stats.drafted += drafted
        self.stats.accepted += accepted
        self._rate = 0.7 * self._rate + 0.3 * accepted / drafted
        self.length = min(self.max_draft, self.length + 2) if accepted == drafted else max(1, accepted + 1)
        if self._rate >= self.min_rate:
            self._pause = self._paused = 0
        else:  # try again later, and later still if that fails too
            self._pause, self._paused = min(2 * self._pause or 4, 256), 0
            self._rate = self.min_rate  # one good try is enough to resume


def target_probs(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """The distribution `pick_token` samples from (temperature > 0): softmax at the temperature, cut to top_p."""
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
        probs = probs.clone()
        probs[order[outside]] = 0
        probs /= probs.sum()
    return probs


def verify(logits: torch.Tensor, draft: Draft, params: SamplingParams, generator: torch.Generator | None, pick) -> list[int]:
    """The tokens one pass yields: `logits` [len(draft) + 1, vocab] are the model's after the last kept token and after
    each draft token. Returns the kept prefix of the draft, then the model's own token where it was rejected (or after
    the whole draft, picked by `pick(logits row)`)."""
    kept: list[int] = []
    for i, token in enumerate(draft.tokens):
        if params.temperature == 0:
            best = int(torch.argmax(logits[i]))
            if best != token:
                return [*kept, best]
            kept.append(token)
            continue
        p = target_probs(logits[i], params)
        q = None if draft.probs is None else draft.probs[i].float()
        drafted_p = 1.0 if q is None else float(q[token])
        if drafted_p > 0 and float(torch.rand((), generator=generator)) * drafted_p < float(p[token]):
            kept.append(token)
            continue
        if q is None:  # a point mass: p without the rejected token
            residual = p.clone()
            residual[token] = 0
        else:
            residual = (p - q).clamp_min(0)
        if float(residual.sum()) <= 0:  # only when p equals q up to rounding: then p itself is right
            residual = p
        return [*kept, int(torch.multinomial(residual, 1, generator=generator))]
    return [*kept, pick(logits[len(draft.tokens)])]
