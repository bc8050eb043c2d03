from shardmarket.chain import eip712


def test_only_the_dispute_manager_can_slash(stake_manager, disputes, accounts):
    role = stake_manager.SLASHER_ROLE()
    assert stake_manager.hasRole(role, disputes)
    assert not stake_manager.hasRole(role, accounts[0])
    # the deployer gave up the admin role, so the wiring is final
    assert not stake_manager.hasRole(stake_manager.DEFAULT_ADMIN_ROLE(), accounts[0])


def test_contracts_point_at_each_other(deployment, token, stake_manager, registry, escrow, disputes, models, treasury):
    assert stake_manager.token() == escrow.token() == disputes.token() == token
    assert registry.stakeManager() == disputes.stakeManager() == stake_manager
    assert registry.modelRegistry() == models
    assert disputes.nodeRegistry() == registry
    assert disputes.treasury() == treasury == deployment["Treasury"]


def test_domain_separators_match_the_python_module(escrow, disputes):
    assert escrow.domainSeparator() == "0x" + eip712.domain_separator(eip712.Domain(31337, escrow.address)).hex()
    assert disputes.domainSeparator() == "0x" + eip712.domain_separator(eip712.Domain(31337, disputes.address)).hex()
