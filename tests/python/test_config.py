from pathlib import Path

import pytest

from shardmarket.config import ConfigError, load_config


def test_defaults_live_under_home(tmp_path):
    config = load_config(environ={"SHARDMARKET_HOME": str(tmp_path)})
    assert config.home == tmp_path
    assert config.ipfs.store == tmp_path / "blocks"
    assert config.chain.deployments_dir == tmp_path / "deployments"
    assert config.node.port == 7300


def test_file_then_environment_override(tmp_path):
    file = tmp_path / "config.toml"
    file.write_text('[node]\nport = 9001\nhost = "0.0.0.0"\n[ipfs]\ngateways = ["http://a:8080"]\nstore = "/srv/blocks"\n')
    env = {"SHARDMARKET_HOME": str(tmp_path), "SHARDMARKET_NODE_PORT": "9002", "SHARDMARKET_IPFS_API": "http://127.0.0.1:5001"}
    config = load_config(environ=env)
    assert config.node.port == 9002  # environment beats the file
    assert config.node.host == "0.0.0.0"
    assert config.ipfs.gateways == ["http://a:8080"]
    assert config.ipfs.store == Path("/srv/blocks")
    assert config.ipfs.api == "http://127.0.0.1:5001"


@pytest.mark.parametrize(
    ("text", "env", "message"),
    [
        ("[node]\nport = 1\n[nodes]\n", {}, r"unknown section\(s\) nodes"),
        ("[node]\nprot = 1\n", {}, r"unknown key\(s\) prot"),
        ("[node\n", {}, "not valid TOML"),
        ("", {"SHARDMARKET_NODE_PORT": "eighty"}, r"SHARDMARKET_NODE_\*\.port: invalid literal"),
    ],
)
def test_bad_config_names_the_problem(tmp_path, text, env, message):
    (tmp_path / "config.toml").write_text(text)
    with pytest.raises(ConfigError, match=message):
        load_config(environ={"SHARDMARKET_HOME": str(tmp_path), **env})


def test_missing_explicit_file_is_an_error(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config(environ={"SHARDMARKET_CONFIG": str(tmp_path / "nope.toml")})
