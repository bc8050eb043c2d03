"""Gas of shardmarket's on-chain hot paths on a fresh anvil: register, stake, settleTabs, claim, reserves, disputes.

    .venv/bin/python bench/gas.py

settleTabs is measured for 1 client x 3 nodes and for batches of 5 and 100 clients (each tab naming the same
3 nodes), twice each: fresh (the nodes' earnings slots go from zero to non-zero, 20,000 gas the EVM charges
once per node, and the clients' paid vectors are empty) and warm (the steady state: every client's newer tab
settled again over its stored paid vector). The baseline, measured in the same run, is what paying each node on chain
without tabs costs: one warm ERC-20 transfer per (client, node) payment.

claim (a node collecting what an older tab promised it, here after the client settled a tab lowering its entry) is
measured for tabs naming 3 and MAX_ENTRIES nodes; its baseline is the warm settleTabs of one client (what the node
would have paid to settle an honest tab). Then a client funds reserves for the 3 nodes of a route (once per client
and node, not per request), drains its balance to an alias with a newer tab, and a node claims its older tab out of
its reserve.

A wrong-output dispute is measured through its life (challenge, drawPanel seating 3 of a 5-node slice, a vote's
reveal, resolve slashing the node, the challenger's withdrawCredit), then an equivocation slash.
"""

import json
import os
import sys
import tempfile
from pathlib import Path

from eth_account import Account
from tqdm import tqdm

ROOT = Path(__file__).resolve().parent.parent
TOKEN = 10**18
BATCH_SIZES = (1, 5, 100)
NODES_PER_TAB = 3


