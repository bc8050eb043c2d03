"""The one config loader: defaults, then a TOML file, then `SHARDMARKET_<SECTION>_<KEY>` variables."""

from __future__ import annotations

import os
import tomllib
import typing
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

if typing.TYPE_CHECKING:
    from _typeshed import DataclassInstance

    Section = typing.TypeVar("Section", bound=DataclassInstance)


@dataclass(frozen=True)
class ChainConfig:
    rpc_url: str = "http://127.0.0.1:8545"
    chain_id: int = 31337
    brownie_network: str = "shardmarket-anvil"
    deployments_dir: Path = Path("deployments")  # relative paths are under Config.home
    keystore_scrypt_n: int = 262144  # scrypt cost of new keystores (eth-account's default)
    # blocks on top of a settlement before a node counts it as final (`node earnings`); a settlement the chain drops
    # earlier, or later in a deeper reorg, is noticed and settled again
    confirmations: int = 0


@dataclass(frozen=True)
class IpfsConfig:
    store: Path = Path("blocks")
    api: str = ""  # a Kubo RPC API, e.g. http://127.0.0.1:5001; empty: the local blockstore
    gateways: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class NodeConfig:
    host: str = "127.0.0.1"
    port: int = 7300
    data_dir: Path = Path("node")
    price: int = 0  # token units per token processed by this node's layers
    threads: int = 0  # torch threads; 0: torch's default
    idle_timeout_s: float = 300.0  # a session idle this long is closed
    # what a stranger may hold of a node on a public address (see the README's "running a node on a public address")
    max_connections: int = 256  # connections to the node's port (every transport), in total
    max_connections_per_address: int = 64  # per IPv4 address or IPv6 /64
    max_handshakes_per_address: int = 32  # connections of one address that have not completed their handshake
    handshake_timeout_s: float = 5.0  # from connect to a completed handshake; also the life of a plain HTTP connection
    handshake_bytes: int = 16384  # what a connection may send before its handshake completes (an HTTP upgrade included)
    idle_connection_s: float = 60.0  # a connection holding no session, idle this long, is closed
    max_sessions: int = 64  # sessions (KV caches) in total
    max_cache_mb: float = 0.0  # memory the sessions' KV caches may reserve in total; 0: no budget but max_sessions
    max_sessions_per_connection: int = 4
    max_sessions_per_address: int = 32
    unpaid_sessions_per_address: int = 2  # a paid node's sessions opened without a tab, until a step's tab pays them
    max_step_tokens: int = 1024  # positions per step; with the model's hidden size it bounds every frame
    credit_limit: int = 0  # token units a node serves a client beyond its newest tab; 0: 64 tokens' worth
    redeem_min_value: int = 0  # a node settles once the tabs owing it are worth this much (0: whenever anything is owed)
    redeem_interval_s: float = 60.0  # how often a node checks whether settling is worth it
    dispute_tolerance: float = 1e-3  # verifier duty: largest relative difference of hidden states counted as equal
    dashboard_key: str = ""  # /dashboard and /metrics for whoever presents it; empty: for local addresses only
    # free nodes this node may push its outputs to when a client's route names them next (their keys read from their /info);
    # a paid node pushes only to nodes listed on the NodeRegistry
    peers: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class ClientConfig:
    api_host: str = "127.0.0.1"
    api_port: int = 8000
    api_key: str = ""
    nodes: list[str] = field(default_factory=list)  # base URLs of free nodes to use instead of the NodeRegistry
    transport: str = "tcp"  # "tcp" or "ws"
    push: bool = False  # nodes send their outputs straight to the next hop instead of back to the client (2 RTT a token, not 3)
    step_timeout_s: float = 60.0
    spot_check_rate: float = 0.0  # fraction of requests whose hops are re-run on another node (or locally)
    # speculative decoding: up to this many tokens drafted by prompt lookup ride on each decode step, checked in the
    # same pass (more tokens per round trip where the answer repeats the prompt); 0: off
    max_draft: int = 0
    spot_check_tolerance: float = 1e-3  # largest relative difference of hidden states still counted as equal
    # token units set aside in the escrow for each node the client pays (only that node can draw on it, so nodes serve
    # up to it without trusting the shared balance); 0: half the spendable balance, shared among the model's nodes
    reserve: int = 0
    # public base URLs where verifiers on other machines can fetch this client's dispute evidence: this client's
    # `client serve` address as seen from the internet (it serves its block store at /ipfs/), or any gateway holding it
    evidence_gateways: list[str] = field(default_factory=list)
    dashboard_key: str = ""  # /dashboard and /metrics of `client serve` for whoever presents it; empty: local addresses only
    # operators (addresses) whose nodes may serve a private request: the client's own machines, friends' (README "privacy")
    trusted_operators: list[str] = field(default_factory=list)
    private: bool = False  # every request is private: served by trusted operators alone, or refused
    # host:port of a relay that forwards clients (`node relay --forward-port`): node discovery goes through it, and
    # every hop of a hidden request, so that no node sees this client's address
    relay: str = ""
    hidden: bool = False  # every request is hidden behind the relay


