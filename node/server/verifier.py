"""Verifier duty: when the DisputeManager picks this node for a dispute, it fetches the evidence, checks it
against the accused's signatures, re-runs the hop on its own layers, commits its verdict, reveals it once
the reveal phase opens, and resolves the dispute when every verifier has revealed."""

from __future__ import annotations

import asyncio
import logging
import os
from dataclasses import dataclass

import requests
import torch

from ipfs.blockstore import Blockstore
from node.chain.contracts import ChainError, Market
from node.chain.evidence import Evidence, EvidenceError, fetch, relative_difference
from node.chain.watch import BlockWatch
from node.server.worker import StageWorker

log = logging.getLogger("shardmarket.verifier")
OPEN = 1


@dataclass
class _Ballot:
    node_wrong: bool
    salt: bytes
    revealed: bool = False


class VerifierDuty:
    """The daemon's dispute loop; chain errors are logged and retried at the next tick."""

    def __init__(self, market: Market, worker: StageWorker, store: Blockstore, gateways: list[str], tolerance: float,
                 tick_s: float = 1.0) -> None:
        self.market, self.worker, self.store, self.gateways = market, worker, store, gateways
        self.tolerance, self.tick_s = tolerance, tick_s
        self.ballots: dict[int, _Ballot] = {}
        self._from_block: int | None = None

    def _new_disputes(self, latest: int) -> list[dict]:
        start = latest if self._from_block is None else self._from_block
        if start > latest:
            return []
        logs = self.market.disputes.events.DisputeOpened.get_logs(from_block=start, to_block=latest)
        self._from_block = latest + 1
        me = self.market.address.lower()
        return [entry["args"] for entry in logs if me in {v.lower() for v in entry["args"]["verifiers"]}]

    def _rerun(self, evidence: Evidence) -> torch.Tensor:
        stage = self.worker.stage
        session = f"verify-{os.urandom(8).hex()}"
        stage.open_session(session, evidence.positions[-1] + evidence.inputs[-1].shape[1])
        try:
            with torch.inference_mode():
                for position, hidden in zip(evidence.positions, evidence.inputs):
                    positions = torch.arange(position, position + hidden.shape[1]).unsqueeze(0)
                    output = stage.step(session, hidden.to(stage.dtype), positions)
            return output
        finally:
            stage.close_session(session)

    async def judge(self, dispute: dict) -> bool:
        """True if the accused node's answer is wrong; evidence that does not check out acquits it."""
        stage = self.worker.stage
        try:
            evidence = await asyncio.to_thread(fetch, dispute["evidence"], self.store, self.gateways)
            evidence.check(dispute["node"], self.market.dispute_domain())
            c = dispute["commitment"]
            challenged = evidence.challenged.commitment
            if (challenged.request_id, challenged.step, challenged.input_hash, challenged.output_hash) != (
                    c["requestId"], c["step"], c["inputHash"], c["outputHash"]):
                raise EvidenceError("the evidence is about another commitment than the dispute")
            if (evidence.start, evidence.end) != (stage.start, stage.end):
                raise EvidenceError(f"the evidence is for layers {evidence.start}:{evidence.end}, this node serves {stage.start}:{stage.end}")
        except (EvidenceError, ValueError, OSError) as exc:
            log.warning("dispute %d: the evidence does not hold (%s); voting that the node was right", dispute["disputeId"], exc)
            return False
        mine = await self.worker.call(self._rerun, evidence)
        difference = relative_difference(evidence.output, mine)
        log.info("dispute %d: re-ran %d step(s); relative difference %.3g (tolerance %.3g)", dispute["disputeId"],
                 len(evidence.inputs), difference, self.tolerance)
        return difference > self.tolerance

    def _commit(self, dispute_id: int, ballot: _Ballot) -> None:
        functions = self.market.disputes.functions
        vote = self.market.read(functions.voteHash(dispute_id, self.market.address, ballot.node_wrong, ballot.salt))
        self.market.transact(functions.commitVote(dispute_id, vote), f"committing the vote on dispute {dispute_id}")
        log.info("dispute %d: committed a vote (node wrong: %s)", dispute_id, ballot.node_wrong)

    def _advance(self) -> None:
        """Reveal where the reveal phase is open, resolve where every verifier has revealed."""
        functions = self.market.disputes.functions
        now = self.market.w3.eth.get_block("latest")["timestamp"]
        for dispute_id, ballot in list(self.ballots.items()):
            d = self.market.read(functions.getDispute(dispute_id))
            node, commit_deadline, status, _, reveal_deadline, count, committed, guilty, innocent = d[:9]
            if status != OPEN:
                del self.ballots[dispute_id]
                continue
            if not ballot.revealed and (committed >= count or now > commit_deadline) and now <= reveal_deadline:
                self.market.transact(functions.revealVote(dispute_id, ballot.node_wrong, ballot.salt), f"revealing the vote on dispute {dispute_id}")
                ballot.revealed = True
                guilty, innocent = guilty + ballot.node_wrong, innocent + (not ballot.node_wrong)
                log.info("dispute %d: revealed the vote", dispute_id)
            if guilty + innocent >= count or now > reveal_deadline:
                self.market.transact(functions.resolve(dispute_id), f"resolving dispute {dispute_id}")
                log.info("dispute %d: resolved", dispute_id)
                del self.ballots[dispute_id]

    async def run(self, watch: BlockWatch) -> None:
        """Every tick: look at the newest block (`watch`), and work only when a block came: disputes open in one, and
        a phase can only end in one (its deadlines are block times)."""
        handled = None
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                latest = await watch.latest(max_age_s=self.tick_s / 2)  # the settler's read of this tick will do
                if latest == handled:
                    continue
                for dispute in await asyncio.to_thread(self._new_disputes, latest):
                    ballot = _Ballot(await self.judge(dispute), os.urandom(32))
                    self.ballots[dispute["disputeId"]] = ballot
                    await asyncio.to_thread(self._commit, dispute["disputeId"], ballot)
                if self.ballots:
                    await asyncio.to_thread(self._advance)
                handled = latest
            except (ChainError, requests.RequestException) as exc:
                log.warning("verifier duty postponed: %s", exc)
            except Exception:
                log.exception("verifier duty failed; retrying at the next tick")
