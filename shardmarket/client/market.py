"""The paid client: nodes found on the NodeRegistry (ranges, prices, endpoints, keys pinned from the chain; see
shardmarket.client.directory),
and a RemoteModel that pays every step of every hop with the client's signed tab."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from shardmarket.chain.contracts import Market
from shardmarket.client.audit import Auditor
from shardmarket.client.directory import Discovery
from shardmarket.client.generation import RemoteModel, in_passing_thread
from shardmarket.client.payer import Payer
from shardmarket.client.routing import NodeInfo, RouteError, plan_route
from shardmarket.config import Config
from shardmarket.engine.head import Head
from shardmarket.ipfs.blockstore import Blockstore

log = logging.getLogger("shardmarket.client")


async def connect_paid(checkpoint: Path, config: Config, account, model_name: str, **kwargs) -> RemoteModel:
    """A RemoteModel over the chain's nodes of `model_name`, paying with `account`'s escrow deposit."""
    market = await asyncio.to_thread(Market.connect, config.chain, account)
    head = await in_passing_thread(Head.load, checkpoint)
    privacy = kwargs.get("privacy")
    relay = privacy.relay if privacy is not None else ""
    discovery = Discovery(market, model_name, config.home / "client", confirmations=config.chain.confirmations, relay=relay)
    payload_bytes = head.config.hidden_size * 4
    nodes = await discovery.find(head.num_layers, payload_bytes)
    payer = Payer(account, market.escrow_domain(), config.home / "client" / "ledger.sqlite")
    model = RemoteModel(
        head,
        model_name,
        nodes,
        market.dispute_domain(),
        tab_source=payer.tab,
        presign=payer.presign,
        standing_tab=payer.standing,
        **kwargs,
    )
    auditor = Auditor(
        model,
        market,
        Blockstore(config.ipfs.store),
        rate=config.client.spot_check_rate,
        tolerance=config.client.spot_check_tolerance,
        checkpoint=checkpoint,
        evidence_gateways=config.client.evidence_gateways,
    )

    def on_commitment(node: NodeInfo, signed, tokens: int) -> None:
        payer.answered(node, signed, tokens)
        auditor.on_commitment(node, signed, tokens)

    model.on_commitment, model.on_finished = on_commitment, auditor.on_finished
    model.request_costs = payer.request_costs
    model.payer, model.market, model.auditor = payer, market, auditor
    model.discovery = discovery
    model.refresh_nodes = lambda: discovery.find(head.num_layers, payload_bytes, retry_failed=True)
    plan_route(nodes, 0, head.num_layers, payload_bytes)
    spendable = await asyncio.to_thread(market.read, market.escrow.functions.spendableOf(account.address))
    if spendable == 0:
        raise RouteError(f"client {account.address} has nothing to spend in the escrow; run `shardmarket client deposit AMOUNT`")
    await asyncio.to_thread(fund_reserves, market, [n.operator for n in nodes if n.price], config.client.reserve, spendable)

    async def reserve_for_nodes_found_later() -> None:
        await discovery.wait()
        await asyncio.to_thread(fund_reserves, market, [n.operator for n in nodes if n.price], config.client.reserve, spendable)

    model.background.append(asyncio.create_task(reserve_for_nodes_found_later()))
    return model


def fund_reserves(market: Market, nodes: list[str], per_node: int, spendable: int) -> None:
    """Bring the client's reserve for each of `nodes` to `per_node` (0: half of `spendable`, shared among them) where it
    is below half of that, in one transaction: a node serves a client only as far as its reserve for that node goes."""
    if not nodes:
        return
    target = per_node or spendable // (2 * len(nodes))
    me = market.address
    short = {}
    for node in nodes:
        reserve = market.read(market.escrow.functions.reserveOf(me, node), "reading a reserve")
        if reserve.releaseAt == 0 and reserve.amount < target // 2:
            short[node] = target - reserve.amount
    if not short or sum(short.values()) > spendable:
        if short:
            log.warning(
                "the escrow balance (%d) is too small to reserve %d for each node; nodes serve only their credit",
                spendable,
                target,
            )
        return
    market.transact(
        market.escrow.functions.fundReserves(list(short), list(short.values())),
        f"reserving {target} for each of {len(short)} node(s)",
    )