@dataclass(frozen=True)
class ReachConfig:
    stun_servers: list[str] = field(default_factory=list)  # host[:port]; two IPs classify the NAT's mapping
    relays: list[str] = field(default_factory=list)  # http://relay:port of public nodes that relay and verify
    methods: list[str] = field(default_factory=lambda: ["pcp", "natpmp", "upnp"])
    lease_s: int = 3600
    refresh_s: float = 10.0  # a port mapping is renewed (re-created if the router lost it) this often
    check_s: float = 5.0  # the endpoint is checked from outside (through a relay) this often
    unreachable_s: float = 10.0  # a node unreachable for this long pauses its listing until it is reachable again


@dataclass(frozen=True)
class Config:
    home: Path = Path.home() / ".shardmarket"  # SHARDMARKET_HOME
    chain: ChainConfig = field(default_factory=ChainConfig)
    ipfs: IpfsConfig = field(default_factory=IpfsConfig)
    node: NodeConfig = field(default_factory=NodeConfig)
    client: ClientConfig = field(default_factory=ClientConfig)
    reach: ReachConfig = field(default_factory=ReachConfig)


class ConfigError(ValueError):
    """A config file or variable that cannot be used; the message says which and why."""


def _coerce(value: object, kind: object, where: str) -> object:
    origin = typing.get_origin(kind)
    try:
        if kind is bool:
            if isinstance(value, bool):
                return value
            if str(value).lower() in ("1", "true", "yes", "on"):
                return True
            if str(value).lower() in ("0", "false", "no", "off", ""):
                return False
            raise ValueError(f"expected true or false, got {value!r}")
        if kind is int:
            if isinstance(value, bool) or not isinstance(value, (int, str)):
                raise ValueError("expected an integer")
            return int(value)
        if kind is float:
            if isinstance(value, bool) or not isinstance(value, (int, float, str)):
                raise ValueError("expected a number")
            return float(value)
        if kind is Path:
            return Path(os.path.expanduser(str(value)))
        if origin is list:
            if not isinstance(value, (str, list)):
                raise ValueError(f"expected a list or a comma-separated string, got {type(value).__name__}")
            items = value.split(",") if isinstance(value, str) else value
            return [str(item).strip() for item in items if str(item).strip()]
        if kind is str:
            if not isinstance(value, (str, int, float)):
                raise ValueError(f"expected a string, got {type(value).__name__}")
            return str(value)
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{where}: {exc}") from None
    raise ConfigError(f"{where}: unsupported type {kind}")


def _section(cls: type, base: Section, values: dict, where: str) -> Section:
    hints = typing.get_type_hints(cls)
    known = {f.name for f in fields(cls)}
    unknown = set(values) - known
    if unknown:
        raise ConfigError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(known))}")
    return replace(base, **{k: _coerce(v, hints[k], f"{where}.{k}") for k, v in values.items()})


def load_config(path: Path | str | None = None, environ: typing.Mapping[str, str] | None = None) -> Config:
    """Read the config: `path`, else `SHARDMARKET_CONFIG`, else `<home>/config.toml` if it exists."""
    environ = os.environ if environ is None else environ
    config = Config()
    if environ.get("SHARDMARKET_HOME"):
        config = replace(config, home=Path(os.path.expanduser(environ["SHARDMARKET_HOME"])))
    file = Path(path or environ.get("SHARDMARKET_CONFIG") or config.home / "config.toml")
    file_values: dict = {}
    if path or environ.get("SHARDMARKET_CONFIG") or file.exists():
        try:
            file_values = tomllib.loads(file.read_text())
        except FileNotFoundError:
            raise ConfigError(f"config file {file} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"config file {file} is not valid TOML: {exc}") from None
    hints = typing.get_type_hints(Config)
    sections = {f.name for f in fields(Config) if f.name != "home"}
    unknown = set(file_values) - sections
    if unknown:
        raise ConfigError(f"{file}: unknown section(s) {', '.join(sorted(unknown))}; known: {', '.join(sorted(sections))}")
    for name in sections:
        cls = hints[name]
        section = getattr(config, name)
        values = file_values.get(name, {})
        if not isinstance(values, dict):
            raise ConfigError(f"{file}: [{name}] must be a table")
        section = _section(cls, section, values, f"{file} [{name}]")
        prefix = f"SHARDMARKET_{name.upper()}_"
        from_env = {k[len(prefix) :].lower(): v for k, v in environ.items() if k.startswith(prefix)}
        section = _section(cls, section, from_env, f"environment {prefix}*")
        paths = {f.name: config.home / getattr(section, f.name) for f in fields(section) if _is_path(cls, f.name)}
        config = replace(config, **{name: replace(section, **paths)})
    return config


def _is_path(cls: type, name: str) -> bool:
    return typing.get_type_hints(cls)[name] is Path
