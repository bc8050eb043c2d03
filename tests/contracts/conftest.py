import pytest


@pytest.fixture(autouse=True)
def isolate(fn_isolation):
    """Every test starts from the same chain state."""


@pytest.fixture(scope="module")
def deployment(accounts, tmp_path_factory, monkeypatch_module):
    from scripts import deploy

    monkeypatch_module.setenv("SHARDMARKET_HOME", str(tmp_path_factory.mktemp("home")))
    return deploy.main(accounts[0])


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


@pytest.fixture(scope="module")
def token(deployment, TestToken):
    return TestToken.at(deployment["TestToken"])


@pytest.fixture
def reverts_with():
    """`with reverts_with("ErrorName"):` expects a revert with that custom error."""
    import brownie

    return lambda name: brownie.reverts(revert_pattern=rf"{name}(: .*)?")
