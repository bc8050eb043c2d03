"""The client's checks on nodes: two different signed answers for one step context (same session, step, position,
history and input) are submitted as equivocation; a fraction of requests has one hop re-run on another node of the
same range computing in the same numerics (weight format and activation dtype), else locally in the node's numerics
when the client holds the layers, else on a node computing otherwise; a mismatch beyond the tolerance of that pair of
numerics (settled by a local re-run when the client holds the layers) opens a dispute with the evidence on IPFS, then
draws its panel."""

from __future__ import annotations

import asyncio
import logging
import random
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from web3.logs import DISCARD

from shardmarket.chain.commitment import SignedCommitment
from shardmarket.chain.contracts import ChainError, Market
from shardmarket.chain.disputes import draw_panel
from shardmarket.chain.eip712 import context_hash
from shardmarket.chain.evidence import Evidence, publish, relative_difference
from shardmarket.client.routing import NodeInfo, trusted_nodes
from shardmarket.client.session import InferenceSession, NodeFailure
from shardmarket.engine.errors import EngineError
from shardmarket.engine.formats import FLOATS, Numerics, tolerance
from shardmarket.ipfs.blockstore import Blockstore
from shardmarket.net import wire

if TYPE_CHECKING:
    from shardmarket.engine.stage import Stage

log = logging.getLogger("shardmarket.audit")


@dataclass(frozen=True)
class Finding:
    """What the auditor submitted on chain."""

    kind: str  # "equivocation" or "challenge"
    node: str
    tx: str
    dispute_id: int | None = None


@dataclass
class _HopRecord:
    node: NodeInfo
    positions: list[int]
    inputs: list[torch.Tensor]
    outputs: list[torch.Tensor]
    commitments: dict[int, SignedCommitment]  # by step, of the hop's current session


