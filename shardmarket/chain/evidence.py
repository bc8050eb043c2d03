"""Dispute evidence: every input a node accepted in one session up to the challenged step, its positions, the node's
signed commitment at that step and its answer there, as one safetensors file added to IPFS (the dispute names its
CID). The commitment's history hash binds the earlier inputs, so verifiers check every hash and the signature
before re-running anything; nothing is unpickled."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from urllib.parse import parse_qs, quote, urlsplit

import torch
from safetensors import SafetensorError
from safetensors.torch import load as load_tensors
from safetensors.torch import save as save_tensors

from shardmarket.chain.commitment import SignedCommitment
from shardmarket.chain.eip712 import (
    EMPTY_HISTORY,
    Commitment,
    Domain,
    InvalidSignature,
    StepContext,
    chain_history,
    chain_rollback,
    recover_commitment_signer,
    tensor_hash,
)
from shardmarket.engine.tensors import tensor_bytes
from shardmarket.ipfs.blockstore import Blockstore, BlockstoreError
from shardmarket.ipfs.cids import parse
from shardmarket.ipfs.fetch import fetch_dag
from shardmarket.ipfs.model import SHARD_OPTIONS
from shardmarket.ipfs.unixfs import import_bytes, iter_file

MAX_EVIDENCE_BYTES = 256 * 2**20
MAX_GATEWAY_HINTS = 4  # gateways a dispute's evidence reference may name
PREFIX = "ipfs://"
METADATA_KEY = "shardmarket.evidence"  # the safetensors metadata key holding everything but the tensors
_HEX_FIELDS = ("model_id", "request_id", "session_nonce", "history_hash", "input_hash")


class EvidenceError(ValueError):
    """Evidence that is missing, malformed or does not match the accused node's signature."""


@dataclass
class Evidence:
    """One hop's session up to the challenged step (the last one)."""

    positions: list[int]
    inputs: list[torch.Tensor]  # [1, T, H] per step, exactly as sent
    challenged: SignedCommitment  # the accused node's commitment at the last step
    output: torch.Tensor  # the accused node's answer at the last step

    @property
    def context(self) -> StepContext:
        return self.challenged.commitment.context

    def encode(self) -> bytes:
        """safetensors bytes; the same evidence always gives the same bytes, so the same CID (safetensors writes
        its metadata keys in no fixed order, so everything but the tensors goes in one key, as sorted JSON)."""
        tensors = {f"input.{i}": t.contiguous() for i, t in enumerate(self.inputs)} | {"output": self.output.contiguous()}
        c = self.challenged.commitment
        context = {name: getattr(c.context, name) for name in StepContext.__dataclass_fields__}
        meta = {
            "positions": self.positions,
            "context": {k: v.hex() if isinstance(v, bytes) else v for k, v in context.items()},
            "output_hash": c.output_hash.hex(),
            "issued_at": c.issued_at,
            "signature": self.challenged.signature.hex(),
        }
        return save_tensors(tensors, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})

    @classmethod
    def decode(cls, data: bytes) -> Evidence:
        try:
            tensors = load_tensors(data)
            header_len = int.from_bytes(data[:8], "little")
            meta = json.loads(json.loads(data[8 : 8 + header_len])["__metadata__"][METADATA_KEY])
            fields: dict = {k: bytes.fromhex(v) if k in _HEX_FIELDS else v for k, v in meta["context"].items()}
            commitment = Commitment(StepContext(**fields), bytes.fromhex(meta["output_hash"]), meta["issued_at"])
            positions = meta["positions"]
            inputs = [tensors[f"input.{i}"] for i in range(len(positions))]
            return cls(positions, inputs, SignedCommitment(commitment, bytes.fromhex(meta["signature"])), tensors["output"])
        except (KeyError, ValueError, TypeError, AttributeError, SafetensorError) as exc:
            raise EvidenceError(f"malformed evidence: {exc}") from None

    def check(self, accused: str, domain: Domain) -> None:
        """The inputs are the session's up to the challenged step (positions, history hash and input hash as committed),
        the answer is the committed output, and `accused` signed it; raises EvidenceError otherwise. A step may start
        before the previous one ended (a rollback, as the node accepts one): the history hash binds where."""
        context = self.context
        if len(self.inputs) != context.step + 1 or len(self.positions) != len(self.inputs):
            raise EvidenceError(f"evidence for step {context.step} needs {context.step + 1} inputs and positions")
        position, last_start, history = 0, -1, EMPTY_HISTORY
        for step, (tensor, at) in enumerate(zip(self.inputs, self.positions, strict=True)):
            if tensor.dim() != 3 or not isinstance(at, int) or not last_start < at <= position:
                raise EvidenceError(f"input {step} is not a [1, T, H] tensor at a position within {last_start + 1}..{position}")
            if at < position:
                history = chain_rollback(history, at)
            if step == context.step:
                if at != context.position or history != context.history_hash:
                    raise EvidenceError("the earlier inputs are not the ones the node committed to (position or history)")
                if tensor_hash(tensor_bytes(tensor)) != context.input_hash:
                    raise EvidenceError("the challenged input is not what the node committed to")
            else:
                history = chain_history(history, tensor_hash(tensor_bytes(tensor)))
            last_start, position = at, at + tensor.shape[1]
        if tensor_hash(tensor_bytes(self.output)) != self.challenged.commitment.output_hash:
            raise EvidenceError("the answer is not what the node committed to")
        try:
            signer = recover_commitment_signer(self.challenged.commitment, self.challenged.signature, domain)
        except InvalidSignature as exc:
            raise EvidenceError(f"the commitment's signature is invalid: {exc}") from None
        if signer.lower() != accused.lower():
            raise EvidenceError(f"the commitment was not signed by the accused node {accused}")


