"""Dispute evidence: every input a node accepted for one hop up to the challenged step, its signed commitment
for each, and its answer at that step, as one safetensors file added to IPFS (the dispute names its CID).
Verifiers check every hash and signature before re-running anything; nothing is unpickled."""

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
from shardmarket.chain.eip712 import Commitment, Domain, recover_commitment_signer, tensor_hash
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


class EvidenceError(ValueError):
    """Evidence that is missing, malformed or does not match the accused node's signatures."""


@dataclass
class Evidence:
    """One hop's history up to the challenged step (the last one)."""

    model: str
    start: int
    end: int
    positions: list[int]
    inputs: list[torch.Tensor]  # [1, T, H] per step, exactly as sent
    commitments: list[SignedCommitment]  # the accused node's, per step
    output: torch.Tensor  # the accused node's answer at the last step

    @property
    def challenged(self) -> SignedCommitment:
        return self.commitments[-1]

    def encode(self) -> bytes:
        """safetensors bytes; the same evidence always gives the same bytes, so the same CID (safetensors writes
        its metadata keys in no fixed order, so everything but the tensors goes in one key, as sorted JSON)."""
        tensors = {f"input.{i}": t.contiguous() for i, t in enumerate(self.inputs)} | {"output": self.output.contiguous()}
        meta = {
            "model": self.model,
            "layers": [self.start, self.end],
            "positions": self.positions,
            "commitments": [
                [
                    c.commitment.request_id.hex(),
                    c.commitment.step,
                    c.commitment.input_hash.hex(),
                    c.commitment.output_hash.hex(),
                    c.signature.hex(),
                ]
                for c in self.commitments
            ],
        }
        return save_tensors(tensors, metadata={METADATA_KEY: json.dumps(meta, sort_keys=True)})

    @classmethod
    def decode(cls, data: bytes) -> Evidence:
        try:
            tensors = load_tensors(data)
            header_len = int.from_bytes(data[:8], "little")
            meta = json.loads(json.loads(data[8 : 8 + header_len])["__metadata__"][METADATA_KEY])
            start, end = meta["layers"]
            commitments = [
                SignedCommitment(Commitment(bytes.fromhex(r), s, bytes.fromhex(i), bytes.fromhex(o)), bytes.fromhex(sig))
                for r, s, i, o, sig in meta["commitments"]
            ]
            inputs = [tensors[f"input.{i}"] for i in range(len(commitments))]
            return cls(meta["model"], start, end, meta["positions"], inputs, commitments, tensors["output"])
        except (KeyError, ValueError, TypeError, SafetensorError) as exc:
            raise EvidenceError(f"malformed evidence: {exc}") from None

    def check(self, accused: str, domain: Domain) -> None:
        """Every input and the answer match commitments signed by `accused`; raises EvidenceError otherwise."""
        if not self.commitments or len(self.inputs) != len(self.commitments) or len(self.positions) != len(self.inputs):
            raise EvidenceError("evidence needs one input, position and commitment per step")
        for step, (tensor, signed) in enumerate(zip(self.inputs, self.commitments, strict=True)):
            c = signed.commitment
            if c.step != step or c.request_id != self.challenged.commitment.request_id:
                raise EvidenceError(f"commitment {step} is for another request or step")
            if tensor_hash(tensor_bytes(tensor)) != c.input_hash:
                raise EvidenceError(f"input {step} is not what the node committed to")
            if recover_commitment_signer(c, signed.signature, domain).lower() != accused.lower():
                raise EvidenceError(f"commitment {step} was not signed by the accused node {accused}")
        if tensor_hash(tensor_bytes(self.output)) != self.challenged.commitment.output_hash:
            raise EvidenceError("the answer is not what the node committed to")


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