def main() -> dict:
    import brownie
    from brownie import network, project
    from brownie._config import CONFIG

    sys.path.insert(0, str(ROOT))
    from shardmarket.chain import eip712
    from shardmarket.chain.devchain import BROWNIE_NETWORK, free_port, wait_for_receipts

    proj = project.load(ROOT, name="ShardmarketGas")
    # a fresh anvil of the bench's own: on a port in use (8545 serves every test run) brownie attaches to that chain,
    # where another sender from accounts[0] races the bench's nonces (tx dropped, nonce too low) and skews the figures
    CONFIG.networks[BROWNIE_NETWORK]["cmd_settings"]["port"] = free_port()
    network.connect(BROWNIE_NETWORK)
    try:
        if not network.rpc.is_child():
            raise RuntimeError("bench/gas.py could not start its own anvil (its port was taken meanwhile): run it again")
        wait_for_receipts(brownie.web3)
        os.environ["SHARDMARKET_HOME"] = tempfile.mkdtemp(prefix="shardmarket-gas-")
        from scripts import deploy

        owner = brownie.accounts[0]
        addresses = deploy.main(owner)
        token = proj.TestToken.at(addresses["TestToken"])
        stake = proj.StakeManager.at(addresses["StakeManager"])
        models = proj.ModelRegistry.at(addresses["ModelRegistry"])
        registry = proj.NodeRegistry.at(addresses["NodeRegistry"])
        escrow = proj.PaymentEscrow.at(addresses["PaymentEscrow"])
        escrow_domain = eip712.Domain(brownie.chain.id, escrow.address)

        node = brownie.accounts.add(Account.from_key(b"\x42" * 32).key.hex())
        owner.transfer(node, TOKEN)
        token.transfer(node, 1000 * TOKEN, {"from": owner})
        token.approve(stake, 1000 * TOKEN, {"from": node})
        figures = {"stake_gas": stake.stake(1000 * TOKEN, {"from": node}).gas_used}
        models.registerModel("bench-model", "bafybench", 32, b"\x01" * 32, {"from": owner})
        model_id = models.modelIdOf("bench-model")
        tx = registry.register(model_id, 0, 16, 10, b"\x01" * 32, ["http://203.0.113.7:7300"], {"from": node})
        figures["register_gas"] = tx.gas_used

        clients = [Account.from_key((0xC0FFEE00 + i).to_bytes(32, "big")) for i in range(sum(BATCH_SIZES) + 2)]
        token.approve(escrow, 2**255, {"from": owner})
        for client in tqdm(clients, desc="deposits", leave=False):
            escrow.deposit(client.address, 1000 * TOKEN, {"from": owner})

        def item(client, nodes, amount, seq, previous):
            entries = tuple(eip712.Entry(n, amount) for n in sorted(nodes, key=lambda a: int(a, 16)))
            tab = eip712.Tab(client.address, seq, entries, os.urandom(32))
            return eip712.pack_tab(tab, eip712.sign_tab(client.key, tab, escrow_domain), previous)

        def settle(batch_clients, nodes, amount, seq, previous):
            tx = escrow.settleTabs(b"".join(item(c, nodes, amount, seq, previous) for c in batch_clients), {"from": owner})
            assert "TabRejected" not in tx.events, "a bench tab was rejected"
            return tx.gas_used, eip712.unpack_entries(bytes(tx.events["TabSettled"][0]["paid"]))

        first = 0
        for size in tqdm(BATCH_SIZES, desc="batches", leave=False):
            group, first = clients[first : first + size], first + size
            nodes = [Account.create().address for _ in range(NODES_PER_TAB)]
            fresh, paid = settle(group, nodes, TOKEN, 1, ())
            warm, _ = settle(group, nodes, 2 * TOKEN, 2, paid)
            figures[f"settle_{size}_clients_fresh_gas"] = fresh
            figures[f"settle_{size}_clients_warm_gas"] = warm
            figures[f"settle_{size}_clients_warm_gas_per_client"] = warm // size
            figures[f"settle_{size}_clients_warm_gas_per_entry"] = warm // (size * NODES_PER_TAB)
        payee = Account.create().address
        token.transfer(payee, 1, {"from": owner})  # warm: the payee's balance slot is already non-zero
        figures["token_transfer_warm_gas"] = token.transfer(payee, TOKEN, {"from": owner}).gas_used
        figures["batch_100_per_entry_vs_transfer_ratio"] = round(
            figures["settle_100_clients_warm_gas_per_entry"] / figures["token_transfer_warm_gas"], 3
        )

        for size, client in zip((NODES_PER_TAB, eip712.MAX_ENTRIES), clients[first : first + 2], strict=True):
            nodes = sorted((Account.create().address for _ in range(size)), key=lambda a: int(a, 16))
            older = item(client, nodes, 2 * TOKEN, 1, ())
            lowering = eip712.Tab(client.address, 2, tuple(eip712.Entry(n, TOKEN) for n in nodes), os.urandom(32))
            signed = eip712.pack_tab(lowering, eip712.sign_tab(client.key, lowering, escrow_domain))
            tx = escrow.settleTabs(signed, {"from": owner})
            paid = eip712.pack_entries(eip712.unpack_entries(bytes(tx.events["TabSettled"]["paid"])))
            tx = escrow.claim(nodes[-1], older, paid, {"from": owner})
            assert tx.return_value == TOKEN, "the bench claim did not pay the lowered difference"
            figures[f"claim_{size}_nodes_gas"] = tx.gas_used
        figures["claim_3_nodes_vs_settle_1_client_warm_ratio"] = round(
            figures["claim_3_nodes_gas"] / figures["settle_1_clients_warm_gas"], 3
        )
        # the alias drain: the client's newer tab pays an alias its whole balance; the node holding the older tab is paid
        # out of the reserve the client set aside for it
        client = Account.from_key(b"\x43" * 32)
        sender = brownie.accounts.add(client.key.hex())
        owner.transfer(sender, TOKEN)
        escrow.deposit(client.address, 10 * TOKEN, {"from": owner})
        node_address, alias = sorted((Account.create().address for _ in range(2)), key=lambda a: int(a, 16), reverse=True)
        route = [node_address, *(Account.create().address for _ in range(NODES_PER_TAB - 1))]
        tx = escrow.fundReserves(route, [2 * TOKEN] * NODES_PER_TAB, {"from": sender})
        figures[f"fund_reserves_{NODES_PER_TAB}_nodes_gas"] = tx.gas_used  # once per client and route, not per request
        acknowledged = item(client, [node_address], 2 * TOKEN, 1, ())
        drained = escrow.settleTabs(item(client, [alias, node_address], 8 * TOKEN, 2, ()), {"from": owner})
        paid = eip712.pack_entries(eip712.unpack_entries(bytes(drained.events["TabSettled"]["paid"])))
        tx = escrow.claim(node_address, acknowledged, paid, {"from": owner})
        assert tx.events["Claimed"]["fromReserve"] == 2 * TOKEN, "the bench claim did not draw on the reserve"
        figures["claim_from_reserve_gas"] = tx.gas_used

        figures.update(dispute_gas(brownie, proj, addresses, owner, node, model_id))
        return figures
    finally:
        network.disconnect()


