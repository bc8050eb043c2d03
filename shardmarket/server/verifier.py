"""Verifier duty: when a dispute's panel draws this node, it fetches the evidence, checks it against the accused's
signature, re-runs the hop on its own layers in every numerics an honest node could have computed that answer in (the
answer's dtype is signed; the weight format is not, so each one its stored weights can become is tried), commits its
verdict, reveals it once the reveal phase opens, and resolves the dispute when every verifier has revealed. A dispute
about this node's slice whose challenger has not drawn its panel a few blocks after the draw block is drawn by this
node, so that nobody can wait for the draw's randomness to expire and be drawn again."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import requests

from shardmarket.chain.contracts import ChainError, DisputeStatus, Market
from shardmarket.chain.disputes import draw_panel
from shardmarket.chain.eip712 import commitment_digest
from shardmarket.chain.evidence import Evidence, EvidenceError, fetch, relative_difference
from shardmarket.chain.watch import BlockWatch
from shardmarket.engine.errors import EngineError
from shardmarket.engine.formats import FLOATS, Numerics, format_name, honest_numerics, tolerance
from shardmarket.ipfs.blockstore import Blockstore
from shardmarket.ipfs.fetch import FetchError
from shardmarket.server.worker import StageWorker

log = logging.getLogger("shardmarket.verifier")
RESCAN_BLOCKS = 100  # the scan's start is saved at least this often (blocks), so a restart rescans few
# evidence no gateway serves is asked for again (every EVIDENCE_RETRY_S) until this long before the commit phase
# ends; then the vote acquits the node (the challenger had the whole phase to make the evidence available)
UNAVAILABLE_VOTE_MARGIN_S = 300
EVIDENCE_RETRY_S = 15  # between two attempts to fetch a dispute's evidence
DRAW_GRACE_BLOCKS = 3  # blocks after a dispute's draw block left to its challenger before this node draws its panel


class EvidenceUnavailable(Exception):
    """The evidence could not be fetched (no gateway reachable or serving it): the vote waits for a later tick."""


@dataclass
class _Ballot:
    node_wrong: bool
    salt: bytes
    committed: bool = False
    revealed: bool = False


class VerifierDuty:
    """The daemon's dispute loop; chain errors are logged and retried at the next tick. A verifier that does not
    reveal is penalized, so a vote is never lost: a dispute this node was drawn for stays pending until its vote is
    committed (a failed commitVote is sent again), and with `state_path` the ballots (verdict and salt, written
    before the vote is sent) and the block to scan from survive a restart."""

    def __init__(
        self,
        market: Market,
        worker: StageWorker,
        model_id: bytes,
        store: Blockstore,
        gateways: list[str],
        tolerance: float,  # between float32 re-runs; engine.formats.tolerance scales it to the numerics compared
        tick_s: float = 1.0,
        state_path: Path | None = None,
    ) -> None:
        self.market, self.worker, self.model_id, self.store, self.gateways = market, worker, model_id, store, gateways
        self.tolerance, self.tick_s, self.state_path = tolerance, tick_s, state_path
        self.ballots: dict[int, _Ballot] = {}
        # vote not committed yet: dispute id -> (the block its panel was drawn in, DisputeOpened and PanelDrawn args)
        self.pending: dict[int, tuple[int, dict]] = {}
        self.drawing: dict[int, tuple[int, int]] = {}  # this slice's disputes without a panel: id -> (opened in, draw block)
        self._from_block: int | None = None
        self._evidence_retry_at: dict[int, float] = {}  # dispute id -> when to try fetching its evidence again
        self._saved_from: int | None = None
        if state_path is not None and state_path.exists():
            state = json.loads(state_path.read_text())
            self._from_block = self._saved_from = state["scan_from"]
            self.ballots = {
                int(i): _Ballot(b["node_wrong"], bytes.fromhex(b["salt"]), b["committed"], b["revealed"])
                for i, b in state["ballots"].items()
            }
            log.info("verifier state: %d ballot(s), scanning for disputes from block %s", len(self.ballots), self._from_block)

    def _save(self) -> None:
        """Write the ballots and the first block not fully handled (that of the oldest pending dispute) atomically."""
        if self.state_path is None:
            return
        blocks = [block for block, _ in self.pending.values()] + [block for block, _ in self.drawing.values()]
        scan_from = min(blocks, default=self._from_block)
        ballots = {str(i): dict(asdict(b), salt=b.salt.hex()) for i, b in self.ballots.items()}
        temporary = self.state_path.with_suffix(".tmp")
        temporary.write_text(json.dumps({"scan_from": scan_from, "ballots": ballots}))
        os.replace(temporary, self.state_path)
        self._saved_from = scan_from

    def _new_disputes(self, latest: int) -> None:
        """Add the panels drawn up to block `latest` that seat this node and still need its vote to `pending`, and the
        disputes opened about this node's slice to `drawing`."""
        start = latest if self._from_block is None else self._from_block
        if start > latest:
            return
        events = self.market.disputes.events
        me = self.market.address.lower()
        found = 0
        for entry in events.DisputeOpened.get_logs(from_block=start, to_block=latest):
            context = entry["args"]["commitment"]["context"]
            if (bytes(context["modelId"]), context["layerStart"], context["layerEnd"]) == self._slice():
                self.drawing[entry["args"]["disputeId"]] = (entry["blockNumber"], entry["args"]["drawBlock"])
                found += 1
        for entry in events.PanelDrawn.get_logs(from_block=start, to_block=latest):
            dispute_id = entry["args"]["disputeId"]
            self.drawing.pop(dispute_id, None)
            ballot = self.ballots.get(dispute_id)
            if me in {v.lower() for v in entry["args"]["verifiers"]} and (ballot is None or not ballot.committed):
                self.pending[dispute_id] = (entry["blockNumber"], self._opened(dispute_id) | dict(entry["args"]))
                found += 1
        self._from_block = latest + 1
        if found or self._saved_from is None or self._from_block - self._saved_from > RESCAN_BLOCKS:
            self._save()  # else a restart scans a few blocks again: disputes already voted on are skipped

    def _slice(self) -> tuple[bytes, int, int]:
        stage = self.worker.stage
        return self.model_id, stage.start, stage.end

    def _opened(self, dispute_id: int) -> dict:
        """The DisputeOpened arguments of `dispute_id` (the accused, the commitment, the evidence)."""
        block = self.market.read(self.market.disputes.functions.getDispute(dispute_id)).openedBlock
        logs = self.market.disputes.events.DisputeOpened.get_logs(
            from_block=block, to_block=block, argument_filters={"disputeId": dispute_id}
        )
        if not logs:
            raise ChainError(f"dispute {dispute_id}: no DisputeOpened event in its block {block}; is the RPC node pruned?")
        return dict(logs[0]["args"])

    def _draw(self, latest: int) -> None:
        """Draw the panels of this slice's disputes that their challengers left undrawn for DRAW_GRACE_BLOCKS."""
        functions = self.market.disputes.functions
        for dispute_id, (opened_in, draw_block) in list(self.drawing.items()):
            if latest <= draw_block + DRAW_GRACE_BLOCKS:
                continue
            dispute = self.market.read(functions.getDispute(dispute_id))
            if dispute.status == DisputeStatus.DRAWING:
                log.info("dispute %d: its panel is still undrawn %d blocks on; drawing it", dispute_id, latest - draw_block)
                if draw_panel(self.market, dispute_id) == DisputeStatus.DRAWING:  # moved to a later block: wait for it
                    self.drawing[dispute_id] = (opened_in, self.market.read(functions.getDispute(dispute_id)).drawBlock)
                    continue
            del self.drawing[dispute_id]
            self._save()

    def _closest_rerun(self, evidence: Evidence) -> tuple[Numerics, float, float]:
        """Re-run the hop in each numerics an honest node could have answered in, this stage's own first, until one
        matches the accused's answer; (numerics, relative difference, tolerance) of the match, else of the closest."""
        own = self.worker.stage
        dtype = format_name(evidence.output.dtype)
        if dtype not in FLOATS:
            raise EvidenceError(f"the accused's answer is {dtype}, which no node computes in")
        stored = own.source.stored if own.source is not None else own.numerics.weights
        candidates = honest_numerics(stored, dtype)
        candidates.sort(key=lambda numerics: numerics != own.numerics)
        closest: tuple[Numerics, float, float] | None = None
        for numerics in candidates:
            try:
                stage = own.with_numerics(numerics)
            except EngineError as exc:
                log.info("cannot re-run in %s: %s", numerics, exc)
                continue
            difference = relative_difference(evidence.output, stage.rerun(evidence.positions, evidence.inputs)[-1])
            limit = tolerance(numerics, numerics, self.tolerance)
            if closest is None or difference / limit < closest[1] / closest[2]:
                closest = (numerics, difference, limit)
            if difference <= limit:
                break
        if closest is None:
            raise EvidenceError(f"this node cannot re-run layers {own.start}:{own.end} with {dtype} activations")
        return closest

    async def fetch_evidence(self, dispute: dict, *, last_chance: bool = True) -> Evidence | None:
        """The dispute's evidence, from the local store or the gateways. Evidence no gateway serves (yet) raises
        EvidenceUnavailable, unless this is the `last_chance` to vote: then it is None, which acquits the node."""
        try:
            return await asyncio.to_thread(fetch, dispute["evidence"], self.store, self.gateways)
        except (FetchError, OSError) as exc:
            if not last_chance:
                raise EvidenceUnavailable(str(exc)) from None
            return None

    async def judge(self, dispute: dict, *, last_chance: bool = True) -> bool:
        """True if the accused node's answer is wrong; evidence that does not check out, or that cannot be fetched
        at the `last_chance` to vote, acquits it (see `fetch_evidence`)."""
        try:
            evidence = await self.fetch_evidence(dispute, last_chance=last_chance)
            if evidence is None:
                raise EvidenceError("no gateway served it, and the commit phase is about to end")
            domain = self.market.dispute_domain()
            evidence.check(dispute["node"], domain)
            if commitment_digest(evidence.challenged.commitment, domain) != bytes(dispute["commitmentDigest"]):
                raise EvidenceError("the evidence is about another commitment than the dispute")
            context = evidence.context
            if (context.model_id, context.layer_start, context.layer_end) != self._slice():
                raise EvidenceError(
                    f"the evidence is for layers {context.layer_start}:{context.layer_end} of model 0x{context.model_id.hex()}, "
                    f"not this node's slice"
                )
        except (EvidenceError, ValueError) as exc:
            log.warning("dispute %d: the evidence does not hold (%s); voting that the node was right", dispute["disputeId"], exc)
            return False
        try:
            numerics, difference, limit = await self.worker.call(self._closest_rerun, evidence)
        except EvidenceError as exc:
            log.warning("dispute %d: %s; voting that the node was right", dispute["disputeId"], exc)
            return False
        log.info(
            "dispute %d: re-ran %d step(s); relative difference %.3g in %s (tolerance %.3g)",
            dispute["disputeId"],
            len(evidence.inputs),
            difference,
            numerics,
            limit,
        )
        return difference > limit

    async def _vote(self, dispute: dict, now: int) -> None:
        """Judge a pending dispute (once: a retry reuses the verdict and salt) and commit the vote; `now` is the chain
        time of this tick."""
        dispute_id = dispute["disputeId"]
        ballot = self.ballots.get(dispute_id)
        if ballot is None:
            if time.monotonic() < self._evidence_retry_at.get(dispute_id, 0):
                return  # its evidence could not be fetched a moment ago
            try:
                node_wrong = await self.judge(dispute, last_chance=dispute["commitDeadline"] - now <= UNAVAILABLE_VOTE_MARGIN_S)
            except EvidenceUnavailable:
                self._evidence_retry_at[dispute_id] = time.monotonic() + EVIDENCE_RETRY_S
                raise
            self._evidence_retry_at.pop(dispute_id, None)
            ballot = _Ballot(node_wrong, os.urandom(32))
            self.ballots[dispute_id] = ballot
            self._save()  # before the vote is sent: its salt is needed to reveal it
        await asyncio.to_thread(self._commit, dispute_id, ballot)
        del self.pending[dispute_id]
        self._save()

    def _commit(self, dispute_id: int, ballot: _Ballot) -> None:
        functions = self.market.disputes.functions
        vote = self.market.read(functions.voteHash(dispute_id, self.market.address, ballot.node_wrong, ballot.salt))
        on_chain = self.market.read(functions.ballotOf(dispute_id, self.market.address)).commitHash
        if on_chain != vote:  # else an earlier attempt was mined after all
            self.market.transact(functions.commitVote(dispute_id, vote), f"committing the vote on dispute {dispute_id}")
        ballot.committed = True
        log.info("dispute %d: committed a vote (node wrong: %s)", dispute_id, ballot.node_wrong)

    def _advance(self) -> int:
        """Give up votes that can no longer be committed, reveal where the reveal phase is open, resolve where every
        verifier has revealed; returns the chain time it went by (the newest block's)."""
        functions = self.market.disputes.functions
        now = self.market.w3.eth.get_block("latest")["timestamp"]
        for dispute_id in list(self.pending):
            dispute = self.market.read(functions.getDispute(dispute_id))
            # also a dispute closed meanwhile, found again after a restart
            if dispute.status != DisputeStatus.OPEN or now > dispute.commitDeadline:
                log.warning("dispute %d: closed or past its commit phase before this node's vote was committed", dispute_id)
                del self.pending[dispute_id]
                self.ballots.pop(dispute_id, None)
                self._save()
        for dispute_id, ballot in list(self.ballots.items()):
            if not ballot.committed:
                continue
            dispute = self.market.read(functions.getDispute(dispute_id))
            if dispute.status != DisputeStatus.OPEN:
                del self.ballots[dispute_id]
                self._save()
                continue
            guilty, innocent, count = dispute.guiltyVotes, dispute.innocentVotes, dispute.verifierCount
            commit_over = dispute.committed >= count or now > dispute.commitDeadline
            if not ballot.revealed and commit_over and now <= dispute.revealDeadline:
                self.market.transact(
                    functions.revealVote(dispute_id, ballot.node_wrong, ballot.salt),
                    f"revealing the vote on dispute {dispute_id}",
                )
                ballot.revealed = True
                self._save()
                guilty, innocent = guilty + ballot.node_wrong, innocent + (not ballot.node_wrong)
                log.info("dispute %d: revealed the vote", dispute_id)
            if guilty + innocent >= count or now > dispute.revealDeadline:
                self.market.transact(functions.resolve(dispute_id), f"resolving dispute {dispute_id}")
                log.info("dispute %d: resolved", dispute_id)
                del self.ballots[dispute_id]
                self._save()
        return now

    async def run(self, watch: BlockWatch) -> None:
        """Every tick: look at the newest block (`watch`), and work only when a block came (disputes open in one, and
        a phase can only end in one: its deadlines are block times) or a vote is still to be committed."""
        handled = None
        while True:
            await asyncio.sleep(self.tick_s)
            try:
                latest = await watch.latest(max_age_s=self.tick_s / 2)  # the settler's read of this tick will do
                if latest == handled:
                    continue
                await asyncio.to_thread(self._new_disputes, latest)
                if self.drawing:
                    await asyncio.to_thread(self._draw, latest)
                if not (self.ballots or self.pending):
                    handled = latest
                    continue
                now = await asyncio.to_thread(self._advance)
                for _, dispute in list(self.pending.values()):
                    try:
                        await self._vote(dispute, now)
                    except EvidenceUnavailable as exc:
                        log.warning(
                            "dispute %d: the evidence cannot be fetched yet (%s); asking again", dispute["disputeId"], exc
                        )
                    except (ChainError, requests.RequestException) as exc:
                        log.warning("dispute %d: the vote is not committed yet (%s); retrying", dispute["disputeId"], exc)
                handled = None if self.pending else latest  # a vote still to commit is retried without a new block
            except (ChainError, requests.RequestException) as exc:
                log.warning("verifier duty postponed: %s", exc)
            except Exception:
                log.exception("verifier duty failed; retrying at the next tick")
