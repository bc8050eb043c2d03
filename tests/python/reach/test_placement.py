"""Choosing layers like a market: a new node takes the span the listed nodes serve worst, as much of it as fits."""

from __future__ import annotations

import pytest

from shardmarket.server.placement import Served, layer_bytes, layers_that_fit, per_layer, weakest_span


def manifest(num_layers: int, hidden: int) -> dict:
    tensor = {"dtype": "bfloat16", "shape": [hidden, hidden]}
    return {"num_layers": num_layers, "layers": [{"tensors": {"q": tensor, "k": tensor}, "size": 0}] * num_layers}


def test_an_empty_market_is_served_from_its_first_layer():
    assert weakest_span(per_layer(10, []), 4) == (0, 4)


def test_the_span_without_nodes_is_taken_before_a_thinly_served_one():
    served = [Served(0, 4, 10.0), Served(4, 8, 2.0)]  # layers 8:10 have no node at all
    assert weakest_span(per_layer(10, served), 2) == (8, 10)
    assert weakest_span(per_layer(10, served), 3) == (7, 10)  # the weakest layers first, then the next weakest


def test_throughput_adds_up_over_the_nodes_of_a_layer():
    served = [Served(0, 6, 5.0), Served(0, 3, 5.0), Served(3, 6, 1.0)]
    assert per_layer(6, served) == [10.0, 10.0, 10.0, 6.0, 6.0, 6.0]
    assert weakest_span(per_layer(6, served), 3) == (3, 6)


def test_a_node_that_does_not_answer_adds_nothing():
    assert weakest_span(per_layer(4, [Served(0, 2, 0.0), Served(2, 4, 1.0)]), 2) == (0, 2)


@pytest.mark.parametrize(("dtype", "budget_kib", "fits"), [("float32", 4096, 6), ("bfloat16", 4096, 10), ("float32", 512, 0)])
def test_only_as_many_layers_as_the_memory_holds(dtype, budget_kib, fits):
    model = manifest(10, 256)  # a layer: 2 x 256 x 256 weights, 512 KiB in float32, 256 KiB in bfloat16
    assert layer_bytes(model, dtype) == 2 * 256 * 256 * {"float32": 4, "bfloat16": 2}[dtype]
    assert layers_that_fit(model, dtype, budget_kib * 1024) == fits  # 80 % of the memory for weights
