"""Result commitments on the wire: for every step a node signs everything the output depends on (its StepContext),
the output's hash and when it signed; the client rebuilds the context from what it sent and checks the signature."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from shardmarket.chain.deployments import read_deployments
from shardmarket.chain.eip712 import (
    Commitment,
    Domain,
    InvalidSignature,
    StepContext,
    is_commitment_signer,
    sign_commitment,
    tensor_hash,
)

ZERO_ADDRESS = "0x" + "00" * 20
# How far back a node may date a commitment: its challenge window runs from `issued_at`, so a client refuses one
# dated earlier (a node would shorten the time it can be challenged); clocks ahead only lengthen it.
MAX_BACKDATING_S = 600


def commitment_domain(chain_id: int, deployments_dir: Path) -> Domain:
    """The EIP-712 domain of commitments: chain `chain_id` and its DisputeManager (the zero address before a deployment)."""
    try:
        verifier = read_deployments(chain_id, deployments_dir).get("DisputeManager", ZERO_ADDRESS)
    except (FileNotFoundError, KeyError, ValueError):
        verifier = ZERO_ADDRESS
    return Domain(chain_id, verifier)


@dataclass(frozen=True)
class SignedCommitment:
    """A commitment and its 65-byte signature, as it rides in a result frame."""

    commitment: Commitment
    signature: bytes

    def to_fields(self) -> dict:
        c = self.commitment
        return {
            "history_hash": c.context.history_hash,
            "input_hash": c.context.input_hash,
            "output_hash": c.output_hash,
            "issued_at": c.issued_at,
            "signature": self.signature,
        }


def commit(private_key, context: StepContext, output_bytes: bytes, domain: Domain) -> SignedCommitment:
    """Hash the output as it travels and sign its commitment, dated now, with the node's operator key (a `signing_key`)."""
    commitment = Commitment(context, tensor_hash(output_bytes), int(time.time()))
    return SignedCommitment(commitment, sign_commitment(private_key, commitment, domain))


class CommitmentError(ValueError):
    """A result whose commitment does not match what was sent and received, or was signed by someone else."""


def check_commitment(
    fields: dict, context: StepContext, output_bytes: bytes, operator: str, domain: Domain, now: float | None = None
) -> SignedCommitment:
    """Check a result frame's commitment against the step's context as the client sent it (its session, position,
    history and input hash), the bytes received and the node's operator address; it must not be dated more than
    MAX_BACKDATING_S before `now` (default: this machine's clock)."""
    step = context.step
    signature, issued_at = fields.get("signature"), fields.get("issued_at")
    if not isinstance(signature, bytes):
        raise CommitmentError(f"step {step}: commitment signature is invalid: expected bytes, got {type(signature).__name__}")
    if not isinstance(issued_at, int) or isinstance(issued_at, bool) or issued_at < 0:
        raise CommitmentError(f"step {step}: commitment carries no valid issued_at (got {issued_at!r})")
    oldest = (time.time() if now is None else now) - MAX_BACKDATING_S
    if issued_at < oldest:
        raise CommitmentError(
            f"step {step}: commitment dated {oldest - issued_at + MAX_BACKDATING_S:.0f} s ago, more than {MAX_BACKDATING_S} s: "
            "the node backdates it (or one of the two clocks is wrong)"
        )
    try:
        commitment = Commitment(context, tensor_hash(output_bytes), issued_at)
    except ValueError as exc:
        raise CommitmentError(f"step {step}: commitment is invalid: {exc}") from None
    if (fields.get("history_hash"), fields.get("input_hash"), fields.get("output_hash")) != (
        context.history_hash,
        context.input_hash,
        commitment.output_hash,
    ):
        raise CommitmentError(f"step {step}: the node committed to a history or tensors that differ from those exchanged")
    try:
        signed_by_operator = is_commitment_signer(commitment, signature, domain, operator)
    except (InvalidSignature, TypeError) as exc:
        raise CommitmentError(f"step {step}: commitment signature is invalid: {exc}") from None
    if not signed_by_operator:
        raise CommitmentError(
            f"step {step}: commitment not signed by the node's operator {operator} for this session, slice and step"
        )
    return SignedCommitment(commitment, signature)
