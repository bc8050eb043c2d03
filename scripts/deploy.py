"""Deploy shardmarket's contracts on the active brownie network and write the deployments file.

    brownie run scripts/deploy.py [--network NAME]

Wiring: the DisputeManager gets the StakeManager's SLASHER_ROLE, then the deployer renounces the admin
role, so no one else can ever slash. Slashed stake goes partly to the reporter, the rest to the treasury.
"""

from brownie import accounts, network, project

from shardmarket.chain.deployments import write_deployments
from shardmarket.config import load_config

INITIAL_SUPPLY = 10**9 * 10**18
DAY = 24 * 3600
UNBONDING_DELAY = 7 * DAY
WITHDRAWAL_TIMELOCK = DAY
MIN_STAKE = 100 * 10**18
DISPUTE_PARAMS = {
    "challengeBond": 10 * 10**18,
    "verifierCount": 3,
    "commitPeriod": 3600,
    "revealPeriod": 3600,
    "challengeWindow": 3 * DAY,  # < UNBONDING_DELAY: the margin bounds how stale a client's view of the registry may be
    "equivocationSlashBps": 10_000,
    "wrongOutputSlashBps": 5_000,
    "rewardBps": 5_000,
    "absentVerifierPenalty": 1 * 10**18,
}


def main(deployer=None, token=None, treasury=None) -> dict:
    """Deploy every contract (and a TestToken unless `token` is given); returns name -> address."""
    if deployer is None:
        if not accounts:
            raise SystemExit("no account to deploy from: load one with `accounts.load(...)` or pass main(deployer)")
        deployer = accounts[0]
    contracts = _loaded_project()
    tx = {"from": deployer}
    chain_id = network.chain.id
    print(f"deploying to chain {chain_id} from {deployer.address}")
    if token is None:
        token = contracts.TestToken.deploy(INITIAL_SUPPLY, tx)
    treasury = treasury or deployer.address
    stake = contracts.StakeManager.deploy(token, UNBONDING_DELAY, deployer, tx)
    models = contracts.ModelRegistry.deploy(tx)
    registry = contracts.NodeRegistry.deploy(stake, models, MIN_STAKE, tx)
    escrow = contracts.PaymentEscrow.deploy(token, WITHDRAWAL_TIMELOCK, tx)
    disputes = contracts.DisputeManager.deploy(stake, registry, treasury, tuple(DISPUTE_PARAMS.values()), tx)
    stake.grantRole(stake.SLASHER_ROLE(), disputes, tx)
    stake.renounceRole(stake.DEFAULT_ADMIN_ROLE(), deployer, tx)
    addresses = {
        "TestToken": str(token),
        "StakeManager": stake.address,
        "ModelRegistry": models.address,
        "NodeRegistry": registry.address,
        "PaymentEscrow": escrow.address,
        "DisputeManager": disputes.address,
        "Treasury": str(treasury),
    }
    path = write_deployments(chain_id, addresses, network.chain.height, load_config().chain.deployments_dir)
    print(f"deployed {', '.join(f'{k} at {v}' for k, v in addresses.items())}; wrote {path}")
    return addresses


def _loaded_project():
    loaded = project.get_loaded_projects()
    if not loaded:
        raise SystemExit("no brownie project is loaded: run `brownie run scripts/deploy.py` from the repository root")
    return loaded[0]
