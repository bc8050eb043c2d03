"""The paid client: nodes found on the NodeRegistry (ranges, prices, endpoints, keys pinned from the chain),
and a RemoteModel that pays every step of every hop with the client's signed tab."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path

from shardmarket.chain.contracts import Market
from shardmarket.chain.registry import listed_nodes
from shardmarket.client.audit import Auditor
from shardmarket.client.generation import RemoteModel, in_passing_thread
from shardmarket.client.payer import Payer
from shardmarket.client.routing import NodeInfo, RouteError, discover, plan_route
from shardmarket.config import Config
from shardmarket.engine.head import Head
from shardmarket.ipfs.blockstore import Blockstore

log = logging.getLogger("shardmarket.client")


async def chain_nodes(market: Market, model_name: str, relay: str = "") -> list[NodeInfo]:
    """Measure the registered nodes (through `relay`, when given); a node whose /info disagrees with the chain (key,
    operator, range) is skipped."""
    registered = await asyncio.to_thread(listed_nodes, market, model_name)
    measured = {n.url: n for n in await discover([r["url"] for r in registered], model_name, relay=relay)}
    nodes = []
    for entry in registered:
        node = measured.get(entry["url"])
        if node is None:
            continue
        if node.x25519_public_key != entry["key"] or node.operator.lower() != entry["operator"].lower():
            log.warning("node %s presents another key or operator than it registered on chain; skipping it", node.url)
            continue
        if (node.start, node.end) != (entry["start"], entry["end"]):
            log.warning(
                "node %s serves layers %d:%d, not the registered %d:%d; skipping it",
                node.url,
                node.start,
                node.end,
                entry["start"],
                entry["end"],
            )
            continue
        node.price = entry["price"]
        nodes.append(node)
    return nodes


async def connect_paid(checkpoint: Path, config: Config, account, model_name: str, **kwargs) -> RemoteModel:
    """A RemoteModel over the chain's nodes of `model_name`, paying with `account`'s escrow deposit."""
    market = await asyncio.to_thread(Market.connect, config.chain, account)
    head = await in_passing_thread(Head.load, checkpoint)
    privacy = kwargs.get("privacy")
    relay = privacy.relay if privacy is not None else ""
    nodes = await chain_nodes(market, model_name, relay)
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
    model.refresh_nodes = lambda: chain_nodes(market, model_name, relay)
    plan_route(nodes, 0, head.num_layers, head.config.hidden_size * 4)
    spendable = await asyncio.to_thread(market.read, market.escrow.functions.spendableOf(account.address))
    if spendable == 0:
        raise RouteError(f"client {account.address} has nothing to spend in the escrow; run `shardmarket client deposit AMOUNT`")
    await asyncio.to_thread(fund_reserves, market, [n.operator for n in nodes if n.price], config.client.reserve, spendable)
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
