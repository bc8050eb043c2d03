"""What the NodeRegistry says about a model's nodes and about this operator's registration."""

from __future__ import annotations

from dataclasses import dataclass

from shardmarket.chain.contracts import ChainError, Market


def listed_nodes(market: Market, model_name: str) -> list[dict]:
    """Every listed node of `model_name`: operator, endpoint, layers, price, X25519 key."""
    model_id = market.model_id(model_name)
    if market.read(market.models.functions.layerCountOf(model_id)) == 0:
        raise ChainError(f"unknown model {model_name!r} on the ModelRegistry")
    count = market.read(market.registry.functions.modelNodeCount(model_id))
    nodes = []
    for offset in range(0, count, 100):
        for operator in market.read(market.registry.functions.modelNodes(model_id, offset, 100)):
            if not market.read(market.registry.functions.isListed(operator)):
                continue
            node = market.read(market.registry.functions.getNode(operator))
            nodes.append(
                {
                    "operator": operator,
                    "url": node.endpoints[0].rstrip("/"),
                    "start": node.layerStart,
                    "end": node.layerEnd,
                    "price": node.pricePerToken,
                    "key": bytes(node.encryptionKey),
                }
            )
    return nodes


@dataclass(frozen=True)
class Registration:
    """This operator's entry on the NodeRegistry, with the model's name and manifest resolved."""

    model: str
    manifest: str
    start: int
    end: int
    price: int
    endpoints: list[str]
    key: bytes
    paused: bool


def registration_of(market: Market, operator: str) -> Registration | None:
    """`operator`'s registration, or None when it has none."""
    try:
        node = market.read(market.registry.functions.getNode(operator), "reading the registration")
    except ChainError as exc:
        if "NotRegistered" in str(exc):
            return None
        raise
    model = market.read(market.models.functions.getModel(node.modelId))
    return Registration(
        model.name,
        model.manifestCid,
        node.layerStart,
        node.layerEnd,
        node.pricePerToken,
        list(node.endpoints),
        bytes(node.encryptionKey),
        node.paused,
    )
