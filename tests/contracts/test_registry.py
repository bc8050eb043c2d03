import pytest

from conftest import TOKEN

CID = "bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi"
KEY = b"\x01" * 32
ENDPOINTS = ["http://10.0.0.1:7300"]


# ---- models


def test_register_model_and_read_it_back(models, accounts):
    tx = models.registerModel("SmolLM2-135M", CID, 30, b"\x05" * 32, {"from": accounts[1]})
    model_id = tx.return_value
    assert model_id == models.modelIdOf("SmolLM2-135M")
    assert tx.events["ModelRegistered"]["publisher"] == accounts[1]
    model = models.getModel(model_id)
    assert (model["publisher"], model["layerCount"], model["name"], model["manifestCid"]) == (
        accounts[1],
        30,
        "SmolLM2-135M",
        CID,
    )
    assert models.layerCountOf(model_id) == 30


def test_model_errors(models, accounts, reverts_with):
    models.registerModel("m", CID, 4, b"\x00" * 32, {"from": accounts[1]})
    with reverts_with("ModelExists"):
        models.registerModel("m", CID, 4, b"\x00" * 32, {"from": accounts[2]})
    with reverts_with("InvalidName"):
        models.registerModel("", CID, 4, b"\x00" * 32, {"from": accounts[1]})
    with reverts_with("InvalidName"):
        models.registerModel("x" * 129, CID, 4, b"\x00" * 32, {"from": accounts[1]})
    with reverts_with("InvalidCid"):
        models.registerModel("n", "", 4, b"\x00" * 32, {"from": accounts[1]})
    with reverts_with("InvalidCid"):
        models.updateModel(models.modelIdOf("m"), "c" * 129, b"\x00" * 32, {"from": accounts[1]})
    with reverts_with("ZeroLayers"):
        models.registerModel("n", CID, 0, b"\x00" * 32, {"from": accounts[1]})
    with reverts_with("UnknownModel"):
        models.getModel(b"\x09" * 32)
    with reverts_with("UnknownModel"):
        models.updateModel(b"\x09" * 32, CID, b"\x00" * 32, {"from": accounts[1]})


def test_only_the_publisher_updates_or_hands_over(models, accounts, reverts_with):
    model_id = models.registerModel("m", CID, 4, b"\x00" * 32, {"from": accounts[1]}).return_value
    with reverts_with("NotPublisher"):
        models.updateModel(model_id, "bafynew", b"\x01" * 32, {"from": accounts[2]})
    tx = models.updateModel(model_id, "bafynew", b"\x01" * 32, {"from": accounts[1]})
    assert tx.events["ModelUpdated"]["manifestCid"] == "bafynew"
    assert models.getModel(model_id)["manifestCid"] == "bafynew"
    with reverts_with("ZeroAddress"):
        models.transferPublisher(model_id, "0x" + "00" * 20, {"from": accounts[1]})
    models.transferPublisher(model_id, accounts[2], {"from": accounts[1]})
    with reverts_with("NotPublisher"):
        models.updateModel(model_id, CID, b"\x00" * 32, {"from": accounts[1]})
    models.updateModel(model_id, CID, b"\x00" * 32, {"from": accounts[2]})
    assert models.getModel(model_id)["layerCount"] == 4  # never changes


# ---- nodes


def test_register_lists_a_staked_node(market, registry, nodes):
    node = nodes[0]
    tx = market.register(node, 2, 6, price=7)
    assert tx.events["NodeRegistered"]["operator"] == node
    record = registry.getNode(node)
    assert (record["layerStart"], record["layerEnd"], record["pricePerToken"]) == (2, 6, 7)
    assert record["encryptionKey"] == "0x" + KEY.hex()
    assert record["endpoints"][0].startswith("http://")
    assert registry.isListed(node)
    model_id = market.model_id
    assert list(registry.modelNodes(model_id, 0, 10)) == [node.address]
    key = registry.sliceKey(model_id, 2, 6)
    assert registry.sliceLength(key) == 1 and registry.sliceMemberAt(key, 0) == node
    assert registry.isSliceMember(node, key)
    assert record["activeSince"] == tx.block_number


