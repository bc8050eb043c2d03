"""The node daemon's HTTP side (aiohttp): /health, /info, /probe, the WebSocket session endpoint, and (for local
addresses or a key holder) /metrics and the dashboard."""

from __future__ import annotations

from dataclasses import dataclass

from aiohttp import web

from shardmarket import __version__
from shardmarket.chain.proof import sign_challenge
from shardmarket.net import wire
from shardmarket.net.channel import SAME_PORT, SESSION_PATH, WebSocketTransport
from shardmarket.net.dashboard import guard, static_routes
from shardmarket.net.doorman import peer_of
from shardmarket.server.dashboard import DASHBOARD_PATHS, Dashboard
from shardmarket.server.service import NodeService

MAX_PROBE_BYTES = 4 * 2**20


def prove_endpoint(operator_key: bytes, challenge: str) -> dict[str, str]:
    """The challenge and the operator's signature over it; a 400 when it is no valid challenge."""
    try:
        return {"challenge": challenge, "signature": sign_challenge(operator_key, challenge)}
    except ValueError as exc:
        raise web.HTTPBadRequest(text=str(exc)) from None


@dataclass
class NodeListing:
    """What /info tells clients beside the layers: the model name they match on, the price per token, and the public
    endpoint the node is registered at (None until it has one; `node up` keeps it current)."""

    model_id: str
    price: int
    endpoint: str | None = None


def info(service: NodeService, listing: NodeListing) -> dict:
    """What a client needs to route to and talk to this node."""
    stage = service.stage
    return {
        "version": __version__,
        "wire_version": wire.WIRE_VERSION,
        "model": {
            "id": listing.model_id,
            "num_layers": stage.config.num_hidden_layers,
            "hidden_size": stage.hidden_size,
            "dtype": stage.numerics.dtype,  # of the hidden states it takes and returns
            "weights": stage.numerics.weights,  # the format its layers compute with (shardmarket.engine.formats)
        },
        "layers": [stage.start, stage.end],
        "price": listing.price,
        "load": service.load()
        | {
            "in_flight": service.steps_in_flight,
            "steps_served": service.steps_served,
            "frames_received": service.frames_received,
            "draining": service.draining,
        },
        "x25519_public_key": service.identity.x25519_public.hex(),
        "operator": service.identity.operator,
        "commitment_domain": {"chain_id": service.domain.chain_id, "verifying_contract": service.domain.verifying_contract},
        "endpoint": listing.endpoint,
        "transports": {"ws": SESSION_PATH, "tcp": SAME_PORT},
    }


def build_app(service: NodeService, listing: NodeListing, dashboard: Dashboard | None = None, key: str = "") -> web.Application:
    """The node's HTTP routes; with `dashboard`, /metrics and /dashboard too, guarded by `key` (or local addresses)."""
    routes = web.RouteTableDef()

    @routes.get("/health")
    async def health(request: web.Request) -> web.Response:
        """Alive or draining, and who answers: with ?challenge=HEX, the operator's signature over it (endpoint proofs)."""
        body = {"status": "draining" if service.draining else "ok", "operator": service.identity.operator}
        if "challenge" in request.query:
            body |= prove_endpoint(service.identity.operator_key, request.query["challenge"])
        return web.json_response(body, status=503 if service.draining else 200)

    @routes.get("/info")
    async def node_info(request: web.Request) -> web.Response:
        return web.json_response(info(service, listing))

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
        await service.serve(WebSocketTransport(ws), peer_of(request.transport))
        return ws

    app = web.Application(middlewares=[guard(key, DASHBOARD_PATHS)] if dashboard is not None else [])
    app.add_routes(routes)
    if dashboard is not None:
        app.add_routes(dashboard.routes())
        app.add_routes(static_routes())
    return app
