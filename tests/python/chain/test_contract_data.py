"""Contract data read by name: the Python enums are the compiled contracts' enums (member names and order) and
eip712's packed-tab layout is PackedTab.sol's (from solc's AST in brownie's build folder); on a real anvil with the
contracts deployed, a struct, or several named return values, comes back as a named tuple, the commands that show it
read the right fields, and a tab packed in Python is what the escrow settles."""

from __future__ import annotations

import json
import re
from enum import IntEnum

import pytest
from eth_account import Account
from web3.logs import DISCARD

from shardmarket.chain import eip712
from shardmarket.chain.contracts import BUILD_DIR, DisputeStatus, Market, Rejection
from shardmarket.chain.keys import load_account
from shardmarket.cli.devmarket import PASSWORD, DevMarket
from shardmarket.cli.keys import home_keys
from shardmarket.config import load_config

STAKE = 100 * 10**18  # scripts/deploy.py's MIN_STAKE
MODEL = "by-name"
ENUMS = {("DisputeManager", "Status"): DisputeStatus, ("PaymentEscrow", "Rejection"): Rejection}
REPO = BUILD_DIR.parents[1]


def contract_ast(name: str) -> dict:
    """The AST node of contract `name` as compiled into the build folder, which must match its source."""
    build = json.loads((BUILD_DIR / f"{name}.json").read_text())
    if build["source"] != (REPO / build["sourcePath"]).read_text():
        pytest.fail(f"build/contracts/{name}.json is older than {build['sourcePath']}: run `brownie compile`")
    return next(n for n in build["ast"]["nodes"] if n["nodeType"] == "ContractDefinition" and n["name"] == name)


@pytest.mark.parametrize(("contract", "enum"), ENUMS, ids=[f"{c}.{e}" for c, e in ENUMS])
def test_python_enums_are_the_solidity_enums(contract: str, enum: str):
    python = ENUMS[contract, enum]
    definition = next(n for n in contract_ast(contract)["nodes"] if n["nodeType"] == "EnumDefinition" and n["name"] == enum)
    solidity = [(re.sub(r"(?<!^)(?=[A-Z])", "_", m["name"]).upper(), value) for value, m in enumerate(definition["members"])]
    assert issubclass(python, IntEnum) and [(m.name, m.value) for m in python] == solidity


def test_the_packed_tab_layout_is_the_escrows():
    """contracts/PackedTab.sol's file-level constants are eip712's."""
    build = json.loads((BUILD_DIR / "PackedTab.json").read_text())
    if build["source"] != (REPO / build["sourcePath"]).read_text():
        pytest.fail(f"build/contracts/PackedTab.json is older than {build['sourcePath']}: run `brownie compile`")
    prefixes = ("TAB_", "ENTRY_", "PAID_", "MAX_")
    solidity = {
        n["name"]: int(n["value"]["value"])
        for n in build["ast"]["nodes"]
        if n["nodeType"] == "VariableDeclaration" and n["constant"] and n["value"]["nodeType"] == "Literal"
    }
    python = {name: value for name, value in vars(eip712).items() if name.startswith(prefixes) and type(value) is int}
    assert python == solidity and {"TAB_HEADER_BYTES", "ENTRY_BYTES", "PAID_BYTES", "MAX_ENTRIES"} <= python.keys()


@pytest.fixture(scope="module")
def market(tmp_path_factory):
    market = DevMarket(tmp_path_factory.mktemp("chain"))
    try:
        market.start_chain()
        market.new_account("operator", tokens=2 * STAKE)
        yield market
    finally:
        market.stop()


@pytest.fixture(scope="module")
def chain(market) -> Market:
    """The deployed contracts, with the operator's account sending the transactions."""
    with market.acting_as("operator"):
        return Market.connect(load_config().chain, load_account(PASSWORD, home_keys()))