def test_register_needs_the_minimum_stake(market, registry, nodes, reverts_with):
    market.stake_for(nodes[0], 99 * TOKEN)
    with reverts_with("InsufficientStake"):
        registry.register(market.model_id, 0, 4, 1, KEY, ENDPOINTS, {"from": nodes[0]})


@pytest.mark.parametrize(
    ("start", "end", "key", "endpoints", "error"),
    [
        (0, 9, KEY, ENDPOINTS, "InvalidLayerRange"),
        (4, 4, KEY, ENDPOINTS, "InvalidLayerRange"),
        (5, 3, KEY, ENDPOINTS, "InvalidLayerRange"),
        (0, 4, b"\x00" * 32, ENDPOINTS, "ZeroEncryptionKey"),
        (0, 4, KEY, [], "InvalidEndpoints"),
        (0, 4, KEY, ENDPOINTS * 5, "InvalidEndpoints"),
        (0, 4, KEY, [""], "InvalidEndpoints"),
        (0, 4, KEY, ["h" * 257], "InvalidEndpoints"),
    ],
)
def test_register_rejects_bad_fields(market, registry, nodes, start, end, key, endpoints, error, reverts_with):
    market.stake_for(nodes[0], 100 * TOKEN)
    with reverts_with(error):
        registry.register(market.model_id, start, end, 1, key, endpoints, {"from": nodes[0]})
    with reverts_with("NotRegistered"):
        registry.getNode(nodes[0])


def test_register_unknown_model_or_twice_reverts(market, registry, nodes, reverts_with):
    market.stake_for(nodes[0], 100 * TOKEN)
    with reverts_with("UnknownModel"):
        registry.register(b"\x09" * 32, 0, 1, 1, KEY, ENDPOINTS, {"from": nodes[0]})
    market.register(nodes[0], stake=0)
    with reverts_with("AlreadyRegistered"):
        market.register(nodes[0], stake=0)


def test_listing_follows_bonded_stake(market, registry, stake_manager, nodes):
    node = nodes[0]
    market.register(node)
    stake_manager.unbond(1, {"from": node})
    assert not registry.isListed(node)
    market.stake_for(node, 1)
    assert registry.isListed(node)


def test_update_moves_the_node_between_slices(market, registry, nodes):
    node, other = nodes[0], nodes[1]
    market.register(node, 0, 4)
    market.register(other, 0, 4)
    model_id = market.model_id
    tx = registry.update(model_id, 4, 8, 99, b"\x02" * 32, ["http://a", "http://b"], {"from": node})
    assert tx.events["NodeUpdated"]["layerStart"] == 4
    record = registry.getNode(node)
    assert (record["layerStart"], record["pricePerToken"], list(record["endpoints"])) == (4, 99, ["http://a", "http://b"])
    old, new = registry.sliceKey(model_id, 0, 4), registry.sliceKey(model_id, 4, 8)
    # a slice's list only grows: the node stays at its index in the old slice, no longer a member
    assert [registry.sliceMemberAt(old, i) for i in range(registry.sliceLength(old))] == [node, other]
    assert not registry.isSliceMember(node, old) and registry.isSliceMember(other, old)
    assert [registry.sliceMemberAt(new, i) for i in range(registry.sliceLength(new))] == [node]
    assert record["activeSince"] == tx.block_number
    assert sorted(registry.modelNodes(model_id, 0, 10)) == sorted([node.address, other.address])
    registry.update(model_id, 0, 4, 99, b"\x02" * 32, ["http://a"], {"from": node})  # back: its old place, no new entry
    assert registry.sliceLength(old) == 2 and registry.isSliceMember(node, old)


