"""Gas of shardmarket's on-chain hot paths on a fresh anvil: register, stake, redeem, batched redeem, slash.

    .venv/bin/python bench/gas.py

Batches are measured twice: on new (client, node) channels (a storage slot goes from zero to non-zero,
20,000 gas the EVM charges once per channel) and on existing channels (the steady state of a node that
redeems every client's newest receipt again and again). The baseline is N single redeems.
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
BATCH_SIZES = (1, 10, 100)


def main() -> dict:
    import brownie
    from brownie import network, project

    sys.path.insert(0, str(ROOT))
    from node.chain import eip712

    proj = project.load(ROOT, name="ShardmarketGas")
    network.connect("shardmarket-anvil")
    try:
        os.environ["SHARDMARKET_HOME"] = tempfile.mkdtemp(prefix="shardmarket-gas-")
        from scripts import deploy

        owner = brownie.accounts[0]
        addresses = deploy.main(owner)
        token = proj.TestToken.at(addresses["TestToken"])
        stake = proj.StakeManager.at(addresses["StakeManager"])
        models = proj.ModelRegistry.at(addresses["ModelRegistry"])
        registry = proj.NodeRegistry.at(addresses["NodeRegistry"])
        escrow = proj.PaymentEscrow.at(addresses["PaymentEscrow"])
        disputes = proj.DisputeManager.at(addresses["DisputeManager"])
        escrow_domain = eip712.Domain(brownie.chain.id, escrow.address)
        dispute_domain = eip712.Domain(brownie.chain.id, disputes.address)

        node = brownie.accounts.add(Account.from_key(b"\x42" * 32).key.hex())
        owner.transfer(node, TOKEN)
        token.transfer(node, 1000 * TOKEN, {"from": owner})
        token.approve(stake, 1000 * TOKEN, {"from": node})
        figures = {"stake_gas": stake.stake(1000 * TOKEN, {"from": node}).gas_used}
        models.registerModel("bench-model", "bafybench", 32, b"\x01" * 32, {"from": owner})
        model_id = models.modelIdOf("bench-model")
        tx = registry.register(model_id, 0, 16, 10, b"\x01" * 32, ["http://203.0.113.7:7300"], {"from": node})
        figures["register_gas"] = tx.gas_used

        clients = [Account.from_key((0xC0FFEE00 + i).to_bytes(32, "big")) for i in range(max(BATCH_SIZES) + 1)]
        token.approve(escrow, 2**255, {"from": owner})
        for client in tqdm(clients, desc="deposits", leave=False):
            escrow.deposit(client.address, 1000 * TOKEN, {"from": owner})

        def signed(client, amount):
            receipt = eip712.Receipt(client.address, node.address, amount, b"\x11" * 32, amount)
            signature = eip712.sign_receipt(client.key, receipt, escrow_domain)
            return receipt, signature

        def redeem_one(client, amount):
            receipt, sig = signed(client, amount)
            return escrow.redeem(receipt.client, receipt.node, amount, receipt.usage_hash, receipt.nonce, sig,
                                 {"from": node}).gas_used

        def redeem_batch(batch_clients, amount):
            items = []
            for client in batch_clients:
                receipt, sig = signed(client, amount)
                items.append((receipt.client, amount, receipt.usage_hash, receipt.nonce, *eip712.split_signature(sig)))
            tx = escrow.redeemBatch(node, items, {"from": node})
            assert tx.events["BatchRedeemed"]["redeemed"] == len(batch_clients), "a bench receipt was rejected"
            return tx.gas_used

        single = clients[-1]
        figures["redeem_one_new_channel_gas"] = redeem_one(single, TOKEN)
        figures["redeem_one_gas"] = redeem_one(single, 2 * TOKEN)
        for size in tqdm(BATCH_SIZES, desc="batches", leave=False):
            group = clients[:size]
            first = redeem_batch(group, 10 * TOKEN * size)
            again = redeem_batch(group, 10 * TOKEN * size + TOKEN)
            figures[f"batch_{size}_new_channels_gas_per_receipt"] = first // size
            figures[f"batch_{size}_gas_per_receipt"] = again // size
            figures[f"batch_{size}_vs_single_redeems_ratio"] = round(again / (size * figures["redeem_one_gas"]), 3)

        commitments = [eip712.Commitment(b"\x22" * 32, 3, b"\x33" * 32, bytes([o]) * 32) for o in (1, 2)]
        signatures = [eip712.sign_commitment(node.private_key, c, dispute_domain) for c in commitments]
        args = [((c.request_id, c.step, c.input_hash, c.output_hash), s) for c, s in zip(commitments, signatures)]
        tx = disputes.slashEquivocation(args[0][0], args[0][1], args[1][0], args[1][1], {"from": owner})
        figures["equivocation_slash_gas"] = tx.gas_used
        figures["goal_redeem_one_gas"] = 60_000
        figures["goal_batch_100_gas_per_receipt"] = 25_000
        return figures
    finally:
        network.disconnect()


if __name__ == "__main__":
    print(json.dumps(main()))
