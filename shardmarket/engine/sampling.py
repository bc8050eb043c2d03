"""Token generation on the client: prefill in chunks, then decode token by token through any chain of layers."""

from __future__ import annotations

from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass, field
from typing import Final, Literal, TypeAlias

import torch

from shardmarket.engine.errors import EngineError
from shardmarket.engine.head import Head
from shardmarket.engine.speculation import Draft, Speculator, verify

RunLayers = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# confirm(hidden): the layers' output that stands; another tensor when the step had to be redone (see InferenceSession)
Confirm = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class SamplingParams:
    """How to pick tokens: temperature 0 is greedy; top_p keeps the smallest set of tokens reaching that mass."""

    max_tokens: int = 64
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False  # keep going past EOS (benchmarks need a fixed number of tokens)

    def check(self) -> None:
        """EngineError unless every field is in range."""
        if self.max_tokens < 1:
            raise EngineError(f"max_tokens must be at least 1, got {self.max_tokens}")
        if self.temperature < 0:
            raise EngineError(f"temperature must be >= 0, got {self.temperature}")
        if not 0 < self.top_p <= 1:
            raise EngineError(f"top_p must be in (0, 1], got {self.top_p}")


def pick_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator | None) -> int:
    """One token from logits [vocab]: argmax when greedy, else a top-p sample at the temperature."""
    if params.temperature == 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / params.temperature, dim=-1)
    if params.top_p < 1:
        sorted_probs, order = torch.sort(probs, descending=True)
        outside = torch.cumsum(sorted_probs, dim=-1) - sorted_probs >= params.top_p
        sorted_probs[outside] = 0
        return int(order[torch.multinomial(sorted_probs, 1, generator=generator)])
    return int(torch.multinomial(probs, 1, generator=generator))


def _holds_stop_prefix(text: str, stops: list[str]) -> bool:
    return any(text.endswith(stop[:k]) for stop in stops for k in range(1, len(stop)))


LAYERS: Final = "layers"
CONFIRM: Final = "confirm"
TOKEN: Final = "token"
# what generation_steps yields: the layers to run on (hidden, positions), an output to confirm, or a new token
Step: TypeAlias = (
    tuple[Literal["layers"], tuple[torch.Tensor, torch.Tensor]]
    | tuple[Literal["confirm"], torch.Tensor]
    | tuple[Literal["token"], int]
)


def _sent(output: torch.Tensor | None) -> torch.Tensor:
    """What a driver sent back for a LAYERS or CONFIRM step."""
    if output is None:
        raise EngineError("generation_steps must be sent the layers' output after a layers or confirm step")
    return output


def generation_steps(
    head: Head,
    prompt_ids: list[int],
    params: SamplingParams,
    *,
    chunk_size: int = 256,
    confirming: bool = False,
    speculator: Speculator | None = None,
) -> Generator[Step, torch.Tensor | None, None]:
    """Generation without I/O, for a driver to run (`generate`, or an async one): it yields (LAYERS, (hidden,
    positions)) and must be sent the layers' output; with `confirming`, (CONFIRM, output) once the token is picked,
    and must be sent the output that stands (another tensor when the step had to be redone: the token is then picked
    again from the same random state); and (TOKEN, id) for each new token (sent nothing). Stops on EOS (not
    yielded), a stop string (its tokens not yielded) or max_tokens. With a `speculator`, a decode step carries the last
    token and a draft after it, starting where the kept tokens end: the layers drop the positions of rejected drafts."""
    params.check()
    if not prompt_ids:
        raise EngineError("the prompt holds no token")
    generator = None
    if params.temperature > 0:
        generator = torch.Generator().manual_seed(params.seed if params.seed is not None else torch.seed())
    for begin in range(0, len(prompt_ids), chunk_size):
        ids = torch.tensor([prompt_ids[begin : begin + chunk_size]])
        positions = torch.arange(begin, begin + ids.shape[1])[None]
        hidden = _sent((yield LAYERS, (head.embed(ids), positions)))
    context = list(prompt_ids)  # the prompt and every token picked: what the drafter continues
    emitted: list[int] = []
    held: list[int] = []
    draft = Draft()
    while True:
        rows = len(draft.tokens) + 1
        state = generator.get_state() if generator is not None and confirming else None
        new = _pick(head, hidden[:, -rows:], draft, params, generator)
        if confirming and (checked := _sent((yield CONFIRM, hidden))) is not hidden:
            hidden = checked
            if generator is not None and state is not None:
                generator.set_state(state)
            new = _pick(head, hidden[:, -rows:], draft, params, generator)
        if speculator is not None and len(context) > len(prompt_ids):  # a decode pass (not the prompt's)
            speculator.update(len(draft.tokens), len(new) - 1)
        finished = False
        for token in new[: params.max_tokens - (len(context) - len(prompt_ids))]:
            context.append(token)
            if token in head.eos_token_ids and not params.ignore_eos:
                finished = True
                break
            held.append(token)
            if params.stop:
                text = head.tokenizer.decode(emitted + held)
                if any(stop in text for stop in params.stop):
                    return
                if _holds_stop_prefix(text, params.stop):
                    continue
            for held_token in held:
                yield TOKEN, held_token
            emitted += held
            held = []
        left = params.max_tokens - (len(context) - len(prompt_ids))
        if finished or left <= 0:
            break
        # a draft of more than left - 1 tokens would be wasted: the pass yields a token of its own after it
        draft = Draft() if speculator is None else speculator.propose(context, left - 1)
        ids = torch.tensor([[context[-1], *draft.tokens]])
        positions = torch.arange(len(context) - 1, len(context) + len(draft.tokens))[None]
        hidden = _sent((yield LAYERS, (head.embed(ids), positions)))
    for held_token in held:
        yield TOKEN, held_token


def _pick(head: Head, hidden: torch.Tensor, draft: Draft, params: SamplingParams, generator: torch.Generator | None) -> list[int]:
    """The tokens a pass yields from the last layer's `hidden` [1, len(draft) + 1, H]: one picked token without a draft."""
    logits = head.logits(hidden)[0]
    if not draft.tokens:
        return [pick_token(logits[-1], params, generator)]
    return verify(logits, draft, params, generator, lambda row: pick_token(row, params, generator))


def generate(
    head: Head,
    run_layers: RunLayers,
    prompt_ids: list[int],
    params: SamplingParams,
    *,
    chunk_size: int = 256,
    confirm: Confirm | None = None,
    speculator: Speculator | None = None,
) -> Iterator[int]:
    """Yield new token ids (see `generation_steps`), running the layers with `run_layers`. With `confirm`, each
    token is picked while the step that led to it is still being checked, and picked again (from the same random
    state) if `confirm` hands back another output."""
    steps = generation_steps(
        head, prompt_ids, params, chunk_size=chunk_size, confirming=confirm is not None, speculator=speculator
    )
    answer = None
    while True:
        try:
            step = steps.send(answer)
        except StopIteration:
            return
        if step[0] == LAYERS:
            answer = run_layers(*step[1])
        elif step[0] == CONFIRM:
            answer = confirm(step[1]) if confirm is not None else step[1]
        else:
            answer = None
            yield step[1]
