"""Fixtures of the network tests: the models the node processes serve."""

from __future__ import annotations

from pathlib import Path

import pytest

from shardmarket.engine.models import default_model, random_checkpoint, tiny_config


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("models")


@pytest.fixture(scope="session")
def smollm(models_dir) -> Path:
    """The real default model (SmolLM2-135M-Instruct), imported once for the session."""
    return default_model(models_dir)


@pytest.fixture(scope="session")
def tiny(models_dir) -> Path:
    """A seeded random 5-layer Llama, for protocol tests."""
    return random_checkpoint(tiny_config(), models_dir / "tiny")