def dispute_gas(brownie, proj, addresses: dict, owner, accused, model_id: bytes) -> dict:
    """Gas of a wrong-output challenge, its panel draw (3 verifiers from a slice of 5), a vote's reveal, resolve and the
    challenger's withdrawal of its credit, then of an equivocation slash."""
    from scripts.deploy import DISPUTE_PARAMS
    from shardmarket.chain import eip712

    token = proj.TestToken.at(addresses["TestToken"])
    stake = proj.StakeManager.at(addresses["StakeManager"])
    registry = proj.NodeRegistry.at(addresses["NodeRegistry"])
    disputes = proj.DisputeManager.at(addresses["DisputeManager"])
    domain = eip712.Domain(brownie.chain.id, disputes.address)
    for i in range(4):  # the accused already serves [0, 16)
        verifier = brownie.accounts.add(Account.from_key(bytes([0x50 + i]) * 32).key.hex())
        owner.transfer(verifier, TOKEN)
        token.transfer(verifier, 1000 * TOKEN, {"from": owner})
        token.approve(stake, 1000 * TOKEN, {"from": verifier})
        stake.stake(1000 * TOKEN, {"from": verifier})
        registry.register(model_id, 0, 16, 10, b"\x01" * 32, [f"http://203.0.113.{i}:7300"], {"from": verifier})

    def commitment(output: int) -> tuple[tuple, bytes]:
        context = eip712.StepContext(model_id, 0, 16, b"\x22" * 32, b"\x23" * 32, 3, 9, b"\x24" * 32, b"\x33" * 32)
        signed = eip712.Commitment(context, bytes([output]) * 32, brownie.chain.time())
        return signed.as_tuple(), eip712.sign_commitment(accused.private_key, signed, domain)

    figures = {}
    token.approve(disputes, DISPUTE_PARAMS["challengeBond"], {"from": owner})
    tx = disputes.challenge(accused, *commitment(1), "ipfs://bafybench", {"from": owner})
    figures["challenge_gas"] = tx.gas_used
    dispute_id = tx.return_value
    tx = disputes.drawPanel(dispute_id, {"from": owner})
    figures["draw_panel_gas"] = tx.gas_used
    verifiers = [brownie.accounts.at(v) for v in tx.events["PanelDrawn"]["verifiers"]]
    salt = b"\x05" * 32
    for verifier in verifiers:
        disputes.commitVote(dispute_id, disputes.voteHash(dispute_id, verifier, True, salt), {"from": verifier})
    figures["reveal_vote_gas"] = max(disputes.revealVote(dispute_id, True, salt, {"from": v}).gas_used for v in verifiers)
    figures["resolve_slash_gas"] = disputes.resolve(dispute_id, {"from": owner}).gas_used
    figures["withdraw_credit_gas"] = disputes.withdrawCredit(owner, {"from": owner}).gas_used
    (a, signature_a), (b, signature_b) = commitment(1), commitment(2)
    figures["equivocation_slash_gas"] = disputes.slashEquivocation(a, signature_a, b, signature_b, {"from": owner}).gas_used
    return figures


if __name__ == "__main__":
    print(json.dumps(main()))