def publish(evidence: Evidence, store: Blockstore, gateways: Sequence[str] = ()) -> str:
    """Add the evidence to the block store; returns the string a dispute carries: `ipfs://CID`, followed by
    `?gateway=URL&...` naming where verifiers on other machines can fetch it (the blocks are checked against the
    CID, so a gateway needs no trust)."""
    entry = import_bytes(evidence.encode(), SHARD_OPTIONS, store)
    store.pin(entry.cid)
    hints = "&".join(f"gateway={quote(url, safe='')}" for url in gateways[:MAX_GATEWAY_HINTS])
    return PREFIX + entry.cid_str + (f"?{hints}" if hints else "")


def gateway_hints(reference: str) -> list[str]:
    """The http(s) gateways an evidence reference names (at most MAX_GATEWAY_HINTS; anything else is ignored)."""
    query = reference.partition("?")[2]
    urls = [
        url for url in parse_qs(query).get("gateway", []) if urlsplit(url).scheme in ("http", "https") and urlsplit(url).netloc
    ]
    return urls[:MAX_GATEWAY_HINTS]


def fetch(reference: str, store: Blockstore, gateways: Sequence[str] = ()) -> Evidence:
    """Read evidence named `ipfs://CID[?gateway=URL...]` from the local store, else from the gateways configured
    and those the reference names, verified block by block."""
    if not reference.startswith(PREFIX):
        raise EvidenceError(f"evidence {reference!r} is not an ipfs:// reference")
    try:
        cid = bytes(parse(reference[len(PREFIX) :].partition("?")[0]))
    except ValueError as exc:
        raise EvidenceError(f"evidence {reference!r} names a bad CID: {exc}") from None
    try:
        return Evidence.decode(_read(store, cid))
    except BlockstoreError:
        pass
    sources = list(dict.fromkeys([*gateways, *gateway_hints(reference)]))
    if not sources:
        raise EvidenceError(
            f"evidence {reference} is not in the local store, and neither the config nor the reference names a gateway"
        )
    fetch_dag(cid, store, sources)
    return Evidence.decode(_read(store, cid))


def _read(store: Blockstore, cid: bytes) -> bytes:
    data = b""
    for piece in iter_file(store, cid):
        data += piece
        if len(data) > MAX_EVIDENCE_BYTES:
            raise EvidenceError("evidence larger than any hop's history; refusing it")
    return data


def relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    """||a - b|| / ||b||: how far two hidden states are apart, whatever their scale."""
    a, b = a.to(torch.float32), b.to(torch.float32)
    return float(torch.linalg.vector_norm(a - b) / torch.linalg.vector_norm(b).clamp_min(1e-12))
