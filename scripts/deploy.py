"""Deploy shardmarket's contracts on the active brownie network and write the deployments file.

    brownie run scripts/deploy.py [--network NAME]
"""

from brownie import TestToken, accounts, network

from node.chain.deployments import write_deployments

INITIAL_SUPPLY = 10**9 * 10**18


def main(deployer=None) -> dict:
    deployer = deployer or accounts[0]
    chain_id = network.chain.id
    print(f"deploying to chain {chain_id} from {deployer.address}")
    token = TestToken.deploy(INITIAL_SUPPLY, {"from": deployer})
    addresses = {"TestToken": token.address}
    path = write_deployments(chain_id, addresses, block=network.chain.height)
    print(f"deployed {', '.join(f'{k} at {v}' for k, v in addresses.items())}; wrote {path}")
    return addresses