def test_an_update_within_the_slice_keeps_the_active_time(market, registry, nodes):
    node = nodes[0]
    since = market.register(node, 0, 4).block_number
    registry.update(market.model_id, 0, 4, 99, b"\x02" * 32, ["http://a"], {"from": node})
    assert registry.getNode(node)["activeSince"] == since
    assert registry.sliceLength(registry.sliceKey(market.model_id, 0, 4)) == 1


def test_update_validates_like_register(market, registry, nodes, reverts_with):
    with reverts_with("NotRegistered"):
        registry.update(market.model_id, 0, 4, 1, KEY, ENDPOINTS, {"from": nodes[0]})
    market.register(nodes[0])
    with reverts_with("InvalidLayerRange"):
        registry.update(market.model_id, 0, 99, 1, KEY, ENDPOINTS, {"from": nodes[0]})


def test_pause_unpause(market, registry, nodes, reverts_with):
    node = nodes[0]
    with reverts_with("NotRegistered"):
        registry.pause({"from": node})
    market.register(node)
    with reverts_with("NotPaused"):
        registry.unpause({"from": node})
    assert "NodePaused" in registry.pause({"from": node}).events
    assert not registry.isListed(node)
    with reverts_with("AlreadyPaused"):
        registry.pause({"from": node})
    tx = registry.unpause({"from": node})
    assert "NodeUnpaused" in tx.events
    assert registry.isListed(node)
    assert registry.getNode(node)["activeSince"] == tx.block_number  # its active time in the slice starts again


def test_deregister_removes_everywhere(market, registry, nodes, reverts_with):
    a, b, c = nodes[:3]
    for node in (a, b, c):
        market.register(node)
    assert "NodeDeregistered" in registry.deregister({"from": a}).events
    with reverts_with("NotRegistered"):
        registry.getNode(a)
    assert not registry.isListed(a)
    model_id = market.model_id
    assert sorted(registry.modelNodes(model_id, 0, 10)) == sorted([b.address, c.address])
    key = registry.sliceKey(model_id, 0, 4)
    assert registry.sliceLength(key) == 3 and not registry.isSliceMember(a, key)
    with reverts_with("NotRegistered"):
        registry.deregister({"from": a})
    market.register(a, stake=0)  # can come back
    assert registry.modelNodeCount(model_id) == 3
    assert registry.sliceLength(key) == 3 and registry.isSliceMember(a, key)


def test_model_nodes_pages(market, registry, nodes, reverts_with):
    for node in nodes[:4]:
        market.register(node)
    model_id = market.model_id
    assert list(registry.modelNodes(model_id, 0, 3)) + list(registry.modelNodes(model_id, 3, 3)) == [n.address for n in nodes[:4]]
    assert list(registry.modelNodes(model_id, 10, 3)) == []
    with reverts_with("PageTooLarge"):
        registry.modelNodes(model_id, 0, 101)


def test_nodes_of_returns_whole_records_by_page(market, registry, stake_manager, nodes, reverts_with):
    for i, node in enumerate(nodes[:5]):
        market.register(node, i, i + 2, price=10 + i)
    stake_manager.unbond(1, {"from": nodes[1]})
    registry.pause({"from": nodes[2]})
    model_id = market.model_id
    page = list(registry.nodesOf(model_id, 0, 3)) + list(registry.nodesOf(model_id, 3, 3))
    assert [entry["operator"] for entry in page] == [n.address for n in nodes[:5]]
    assert [entry["listed"] for entry in page] == [True, False, False, True, True]
    for i, entry in enumerate(page):
        record = entry["node"]
        assert (record["layerStart"], record["layerEnd"], record["pricePerToken"]) == (i, i + 2, 10 + i)
        assert record["endpoints"] == registry.getNode(nodes[i])["endpoints"]
        assert record["encryptionKey"] == "0x" + KEY.hex()
    assert list(registry.nodesOf(model_id, 5, 3)) == []
    with reverts_with("PageTooLarge"):
        registry.nodesOf(model_id, 0, 101)
