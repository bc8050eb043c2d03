import json
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[3]
HERE = Path(__file__).parent


@pytest.fixture(autouse=True)
def home(tmp_path, monkeypatch):
    """Every test gets its own SHARDMARKET_HOME and no Kubo API."""
    monkeypatch.setenv("SHARDMARKET_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("SHARDMARKET_IPFS_API", raising=False)
    monkeypatch.delenv("SHARDMARKET_IPFS_GATEWAYS", raising=False)
    return tmp_path / "home"


@pytest.fixture
def js_import():
    """Root CIDs from npm's ipfs-unixfs-importer for each job {path, cidVersion, rawLeaves, chunkSize}."""
    return _js_import


def _js_import(jobs: list[dict]) -> list[str]:
    if not (ROOT / "node_modules" / "ipfs-unixfs-importer").exists() or not shutil.which("node"):
        pytest.fail("npm's ipfs-unixfs-importer is missing: run `make setup`")
    out = subprocess.run(
        ["node", str(HERE / "js_import.mjs")],
        input=json.dumps(jobs),
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=300,
        check=True,
    ).stdout
    return out.split()
