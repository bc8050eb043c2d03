"""Add (or refresh) the brownie network `shardmarket-anvil`: a project-started anvil with base fee 0."""

import yaml
from brownie._config import _get_data_folder

NETWORK = {
    "name": "shardmarket anvil",
    "id": "shardmarket-anvil",
    "cmd": "anvil",
    "host": "http://127.0.0.1",
    "timeout": 120,
    "cmd_settings": {
        "port": 8545,
        "accounts": 10,
        "chain_id": 31337,
        "base_fee": 0,
        "gas_limit": 30000000,
        "default_balance": 10000,
    },
}


def main() -> None:
    path = _get_data_folder() / "network-config.yaml"
    networks = yaml.safe_load(path.read_text())
    development = [n for n in networks["development"] if n["id"] != NETWORK["id"]]
    networks["development"] = [*development, NETWORK]
    path.write_text(yaml.dump(networks))
    print(f"brownie network '{NETWORK['id']}' (anvil on port {NETWORK['cmd_settings']['port']}, base fee 0) is in {path}")


if __name__ == "__main__":
    main()
