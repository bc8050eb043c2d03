"""Deployments files: one JSON per chain id with each contract's address, read by nodes and clients."""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path


def deployments_path(chain_id: int, directory: Path) -> Path:
    return directory / f"{chain_id}.json"


def write_deployments(chain_id: int, addresses: dict[str, str], block: int, directory: Path) -> Path:
    """Atomically write the addresses deployed on `chain_id` (replacing an older deployment)."""
    path = deployments_path(chain_id, directory)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = {"chain_id": chain_id, "block": block, "contracts": addresses}
    with tempfile.NamedTemporaryFile("w", dir=path.parent, delete=False, suffix=".tmp") as tmp:
        json.dump(data, tmp, indent=2)
    os.replace(tmp.name, path)
    return path


def read_deployments(chain_id: int, directory: Path) -> dict[str, str]:
    """Addresses deployed on `chain_id`; a clear error says how to deploy when there are none."""
    path = deployments_path(chain_id, directory)
    try:
        return json.loads(path.read_text())["contracts"]
    except FileNotFoundError:
        raise FileNotFoundError(
            f"no deployment for chain {chain_id} at {path}: run `brownie run scripts/deploy.py --network NAME` first"
        ) from None
