import brownie
import pytest
from eth_account import Account

from shardmarket.chain import eip712
from shardmarket.chain.devchain import wait_for_receipts

TOKEN = 10**18
KEYED_ACCOUNTS = 10


@pytest.fixture(scope="session", autouse=True)
def receipts_before_nonces(web3):
    """Every transaction waits for its receipt: anvil shows a sender's new nonce before the receipt, which brownie
    takes for a dropped transaction (`Tx dropped without known replacement`)."""
    wait_for_receipts(web3)


@pytest.fixture(autouse=True)
def isolate(fn_isolation):
    """Every test starts from the same chain state."""


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def deployment(accounts, tmp_path_factory, monkeypatch_module):
    from scripts import deploy

    monkeypatch_module.setenv("SHARDMARKET_HOME", str(tmp_path_factory.mktemp("home")))
    return deploy.main(accounts[0], treasury=accounts[9])


@pytest.fixture(scope="module")
def token(deployment, TestToken):
    return TestToken.at(deployment["TestToken"])


@pytest.fixture(scope="module")
def stake_manager(deployment, StakeManager):
    return StakeManager.at(deployment["StakeManager"])


@pytest.fixture(scope="module")
def models(deployment, ModelRegistry):
    return ModelRegistry.at(deployment["ModelRegistry"])


@pytest.fixture(scope="module")
def registry(deployment, NodeRegistry):
    return NodeRegistry.at(deployment["NodeRegistry"])


@pytest.fixture(scope="module")
def escrow(deployment, PaymentEscrow):
    return PaymentEscrow.at(deployment["PaymentEscrow"])


@pytest.fixture(scope="module")
def disputes(deployment, DisputeManager):
    return DisputeManager.at(deployment["DisputeManager"])


@pytest.fixture(scope="module")
def treasury(accounts):
    return accounts[9]


@pytest.fixture(scope="module")
def keyed(accounts):
    """Accounts whose private keys the tests hold (to sign receipts and commitments), with ETH for gas."""
    out = []
    for i in range(KEYED_ACCOUNTS):
        account = accounts.add(Account.from_key((0x5EED0000 + i).to_bytes(32, "big")).key.hex())
        accounts[0].transfer(account, 10**18)
        out.append(account)
    return out


@pytest.fixture(scope="module")
def clients(keyed):
    return keyed[:3]


@pytest.fixture(scope="module")
def nodes(keyed):
    return keyed[3:]


@pytest.fixture(scope="module")
def market(deployment, token, stake_manager, models, registry, escrow, disputes, accounts):
    return Market(token, stake_manager, models, registry, escrow, disputes, accounts[0])


class Market:
    """Test-side driver of a deployed market: funding, staking, registering, signing."""

    MODEL = "tiny-llama"
    LAYERS = 8

    def __init__(self, token, stake_manager, models, registry, escrow, disputes, owner):
        self.token, self.stake, self.models, self.registry = token, stake_manager, models, registry
        self.escrow, self.disputes, self.owner = escrow, disputes, owner
        self.escrow_domain = eip712.Domain(31337, escrow.address)
        self.dispute_domain = eip712.Domain(31337, disputes.address)
        models.registerModel(
            self.MODEL, "bafybeigdyrzt5sfp7udm7hu76uh7y26nf3efuylqabf3oclgtqy55fbzdi", self.LAYERS, b"\x07" * 32, {"from": owner}
        )
        self.model_id = models.modelIdOf(self.MODEL)

    def fund(self, account, amount):
        self.token.transfer(account, amount, {"from": self.owner})

    def stake_for(self, node, amount):
        self.fund(node, amount)
        self.token.approve(self.stake, amount, {"from": node})
        return self.stake.stake(amount, {"from": node})

    def register(self, node, start=0, end=4, price=10, stake=100 * TOKEN):
        if stake:
            self.stake_for(node, stake)
        return self.registry.register(
            self.model_id, start, end, price, b"\x01" * 32, [f"http://{node.address[:10].lower()}.example:7300"], {"from": node}
        )

    def deposit(self, client, amount):
        self.fund(client, amount)
        self.token.approve(self.escrow, amount, {"from": client})
        return self.escrow.deposit(client, amount, {"from": client})

    def tab(self, client, amounts, seq=1, domain=None, signer=None, usage=b"\x11" * 32):
        """(eip712.Tab, signature) for `amounts` {node: cumulative amount}, signed by `signer` (default: the client)."""
        entries = tuple(
            eip712.Entry(n.address if hasattr(n, "address") else n, a)
            for n, a in sorted(amounts.items(), key=lambda item: int(str(item[0]), 16))
        )
        tab = eip712.Tab(client.address, seq, entries, usage)
        key = (signer or client).private_key
        return tab, eip712.sign_tab(key, tab, domain or self.escrow_domain)

    @staticmethod
    def item(tab, signature, previous=()):
        """One packed tab for settleTabs: the signed tab and the client's current paid vector."""
        return eip712.pack_tab(tab, signature, tuple(previous))

    def fund_reserves(self, client, amounts):
        """`client` sets aside `amounts` {node: tokens} of its balance for those nodes."""
        nodes = list(amounts)
        return self.escrow.fundReserves(nodes, [amounts[n] for n in nodes], {"from": client})

    def claim(self, node, signed_tab, paid, sender):
        """`sender` claims for `node` what the signed tab (tab, signature) promised it, over paid vector `paid`."""
        return self.escrow.claim(node, eip712.pack_tab(*signed_tab), eip712.pack_entries(tuple(paid)), {"from": sender})

    @staticmethod
    def claimed_vector(tx):
        """The paid vector a claim left (its Claimed event's)."""
        return eip712.unpack_entries(event_bytes(tx.events["Claimed"]["paid"]))

    def settle(self, items, sender):
        return self.escrow.settleTabs(b"".join(items), {"from": sender})

    @staticmethod
    def paid_vector(tx, client):
        """The paid vector of `client` from the last TabSettled of `tx` (() if none)."""
        events = [e for e in tx.events["TabSettled"] if e["client"] == client] if "TabSettled" in tx.events else []
        return eip712.unpack_entries(event_bytes(events[-1]["paid"])) if events else ()

    def commitment(
        self,
        node,
        request=b"\x22" * 32,
        step=0,
        output=b"\x44" * 32,
        inp=b"\x33" * 32,
        *,
        layers=(0, 4),
        nonce=b"\x55" * 32,
        position=0,
        history=eip712.EMPTY_HISTORY,
        issued_at=None,
        model_id=None,
    ):
        """(ABI tuple, signature) of a commitment `node` signs: by default step 0 of a session on layers [0, 4), now."""
        context = eip712.StepContext(bytes(model_id or self.model_id), *layers, request, nonce, step, position, history, inp)
        commitment = eip712.Commitment(context, output, brownie.chain.time() if issued_at is None else issued_at)
        return commitment.as_tuple(), eip712.sign_commitment(node.private_key, commitment, self.dispute_domain)


@pytest.fixture
def reverts_with():
    """`with reverts_with("ErrorName"):` expects a revert with that custom error."""
    import brownie

    return lambda name: brownie.reverts(revert_pattern=rf"{name}(: .*)?")


def event_bytes(value) -> bytes:
    """A `bytes` field of an event as brownie decoded it; brownie shows an empty one as 0x00, which no paid vector
    (a multiple of 36 bytes) can be."""
    data = bytes(value)
    return b"" if data == b"\x00" else data
