"""Result commitments on the wire: a node signs (request id, step, input hash, output hash) for every step."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from shardmarket.chain.deployments import read_deployments
from shardmarket.chain.eip712 import Commitment, Domain, InvalidSignature, is_commitment_signer, sign_commitment, tensor_hash

ZERO_ADDRESS = "0x" + "00" * 20


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
        return {"input_hash": c.input_hash, "output_hash": c.output_hash, "signature": self.signature}


def commit(private_key, request_id: bytes, step: int, input_hash: bytes, output_bytes: bytes, domain: Domain) -> SignedCommitment:
    """Hash the output as it travels and sign the commitment with the node's operator key (a `signing_key`)."""
    commitment = Commitment(request_id, step, input_hash, tensor_hash(output_bytes))
    return SignedCommitment(commitment, sign_commitment(private_key, commitment, domain))


class CommitmentError(ValueError):
    """A result whose commitment does not match what was sent and received, or was signed by someone else."""


def check_commitment(
    fields: dict, request_id: bytes, step: int, input_hash: bytes, output_bytes: bytes, operator: str, domain: Domain
) -> SignedCommitment:
    """Check a result frame's commitment against the hash of the input sent (`tensor_hash`, computed while the node
    works), the bytes received and the node's operator address."""
    signature = fields.get("signature")
    if not isinstance(signature, bytes):
        raise CommitmentError(f"step {step}: commitment signature is invalid: expected bytes, got {type(signature).__name__}")
    commitment = Commitment(request_id, step, input_hash, tensor_hash(output_bytes))
    if fields.get("input_hash") != commitment.input_hash or fields.get("output_hash") != commitment.output_hash:
        raise CommitmentError(f"step {step}: the node committed to hashes that differ from the tensors exchanged")
    try:
        signed_by_operator = is_commitment_signer(commitment, signature, domain, operator)
    except (InvalidSignature, TypeError) as exc:
        raise CommitmentError(f"step {step}: commitment signature is invalid: {exc}") from None
    if not signed_by_operator:
        raise CommitmentError(f"step {step}: commitment not signed by the node's operator {operator}")
    return SignedCommitment(commitment, signature)