def test_structs_and_named_return_values_are_read_by_name(market, chain, capsys):
    me = chain.address
    chain.transact(chain.models.functions.registerModel(MODEL, "bafyname", 6, b"\x01" * 32), "publishing")
    model = chain.read(chain.models.functions.getModel(chain.model_id(MODEL)))
    assert (model.publisher, model.layerCount, model.configHash, model.name, model.manifestCid) == (
        me,
        6,
        b"\x01" * 32,
        MODEL,
        "bafyname",
    )
    market.cli("operator", "node", "register", "--model", MODEL, "--layers", "2:5", "--price", "7raw", "--stake", "100")
    stake = chain.read(chain.stake.functions.stakeOf(me))
    assert (stake.bonded, stake.unbonding, stake.unbondReadyAt, stake.locks) == (STAKE, 0, 0, 0)
    market.cli("operator", "node", "update", "--price", "9raw")
    node = chain.read(chain.registry.functions.getNode(me))
    assert (node.registered, node.paused, node.layerStart, node.layerEnd, node.pricePerToken) == (True, False, 2, 5, 9)
    assert node.modelId == chain.model_id(MODEL) and len(node.encryptionKey) == 32 and len(node.endpoints) == 1
    capsys.readouterr()
    market.cli("operator", "node", "status")
    out = capsys.readouterr().out
    assert "stake: bonded 100 SMT, unbonding 0 SMT (ready at 0), dispute locks 0" in out
    assert f"serving layers 2:5 of {MODEL} at 0.000000000000000009 SMT per token on {node.endpoints[0]}; listed" in out
    chain.transact(chain.token.functions.approve(chain.addresses["PaymentEscrow"], 50), "approving the deposit")
    chain.transact(chain.escrow.functions.deposit(me, 50), "depositing")
    chain.transact(chain.escrow.functions.requestWithdrawal(20), "requesting a withdrawal")
    withdrawal = chain.read(chain.escrow.functions.pendingWithdrawalOf(me))
    assert withdrawal.amount == 20 and withdrawal.readyAt > 0
    market.cli("operator", "client", "balance")
    assert (
        f"withdrawal of 0.00000000000000002 SMT requested, possible from timestamp {withdrawal.readyAt}"
        in capsys.readouterr().out
    )
    payee = Account.create().address
    market.cli("operator", "client", "reserve", payee, "7raw")
    market.cli("operator", "client", "release", payee)
    reserve = chain.read(chain.escrow.functions.reserveOf(me, payee))
    assert reserve.amount == 7 and reserve.releaseAt > 0
    capsys.readouterr()
    market.cli("operator", "client", "balance")
    out = capsys.readouterr().out
    assert (
        "escrow balance 0.000000000000000043 SMT" in out
        and f"reserve for node {payee}: 0.000000000000000007 SMT, released from timestamp {reserve.releaseAt}" in out
    )
    market.cli("operator", "client", "balance", "--raw")  # for programs: raw base units
    out = capsys.readouterr().out
    assert "escrow balance 43, spendable" in out and f"reserve for node {payee}: 7, released" in out


def test_a_tab_packed_in_python_is_what_the_escrow_settles(chain):
    """Every field the escrow reads from a packed tab (the signature covers the client, seq, entries and usage hash):
    a first tab, then a newer one over the paid vector, settled in one call and read back from its calldata."""
    client = Account.create()
    nodes = sorted((Account.create().address for _ in range(3)), key=lambda a: int(a, 16))
    chain.transact(chain.token.functions.approve(chain.addresses["PaymentEscrow"], 10**6), "approving the deposit")
    chain.transact(chain.escrow.functions.deposit(client.address, 10**6), "depositing")
    domain = chain.escrow_domain()

    def settle(seq: int, amounts: tuple[int, ...], paid: tuple[eip712.Entry, ...]):
        tab = eip712.Tab(
            client.address, seq, tuple(eip712.Entry(n, a) for n, a in zip(nodes, amounts, strict=True)), bytes(range(32))
        )
        packed = eip712.pack_tab(tab, eip712.sign_tab(client.key, tab, domain), paid)
        receipt = chain.transact(chain.escrow.functions.settleTabs(packed), "settling")
        [settled] = chain.escrow.events.TabSettled().process_receipt(receipt, errors=DISCARD)
        assert not chain.escrow.events.TabRejected().process_receipt(receipt, errors=DISCARD)
        return tab, packed, receipt, settled["args"]

    first, _, _, args = settle(7, (1, 2, 3), ())
    assert (args["client"], args["seq"], eip712.unpack_entries(args["paid"])) == (client.address, 7, first.entries)
    newer, packed, receipt, args = settle(8, (4, 5, 6), first.entries)
    assert (args["seq"], eip712.unpack_entries(args["paid"])) == (8, newer.entries)
    settled = chain.read(chain.escrow.functions.tabOf(client.address))
    assert (settled.seq, settled.paidHash) == (8, eip712.paid_vector_hash(newer.entries))
    assert chain.read(chain.escrow.functions.paidVectorHash(eip712.pack_entries(newer.entries))) == settled.paidHash
    assert [chain.read(chain.escrow.functions.earningsOf(n)) for n in nodes] == [4, 5, 6]
    _, call = chain.escrow.decode_function_input(chain.w3.eth.get_transaction(receipt["transactionHash"])["input"])
    assert eip712.split_packed_tabs(call["tabs"]) == [packed]
    assert eip712.unpack_tab(packed)[0] == newer


def test_threads_sending_from_one_account_each_get_their_own_nonce(market, chain):
    """A client sends from one account in several threads at once (its background reserve funding, its auditor's
    report): every transaction lands, none is refused for a nonce another thread took."""
    from concurrent.futures import ThreadPoolExecutor

    with market.acting_as("operator"):
        others = [Market.connect(load_config().chain, load_account(PASSWORD, home_keys())) for _ in range(4)]
    payees = [Account.create().address for _ in range(8)]

    def pay(i: int) -> int:
        sender = others[i % len(others)]
        return sender.transact(sender.token.functions.transfer(payees[i], i + 1), f"payment {i}")["status"]

    with ThreadPoolExecutor(len(payees)) as pool:
        assert list(pool.map(pay, range(len(payees)))) == [1] * len(payees)
    assert [chain.read(chain.token.functions.balanceOf(p)) for p in payees] == list(range(1, len(payees) + 1))
