"""The node daemon's HTTP side (aiohttp): /health, /info, /probe, the WebSocket session endpoint, and the run loop."""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from aiohttp import web

from shardmarket import __version__
from shardmarket.config import Config
from shardmarket.engine.stage import Stage
from shardmarket.net import wire
from shardmarket.net.channel import SESSION_PATH, StreamTransport, WebSocketTransport
from shardmarket.net.commitment import commitment_domain
from shardmarket.server.identity import NodeIdentity, load_or_create_identity
from shardmarket.server.payments import PaymentGate
from shardmarket.server.service import Fault, NodeService
from shardmarket.server.worker import StageWorker, compute_thread

log = logging.getLogger("shardmarket.node")
MAX_PROBE_BYTES = 4 * 2**20


@dataclass(frozen=True)
class NodeSettings:
    """What `shardmarket node run` was asked to serve."""

    checkpoint: Path
    start: int
    end: int
    model_id: str
    host: str
    port: int
    tcp_port: int
    price: int
    dtype: torch.dtype = torch.float32
    fault: Fault = Fault()
    max_memory_mb: float | None = None  # CPU memory for weights; the rest goes to offload_folder
    offload_folder: Path | None = None
    shutdown_timeout_s: float = 30.0
    threads: int = 0  # torch intra-op threads of the compute thread; 0: torch's default


def info(service: NodeService, settings: NodeSettings, tcp_port: int) -> dict:
    """What a client needs to route to and talk to this node."""
    stage = service.stage
    return {
        "version": __version__,
        "wire_version": wire.WIRE_VERSION,
        "model": {
            "id": settings.model_id,
            "num_layers": stage.config.num_hidden_layers,
            "hidden_size": stage.hidden_size,
            "dtype": str(stage.dtype).removeprefix("torch."),
        },
        "layers": [stage.start, stage.end],
        "price": settings.price,
        "load": {
            "sessions": len(service.sessions),
            "queued": service.worker.queued,
            "in_flight": service.steps_in_flight,
            "decode_ms": round(service.worker.decode_ms, 3),
            "steps_served": service.steps_served,
            "draining": service.draining,
        },
        "x25519_public_key": service.identity.x25519_public.hex(),
        "operator": service.identity.operator,
        "commitment_domain": {"chain_id": service.domain.chain_id, "verifying_contract": service.domain.verifying_contract},
        "transports": {"ws": SESSION_PATH, "tcp": tcp_port},
    }


def build_app(service: NodeService, settings: NodeSettings, tcp_port: int) -> web.Application:
    """The node's HTTP routes."""
    routes = web.RouteTableDef()

    @routes.get("/health")
    async def health(request: web.Request) -> web.Response:
        status = 503 if service.draining else 200
        return web.json_response({"status": "draining" if service.draining else "ok"}, status=status)

    @routes.get("/info")
    async def node_info(request: web.Request) -> web.Response:
        return web.json_response(info(service, settings, tcp_port))

    @routes.get("/probe")
    async def probe(request: web.Request) -> web.Response:
        """N zero bytes, so clients can measure throughput to this node."""
        try:
            size = int(request.query.get("bytes", "65536"))
        except ValueError:
            raise web.HTTPBadRequest(text="bytes must be an integer") from None
        return web.Response(body=bytes(max(0, min(size, MAX_PROBE_BYTES))), content_type="application/octet-stream")

    @routes.get(SESSION_PATH)
    async def session(request: web.Request) -> web.WebSocketResponse:
        ws = web.WebSocketResponse(max_msg_size=service.limits.max_frame_bytes)
        await ws.prepare(request)
        await service.serve(WebSocketTransport(ws))
        return ws

    app = web.Application()
    app.add_routes(routes)
    return app


def load_service(settings: NodeSettings, config: Config, identity: NodeIdentity | None = None,
                 payments: PaymentGate | None = None) -> NodeService:
    """Load the layers and the node's keys (those under the data dir unless `identity` is given)."""
    max_memory = None if settings.max_memory_mb is None else {"cpu": int(settings.max_memory_mb * 2**20)}
    compute = compute_thread(settings.threads)  # every torch operation of the node runs there (see worker.py)
    stage = compute.submit(Stage.load, settings.checkpoint, settings.start, settings.end, dtype=settings.dtype,
                           idle_timeout_s=config.node.idle_timeout_s, max_memory=max_memory,
                           offload_folder=settings.offload_folder).result()
    identity = identity or load_or_create_identity(config.node.data_dir)
    worker = StageWorker(stage, executor=compute)
    compute.submit(worker.warm_up).result()
    return NodeService(
        worker, identity, commitment_domain(config), idle_timeout_s=config.node.idle_timeout_s, fault=settings.fault,
        payments=payments,
    )


async def serve(service: NodeService, settings: NodeSettings, ready: asyncio.Event | None = None) -> None:
    """Serve until SIGINT/SIGTERM, then finish the steps running and stop."""
    # a worker thread checking a tab or polling the chain gives the GIL back to the layers within 0.2 ms, not 5 ms
    sys.setswitchinterval(0.0002)
    service.worker.start()
    expiry = asyncio.get_running_loop().create_task(service.expire_idle())

    async def handle_tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await service.serve(StreamTransport(reader, writer, service.limits))

    tcp_server = await asyncio.start_server(handle_tcp, settings.host, settings.tcp_port, limit=2**20)
    tcp_port = tcp_server.sockets[0].getsockname()[1]
    runner = web.AppRunner(build_app(service, settings, tcp_port), handle_signals=False, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, settings.host, settings.port)
    await site.start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    port = runner.addresses[0][1]
    print(
        f"node ready: http://{settings.host}:{port} (tcp {tcp_port}) layers {service.stage.start}:{service.stage.end} "
        f"of {settings.model_id}, operator {service.identity.operator}",
        flush=True,
    )
    if ready is not None:
        ready.set()
    await stop.wait()
    print("shutting down: finishing the steps in progress", flush=True)
    tcp_server.close()
    await service.drain(settings.shutdown_timeout_s)
    expiry.cancel()
    await runner.cleanup()
    await service.worker.stop()
    print("node stopped", flush=True)
