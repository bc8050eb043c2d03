"""Routing: the cheapest chain of nodes tiling [0, L), exclusions, and clear errors when layers are missing."""

import pytest

from shardmarket.client.failures import RecentFailures
from shardmarket.client.routing import NodeInfo, RouteError, plan_route
from shardmarket.client.text import TextStream
from shardmarket.engine.models import random_checkpoint, tiny_config


def node(url: str, start: int, end: int, *, rtt_ms: float = 1.0, decode_ms: float = 1.0, price: int = 0) -> NodeInfo:
    return NodeInfo(url, "m", 30, 64, "float32", start, end, price, bytes(32), "0x" + "00" * 20, 1, decode_ms, rtt_ms / 1000)


def urls(route: list[NodeInfo]) -> list[str]:
    return [n.url for n in route]


def test_route_tiles_the_layers_with_the_lowest_latency():
    nodes = [
        node("a", 0, 10),
        node("b", 10, 20),
        node("c", 20, 30),
        node("slow", 10, 20, rtt_ms=50),
        node("whole", 0, 30, decode_ms=100),
    ]
    assert urls(plan_route(nodes, 0, 30, 256)) == ["a", "b", "c"]


def test_fewer_hops_win_when_they_are_faster():
    nodes = [node("a", 0, 10), node("b", 10, 20), node("c", 20, 30), node("whole", 0, 30, decode_ms=1.5)]
    assert urls(plan_route(nodes, 0, 30, 256)) == ["whole"]


def test_price_multiplies_latency():
    nodes = [node("b", 15, 30), node("cheap", 0, 15, rtt_ms=2, price=0), node("dear", 0, 15, price=9)]
    assert urls(plan_route(nodes, 0, 30, 256)) == ["cheap", "b"]


def test_excluded_nodes_are_routed_around_and_sub_ranges_can_be_planned():
    nodes = [node("a", 0, 10), node("b", 10, 20), node("spare", 10, 20, rtt_ms=5), node("c", 20, 30)]
    assert urls(plan_route(nodes, 0, 30, 256, exclude={"b"})) == ["a", "spare", "c"]
    assert urls(plan_route(nodes, 10, 20, 256, exclude={"b"})) == ["spare"]


def test_missing_layers_raise_a_clear_error():
    nodes = [node("a", 0, 10), node("c", 20, 30), node("overlap", 5, 25)]
    with pytest.raises(RouteError, match=r"no live nodes cover layers \[0, 30\).*a \[0,10\)"):
        plan_route(nodes, 0, 30, 256)


def test_recent_failures_expire():
    failures = RecentFailures(ttl_s=0.0)
    failures.add("http://x")
    assert failures.current() == set()
    failures = RecentFailures(ttl_s=60)
    failures.add("http://x")
    assert failures.current() == {"http://x"}


def test_text_stream_holds_back_partial_characters(tmp_path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(random_checkpoint(tiny_config(), tmp_path / "m"))
    ids = tokenizer.encode("héllo wörld ✓")
    stream = TextStream(tokenizer)
    parts = [stream.push(i) for i in ids] + [stream.finish()]
    assert "".join(parts) == "héllo wörld ✓"
    assert all("\ufffd" not in p for p in parts)
