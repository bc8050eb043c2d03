"""The one place that builds a node daemon: its layers on the compute thread, its keys, the session service, and for a
paid node its payment gate, tab store, settlement loop and verifier duty; then it serves HTTP, WebSocket and raw TCP
sessions on one port until SIGINT/SIGTERM. `shardmarket node run` parses its arguments into `ServeOptions` and calls
`build_daemon`."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlparse

import torch
from aiohttp import web
from eth_utils import keccak

from shardmarket.chain.commitment import commitment_domain
from shardmarket.chain.contracts import ChainError, Market
from shardmarket.chain.registry import Registration, listed_nodes, registration_of
from shardmarket.chain.watch import BlockWatch
from shardmarket.config import Config, NodeConfig
from shardmarket.engine.models import default_model
from shardmarket.engine.placement import memory_budget
from shardmarket.engine.stage import Stage
from shardmarket.ipfs.blockstore import Blockstore
from shardmarket.ipfs.model import ModelError, fetch_model
from shardmarket.ipfs.store import STORE_ERRORS, ContentStore
from shardmarket.net.channel import StreamTransport
from shardmarket.net.doorman import ConnectionLimits, Doorman, peer_of
from shardmarket.net.listener import first_byte_protocol
from shardmarket.net.wire import DTYPES
from shardmarket.server.app import NodeListing, build_app
from shardmarket.server.dashboard import Dashboard, NodeBooks, step_observer
from shardmarket.server.faults import Fault, FaultyService
from shardmarket.server.identity import NodeIdentity, load_or_create_identity
from shardmarket.server.metrics import EarningsLedger, NodeMetrics
from shardmarket.server.payments import PaymentGate
from shardmarket.server.push import PeerDirectory, Successors, peers_source
from shardmarket.server.service import NodeService, SessionLimits
from shardmarket.server.settlement import Settler, escrow_credit_reader, settle_pending
from shardmarket.server.tabs import TabStore, tab_store_path
from shardmarket.server.verifier import VerifierDuty
from shardmarket.server.worker import StageWorker, compute_thread

log = logging.getLogger("shardmarket.node")
SWITCH_INTERVAL_S = 0.0002  # a thread checking a tab or polling the chain gives the GIL back to the layers this soon
CREDIT_STEPS = 64  # without a configured credit limit, a client may run this many tokens ahead of its tabs
L = TypeVar("L", ConnectionLimits, SessionLimits)
STREAM_BUFFER = 2**20  # a raw TCP connection pauses reading once twice this much waits beyond the frame being read


def limits_from(node: NodeConfig, kind: type[L]) -> L:
    """`kind` with each field taken from the [node] setting of the same name."""
    return kind(**{f.name: getattr(node, f.name) for f in fields(kind)})


@dataclass(frozen=True)
class ServeOptions:
    """What `node run` was asked for; None means the config's value (or, for a paid node, the registration's)."""

    layers: tuple[int, int] | None = None  # None: serve this operator's registration on chain, paid
    checkpoint: Path | None = None  # None: the default model (free) or the shards fetched by manifest (paid)
    model_id: str | None = None
    host: str | None = None
    port: int | None = None
    price: int | None = None
    dtype: str = "auto"  # activations; auto: the best of this hardware for the weights (engine.placement.best_dtype)
    weights: str | None = None  # convert the layers to this weight format; None: as the checkpoint holds them
    threads: int | None = None
    max_memory_mb: float | None = None  # CPU memory for weights; the rest goes to offload_folder
    gpu_memory_mb: float | None = None  # memory of the first GPU for weights; the rest goes to the CPU, then the folder
    offload_folder: Path | None = None
    fault: Fault = field(default_factory=Fault)
    shutdown_timeout_s: float = 30.0


@dataclass
class NodeDaemon:
    """A built node: its service and where it listens, plus the duties that run beside it (settlement, verifying)."""

    service: NodeService
    listing: NodeListing
    host: str
    port: int
    connection_limits: ConnectionLimits = field(default_factory=ConnectionLimits)
    shutdown_timeout_s: float = 30.0
    duties: list[Callable[[], Coroutine[Any, Any, None]]] = field(default_factory=list)
    on_stop: Callable[[], Awaitable[None]] | None = None
    dashboard: Dashboard | None = None
    dashboard_key: str = ""
    stopping: asyncio.Event = field(default_factory=asyncio.Event)  # set by SIGINT/SIGTERM, or a duty that gives up

    def stop(self) -> None:
        """Shut down as SIGTERM would."""
        self.stopping.set()

    async def run(self, ready: asyncio.Event | None = None) -> None:
        """Serve until SIGINT/SIGTERM, then finish the steps running, stop the duties and call `on_stop`."""
        tasks = [asyncio.get_running_loop().create_task(duty()) for duty in self.duties]
        try:
            await self._serve(ready)
        finally:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            if self.on_stop is not None:
                await self.on_stop()

    async def _serve(self, ready: asyncio.Event | None) -> None:
        service = self.service
        sys.setswitchinterval(SWITCH_INTERVAL_S)
        service.worker.start()
        loop = asyncio.get_running_loop()
        expiry = loop.create_task(service.expire_idle())
        doorman = Doorman(self.connection_limits)  # every connection, HTTP or raw TCP, passes it once

        async def handle_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            await service.serve(StreamTransport(reader, writer), peer_of(writer.transport))

        app = build_app(service, self.listing, self.dashboard, self.dashboard_key)
        runner = web.AppRunner(app, handle_signals=False, access_log=None)
        await runner.setup()
        assert runner.server is not None  # set by setup()
        protocol = doorman.protocol(first_byte_protocol(runner.server, handle_tcp, STREAM_BUFFER))
        # A burst of connects past the accept queue waits in the kernel, where no deadline runs, and the SYN-ACKs the
        # kernel resends back off for seconds: the queue holds as many connections as the doorman would admit.
        backlog = max(100, self.connection_limits.max_connections)
        server = await loop.create_server(protocol, self.host, self.port, backlog=backlog)
        self.port = server.sockets[0].getsockname()[1]
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self.stopping.set)
        print(
            f"node ready: http://{self.host}:{self.port} (HTTP, WebSocket and raw TCP sessions) layers "
            f"{service.stage.start}:{service.stage.end} "
            f"of {self.listing.model_id}, operator {service.identity.operator}",
            flush=True,
        )
        if ready is not None:
            ready.set()
        await self.stopping.wait()
        print("shutting down: finishing the steps in progress", flush=True)
        server.close()
        await service.drain(self.shutdown_timeout_s)
        expiry.cancel()
        await runner.cleanup()
        if service.successors is not None:
            await service.successors.close()
        await service.worker.stop()
        print("node stopped", flush=True)


def build_daemon(
    options: ServeOptions, config: Config, identity: NodeIdentity | None = None, shards: ContentStore | None = None
) -> NodeDaemon:
    """Load the layers and wire the node. Without `options.layers` the node serves what `identity`'s operator registered
    on chain and is paid per step (`identity` is then required), its shards fetched through `shards` unless
    `options.checkpoint` names them; with them it serves those layers for free under the keys of `<data_dir>` (or
    `identity`). Raises ChainError, ModelError, EngineError, ValueError or OSError."""
    threads = options.threads if options.threads is not None else config.node.threads
    if threads:
        torch.set_num_threads(threads)  # the compute thread sets it too
    if options.layers is None:
        if identity is None:
            raise ValueError("a paid node needs the operator's identity from its keystore")
        return _paid_daemon(options, config, identity, shards)
    checkpoint = options.checkpoint or default_model(config.home / "models")
    if not (checkpoint / "config.json").exists():
        raise ValueError(f"{checkpoint} is not a checkpoint folder (no config.json); pass --checkpoint DIR")
    identity = identity or load_or_create_identity(config.node.data_dir)
    price = options.price if options.price is not None else config.node.price
    port = options.port if options.port is not None else config.node.port
    print(f"loading layers {options.layers[0]}:{options.layers[1]} of {checkpoint}", flush=True)
    listing = NodeListing(options.model_id or checkpoint.name, price)
    successors = Successors(PeerDirectory(peers_source(config.node.peers))) if config.node.peers else None
    service = _load_service(
        options, config, checkpoint, listing.model_id, options.layers, identity, threads, successors=successors
    )
    return _daemon(options, config, service, listing, port)


def _paid_daemon(options: ServeOptions, config: Config, identity: NodeIdentity, shards: ContentStore | None) -> NodeDaemon:
    from eth_account import Account

    market = Market.connect(config.chain, Account.from_key(identity.operator_key))
    plan = registration_of(market, identity.operator)
    if plan is None:
        raise ChainError(f"{identity.operator} is not registered: run `shardmarket node up` (or `node register`)")
    if plan.key != identity.x25519_public:
        raise ChainError("the X25519 key on chain is not this node's key; run `shardmarket node update`")
    port = options.port if options.port is not None else (urlparse(plan.endpoints[0]).port or config.node.port)
    return paid_daemon(options, config, identity, market, plan, port, shards)


def paid_daemon(
    options: ServeOptions,
    config: Config,
    identity: NodeIdentity,
    market: Market,
    plan: Registration,
    port: int,
    shards: ContentStore | None,
) -> NodeDaemon:
    """A node paid per step for layers plan.start:plan.end of plan.model at plan.price, its shards fetched by the
    manifest CID through `shards` (unless options.checkpoint is given), with settlement and verifier duty beside it."""
    threads = options.threads if options.threads is not None else config.node.threads
    name, manifest, start, end, price = plan.model, plan.manifest, plan.start, plan.end, plan.price
    checkpoint = options.checkpoint
    if checkpoint is None:
        if shards is None:
            raise ValueError("a paid node without a checkpoint needs a content store to fetch its shards through")
        dest = config.node.data_dir / "shards" / f"{manifest}-{start}-{end}"
        print(f"fetching layers {start}:{end} of {name} (manifest {manifest})", flush=True)
        try:
            checkpoint = fetch_model(manifest, (start, end), dest, store=shards, progress=sys.stderr.isatty())
        except (ModelError, OSError, *STORE_ERRORS) as exc:
            raise ChainError(
                f"cannot fetch the shards of {name}: {exc}; set [ipfs] gateways to peers that hold them (or [ipfs] api to a Kubo "
                "node that can find them)"
            ) from None
    tabs = TabStore(tab_store_path(config.node.data_dir), identity.operator)
    gate = PaymentGate(
        tabs,
        identity.operator,
        price,
        market.escrow_domain(),
        config.node.credit_limit or CREDIT_STEPS * price,
        escrow_credit_reader(market, identity.operator),
    )
    settler = Settler(
        market,
        tabs,
        gate,
        interval_s=config.node.redeem_interval_s,
        min_value=config.node.redeem_min_value,
        confirmations=config.chain.confirmations,
    )
    print(f"loading layers {start}:{end} of {name}, price {price}", flush=True)

    async def registered() -> dict[bytes, str]:
        return {node["key"]: node["url"] for node in await asyncio.to_thread(listed_nodes, market, name)}

    successors = Successors(PeerDirectory(registered))
    service = _load_service(
        options, config, checkpoint, name, (start, end), identity, threads, payments=gate, successors=successors
    )
    duty = VerifierDuty(
        market,
        service.worker,
        service.model_id,
        Blockstore(config.ipfs.store),  # evidence is kept locally, where this node's gateway can serve it
        config.ipfs.gateways,
        config.node.dispute_tolerance,
        state_path=config.node.data_dir / "verifier.json",
    )
    watch = BlockWatch(config.chain.rpc_url, steps_served=lambda: service.steps_served)

    async def settle_at_shutdown() -> None:
        await watch.close()
        try:
            await asyncio.to_thread(settle_pending, market, tabs, gate, confirmations=config.chain.confirmations)
        except ChainError as exc:
            print(f"could not settle at shutdown ({exc}); run `shardmarket node redeem` later", flush=True)

    ledger = EarningsLedger(config.node.data_dir / "earnings.sqlite")
    books = NodeBooks(market, tabs, settler, duty, ledger, market.units())
    daemon = _daemon(options, config, service, NodeListing(name, price), port, books)
    assert daemon.dashboard is not None
    daemon.duties = [lambda: settler.run(watch), lambda: duty.run(watch), daemon.dashboard.refresh_chain]

    async def stop() -> None:
        await settle_at_shutdown()
        ledger.close()

    daemon.on_stop = stop
    return daemon


def _load_service(
    options: ServeOptions,
    config: Config,
    checkpoint: Path,
    model: str,
    layers: tuple[int, int],
    identity: NodeIdentity,
    threads: int,
    payments: PaymentGate | None = None,
    successors: Successors | None = None,
) -> NodeService:
    """Load layers `layers` of `checkpoint` on the compute thread (every torch operation of the node runs there) and
    build the session service of model `model` (its name on the ModelRegistry), the faulty one when `options.fault`
    asks for it."""
    max_memory = memory_budget(options.gpu_memory_mb, options.max_memory_mb)
    compute = compute_thread(threads)
    stage = compute.submit(
        Stage.load,
        checkpoint,
        layers[0],
        layers[1],
        weights=options.weights,
        dtype=None if options.dtype == "auto" else DTYPES[options.dtype],
        idle_timeout_s=config.node.idle_timeout_s,
        max_sessions=config.node.max_sessions,
        cache_budget_bytes=int(config.node.max_cache_mb * 2**20) or None,
        max_memory=max_memory,
        offload_folder=options.offload_folder,
    ).result()
    worker = StageWorker(stage, executor=compute)
    compute.submit(worker.warm_up).result()
    domain = commitment_domain(config.chain.chain_id, config.chain.deployments_dir)
    kwargs: dict[str, Any] = {
        "model_id": keccak(text=model),
        "idle_timeout_s": config.node.idle_timeout_s,
        "payments": payments,
        "session_limits": limits_from(config.node, SessionLimits),
        "successors": successors,
    }
    if options.fault:
        return FaultyService(worker, identity, domain, fault=options.fault, **kwargs)
    return NodeService(worker, identity, domain, **kwargs)


def _daemon(
    options: ServeOptions, config: Config, service: NodeService, listing: NodeListing, port: int, books: NodeBooks | None = None
) -> NodeDaemon:
    """The daemon, with its metrics and dashboard (a paid node's `books` in them) counting every step it answers."""
    host = options.host or config.node.host
    daemon = NodeDaemon(service, listing, host, port, limits_from(config.node, ConnectionLimits), options.shutdown_timeout_s)
    daemon.dashboard_key = config.node.dashboard_key
    metrics = NodeMetrics(listing.model_id, books.ledger if books is not None else None)
    daemon.dashboard = Dashboard(service, listing, metrics, f"http://{host}:{port}", books)
    service.on_step = step_observer(daemon.dashboard)
    return daemon
