"""A node that misbehaves on purpose, for tests of clients and verifiers and the demo's cheating node: a subclass of
the honest service, so the honest hot path carries no fault checks."""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from shardmarket.chain.commitment import commit
from shardmarket.chain.eip712 import signing_key
from shardmarket.engine.tensors import tensor_bytes
from shardmarket.net.wire import Message
from shardmarket.server.service import NodeService, _Answer, _Session

FORGED_FROM_STEP = 3  # Fault.forge_commitments: the first steps pass, so the client has already routed through the node
FORGING_KEY = bytes(range(1, 33))


@dataclass(frozen=True)
class Fault:
    """What to do wrong: `wrong_shape` drops the last hidden unit of every answer, `noise` adds Gaussian noise of that
    scale to every answer, `equivocate` answers a retried step with a different output (the same context: slashable),
    `forge_commitments` signs the commitments of a session's steps from `FORGED_FROM_STEP` on with a key that is not
    the operator's."""

    wrong_shape: bool = False
    noise: float = 0.0
    equivocate: bool = False
    forge_commitments: bool = False

    def __bool__(self) -> bool:
        return self != Fault()


class FaultyService(NodeService):
    """The node service with `fault` applied to its answers and commitments."""

    def __init__(self, *args, fault: Fault, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.fault = fault

    async def _run(self, session: _Session, message: Message) -> _Answer:
        answer = await super()._run(session, message)
        output = answer.output
        if self.fault.wrong_shape:
            output = output[..., :-1]
        if self.fault.noise:
            output = output + self.fault.noise * torch.randn_like(output)
        if output is not answer.output:
            answer.output = output.contiguous()
            answer.payload = tensor_bytes(answer.output)
        return answer

    def _cached(self, session: _Session, message: Message) -> _Answer | None:
        answer = super()._cached(session, message)
        if answer is None or not self.fault.equivocate:
            return answer
        output = (answer.output + 1e-2).contiguous()
        return replace(answer, output=output, payload=tensor_bytes(output), signed=None, credit=None)

    def _commitment(self, answer: _Answer) -> Message:
        if self.fault.forge_commitments and answer.step >= FORGED_FROM_STEP and answer.signed is None:
            answer.signed = commit(signing_key(FORGING_KEY), answer.context, answer.payload, self.domain)
        return super()._commitment(answer)
