"""What the NodeRegistry says about a model's nodes and about this operator's registration."""

from __future__ import annotations

from dataclasses import dataclass

from eth_utils import keccak, to_checksum_address

from shardmarket.chain.contracts import ChainError, Market, abi

PAGE = 100  # NodeRegistry.MAX_PAGE
# the events after which a node's listing may read otherwise: the NodeRegistry's, and the StakeManager's (listing needs
# the minimum bonded stake)
LISTING_EVENTS = {
    "NodeRegistry": ("NodeRegistered", "NodeUpdated", "NodePaused", "NodeUnpaused", "NodeDeregistered"),
    "StakeManager": ("Staked", "UnbondRequested", "Slashed"),
}


def listed_nodes(market: Market, model_name: str, block: int | str = "latest") -> list[dict]:
    """Every listed node of `model_name` as of `block`: operator, endpoint, layers, price, X25519 key. Reads
    `nodesOf` pages, all at one block: a model's market in one call per 100 nodes."""
    model_id = market.model_id(model_name)
    if market.read(market.models.functions.layerCountOf(model_id), block=block) == 0:
        raise ChainError(f"unknown model {model_name!r} on the ModelRegistry")
    count = market.read(market.registry.functions.modelNodeCount(model_id), block=block)
    nodes = []
    for offset in range(0, count, PAGE):
        page = market.read(market.registry.functions.nodesOf(model_id, offset, PAGE), "reading the registry", block)
        nodes += [_entry(listing.operator, listing.node) for listing in page if listing.listed]
    return nodes


def listings_of(market: Market, model_name: str, operators: set[str], block: int | str) -> dict[str, dict | None]:
    """The listing of each of `operators` as of `block`: its entry while it is a listed node of `model_name`, else None."""
    model_id = market.model_id(model_name)
    out: dict[str, dict | None] = {}
    for operator in operators:
        listed = market.read(market.registry.functions.isListed(operator), "reading a listing", block)
        node = market.read(market.registry.functions.getNode(operator), "reading a listing", block) if listed else None
        out[operator] = _entry(operator, node) if node is not None and bytes(node.modelId) == model_id else None
    return out


def listing_changes(market: Market, from_block: int, to_block: int) -> set[str]:
    """The operators whose listing may have changed in blocks [from_block, to_block], from one eth_getLogs over the
    NodeRegistry's and the StakeManager's events (each names the operator in its first topic)."""
    if from_block > to_block:
        return set()
    topics = [
        "0x" + keccak(text=_signature(market, contract, event)).hex()
        for contract, events in LISTING_EVENTS.items()
        for event in events
    ]
    logs = market.w3.eth.get_logs(
        {
            "fromBlock": from_block,
            "toBlock": to_block,
            "address": [to_checksum_address(market.addresses[contract]) for contract in LISTING_EVENTS],
            "topics": [topics],
        }
    )
    return {to_checksum_address(bytes(entry["topics"][1])[-20:]) for entry in logs}


def _signature(market: Market, contract: str, event: str) -> str:
    (entry,) = (e for e in abi(contract) if e.get("type") == "event" and e["name"] == event)
    return f"{event}({','.join(_type(i) for i in entry['inputs'])})"


def _type(param: dict) -> str:
    if param["type"].startswith("tuple"):
        return "(" + ",".join(_type(c) for c in param["components"]) + ")" + param["type"][5:]
    return param["type"]


def _entry(operator: str, node) -> dict:
    return {
        "operator": operator,
        "url": node.endpoints[0].rstrip("/"),
        "start": node.layerStart,
        "end": node.layerEnd,
        "price": node.pricePerToken,
        "key": bytes(node.encryptionKey),
    }


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
