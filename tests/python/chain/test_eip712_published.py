"""eip712.json, the EIP-712 domain and types published for wallets, is what shardmarket.chain.eip712 signs with."""

import json
from pathlib import Path

from eth_utils import keccak

from shardmarket.chain import eip712

PUBLISHED = Path(__file__).resolve().parents[3] / "eip712.json"


def encode_type(primary: str, types: dict) -> str:
    """EIP-712's encodeType: the primary type, then the types it references, sorted by name."""

    def referenced(name: str, seen: set[str]) -> set[str]:
        for field in types[name]:
            inner = field["type"].removesuffix("[]")
            if inner in types and inner not in seen:
                seen.add(inner)
                referenced(inner, seen)
        return seen

    def one(name: str) -> str:
        fields = ",".join(f"{f['type']} {f['name']}" for f in types[name])
        return f"{name}({fields})"

    return one(primary) + "".join(one(name) for name in sorted(referenced(primary, set()) - {primary}))


def test_the_published_types_are_the_ones_tabs_and_commitments_are_signed_with():
    published = json.loads(PUBLISHED.read_text())
    assert published == eip712.published_types(), "regenerate eip712.json from eip712.published_types()"
    types = published["types"]
    assert keccak(text=encode_type("Tab", types)) == eip712.TAB_TYPEHASH
    assert keccak(text=encode_type("Commitment", types)) == eip712.COMMITMENT_TYPEHASH
    assert keccak(text=encode_type("EIP712Domain", types)) == eip712.DOMAIN_TYPEHASH
    assert (published["domain"]["name"], published["domain"]["version"]) == (eip712.DOMAIN_NAME, eip712.DOMAIN_VERSION)