class Auditor:
    """Watches every commitment and spot-checks finished requests of one RemoteModel."""

    def __init__(
        self,
        model,
        market: Market,
        store: Blockstore,
        *,
        rate: float,
        tolerance: float,  # between float32 re-runs; engine.formats.tolerance scales it to the numerics compared
        checkpoint: Path | None = None,
        seed: int | None = None,
        evidence_gateways: Sequence[str] = (),
    ) -> None:
        self.model, self.market, self.store = model, market, store
        self.evidence_gateways = list(evidence_gateways)  # named in every dispute, for verifiers elsewhere
        self.rate, self.tolerance, self.checkpoint = rate, tolerance, checkpoint
        self.rng = random.Random(seed)
        self.findings: list[Finding] = []
        self.checks = 0
        self._seen: dict[tuple[str, bytes, bytes], SignedCommitment] = {}  # (operator, request id, context hash)
        self._tasks: set[asyncio.Task] = set()
        self._stages: dict[tuple[int, int, Numerics], Stage] = {}
        self._local = threading.Lock()  # one local re-run at a time (model loading patches torch globally)

    def on_commitment(self, node: NodeInfo, signed: SignedCommitment, tokens: int) -> None:
        c = signed.commitment
        key = (node.operator.lower(), c.context.request_id, context_hash(c.context))
        earlier = self._seen.setdefault(key, signed)
        if earlier.commitment.output_hash != c.output_hash:
            self._spawn(self._submit_equivocation(node, earlier, signed))

    def on_finished(self, session: InferenceSession) -> None:
        for key in [k for k in self._seen if k[1] in session.request_ids]:
            del self._seen[key]
        by_session: dict[bytes, dict[int, SignedCommitment]] = {}
        for _, signed in session.commitments:
            context = signed.commitment.context
            by_session.setdefault(context.session_nonce, {})[context.step] = signed
        for hop in session.hops:  # each hop is checked with probability `rate`
            if hop.inputs and self.rng.random() < self.rate:
                record = _HopRecord(
                    hop.node,
                    [p for p, _ in hop.inputs],
                    [h for _, h in hop.inputs],
                    list(hop.outputs),
                    by_session.get(hop.nonce, {}),
                )
                self._spawn(self._spot_check(record, session.max_length, session.trusted, session.relay))

    def _spawn(self, coroutine) -> None:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def wait(self) -> None:
        """Wait for the checks and submissions in flight."""
        while self._tasks:
            await asyncio.gather(*list(self._tasks), return_exceptions=True)

    async def _submit_equivocation(self, node: NodeInfo, a: SignedCommitment, b: SignedCommitment) -> None:
        disputes = self.market.disputes.functions
        call = disputes.slashEquivocation(a.commitment.as_tuple(), a.signature, b.commitment.as_tuple(), b.signature)
        try:
            receipt = await asyncio.to_thread(self.market.transact, call, f"reporting equivocation by {node.operator}")
        except ChainError as exc:
            log.warning("could not report the equivocation of %s: %s", node.url, exc)
            return
        log.warning("node %s signed two answers for one step; slashed in tx %s", node.url, receipt["transactionHash"].hex())
        self.findings.append(Finding("equivocation", node.operator, receipt["transactionHash"].hex()))

    async def _rerun_remote(
        self, other: NodeInfo, record: _HopRecord, max_length: int, relay: str | None
    ) -> tuple[list[torch.Tensor], dict[int, SignedCommitment]]:
        checker = InferenceSession(
            [other],
            self.model.head.num_layers,
            self.model.domain,
            max_length=max_length,
            transport=self.model.transport,
            step_timeout_s=self.model.step_timeout_s,
            tab_source=self.model.tab_source,
            on_commitment=self.model.payer.answered,
            standing_tab=self.model.standing_tab,
            relay=relay,
        )
        try:
            hops = await checker._open_hops([other])
            outputs = await checker._replay_hop(hops[0], list(zip(record.positions, record.inputs, strict=True)))
        finally:
            await checker.close()
        return [o for _, o in outputs], {s.commitment.context.step: s for _, s in checker.commitments}

    def _rerun_local(self, record: _HopRecord, numerics: Numerics) -> list[torch.Tensor] | None:
        if self.checkpoint is None:
            return None
        with self._local:
            return self._rerun_local_locked(record, self.checkpoint, numerics)

    def _rerun_local_locked(self, record: _HopRecord, checkpoint: Path, numerics: Numerics) -> list[torch.Tensor] | None:
        from shardmarket.engine.stage import Stage

        key = (record.node.start, record.node.end, numerics)
        try:
            stage = self._stages.get(key) or Stage.load(
                checkpoint, key[0], key[1], weights=numerics.weights, dtype=FLOATS[numerics.dtype]
            )
        except (OSError, ValueError, KeyError, EngineError) as exc:
            log.info("cannot re-run layers %d:%d locally in %s (%s)", key[0], key[1], numerics, exc)
            return None
        self._stages[key] = stage
        return stage.rerun(record.positions, record.inputs)

    @staticmethod
    def _first_mismatch(a: list[torch.Tensor], b: list[torch.Tensor], tolerance: float) -> int | None:
        for step, (x, y) in enumerate(zip(a, b, strict=True)):
            if relative_difference(x, y) > tolerance:
                return step
        return None

    async def _local_mismatch(self, record: _HopRecord, node: NodeInfo, outputs: list[torch.Tensor]) -> tuple[bool, int | None]:
        """Whether a local re-run in `node`'s numerics ran, and the first step where `outputs` differ from it."""
        local = await asyncio.to_thread(self._rerun_local, record, node.numerics)
        if local is None:
            return False, None
        return True, self._first_mismatch(outputs, local, tolerance(node.numerics, node.numerics, self.tolerance))

    async def _spot_check(
        self, record: _HopRecord, max_length: int, trusted: frozenset[str] | None = None, relay: str | None = None
    ) -> None:
        """Re-run a hop on a peer (or locally) and challenge the node that is wrong. A private request's hop is re-run
        only on trusted operators' nodes or locally, and never challenged: a dispute publishes the hop's inputs."""
        self.checks += 1
        node = record.node
        nodes = self.model.nodes if trusted is None else trusted_nodes(self.model.nodes, trusted)
        peers = [
            n
            for n in nodes
            if (n.start, n.end) == (node.start, node.end) and n.url != node.url and n.url not in self.model.failed.current()
        ]
        same = [n for n in peers if n.numerics == node.numerics]
        if same or (peers and self.checkpoint is None):  # a peer computing otherwise is only asked when nothing else can
            other = self.rng.choice(same or peers)
            try:
                outputs, commitments = await self._rerun_remote(other, record, max_length, relay)
            except (TimeoutError, NodeFailure, ConnectionError, OSError) as exc:
                log.info("spot check on %s failed to run (%s)", other.url, exc)
                return
            step = self._first_mismatch(record.outputs, outputs, tolerance(node.numerics, other.numerics, self.tolerance))
            if step is None:
                return
            suspects = []
            for suspect, answers, signed in ((node, record.outputs, record.commitments), (other, outputs, commitments)):
                ran, at = await self._local_mismatch(record, suspect, answers)  # a local re-run says which one is wrong
                if not ran or at is not None:
                    suspects.append((suspect, answers, signed, step if at is None else at))
            log.warning(
                "spot check: %s and %s disagree on layers %d:%d at step %d", node.url, other.url, node.start, node.end, step
            )
        else:
            _, step = await self._local_mismatch(record, node, record.outputs)
            if step is None:
                return
            suspects = [(node, record.outputs, record.commitments, step)]
            log.warning(
                "spot check: %s disagrees with the local re-run of layers %d:%d in %s",
                node.url,
                node.start,
                node.end,
                node.numerics,
            )
        if trusted is not None:
            log.warning("spot check of a private request: not opening a dispute, which would publish its hidden states")
            return
        for culprit, outputs, commitments, at in suspects:
            await self._challenge(culprit, record, outputs, commitments, at)

    async def _challenge(
        self, node: NodeInfo, record: _HopRecord, outputs: list[torch.Tensor], commitments: dict[int, SignedCommitment], step: int
    ) -> None:
        """Open a dispute on `node`'s commitment at `step`, with the session's inputs up to there and its answer as
        evidence, then draw the dispute's panel."""
        if step not in commitments:
            log.warning("cannot challenge %s: its commitment for step %d is missing", node.url, step)
            return
        dtype = wire.DTYPES[node.dtype]
        evidence = Evidence(
            record.positions[: step + 1],
            [x.to(dtype).contiguous() for x in record.inputs[: step + 1]],
            commitments[step],
            outputs[step].to(dtype).contiguous(),
        )
        reference_cid = await asyncio.to_thread(publish, evidence, self.store, self.evidence_gateways)
        disputes = self.market.disputes
        bond = self.market.read(disputes.functions.challengeBond())
        try:
            await asyncio.to_thread(
                self.market.transact, self.market.token.functions.approve(disputes.address, bond), "approving the challenge bond"
            )
            call = disputes.functions.challenge(
                node.operator, evidence.challenged.commitment.as_tuple(), evidence.challenged.signature, reference_cid
            )
            receipt = await asyncio.to_thread(self.market.transact, call, f"challenging {node.operator}")
        except ChainError as exc:
            log.warning("could not open a dispute against %s: %s", node.url, exc)
            return
        opened = disputes.events.DisputeOpened().process_receipt(receipt, errors=DISCARD)
        dispute_id = opened[0]["args"]["disputeId"] if opened else None
        log.warning("opened dispute %s against %s (evidence %s)", dispute_id, node.url, reference_cid)
        self.findings.append(Finding("challenge", node.operator, receipt["transactionHash"].hex(), dispute_id))
        if dispute_id is not None:
            await asyncio.to_thread(draw_panel, self.market, dispute_id)
