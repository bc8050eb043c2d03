"""OpenAI-compatible HTTP API over the remote pipeline: /v1/models, /v1/chat/completions, /v1/completions; and,
without a key, the client's block store as a trustless gateway at /ipfs/ (verifiers fetch dispute evidence there).

Beyond OpenAI's fields a request may carry `"private": true` (or name the model `<model>:private`): only trusted
operators' nodes serve it, or it fails with code `no_private_route`; and `"hidden": true`: every node is reached
through the client's relay, so none sees this client's address. Neither can lower the client's defaults
(client.private, client.hidden)."""

from __future__ import annotations

import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncGenerator
from contextlib import aclosing
from dataclasses import dataclass

from aiohttp import web

from shardmarket.client.generation import Completion, RemoteModel
from shardmarket.client.metrics import DASHBOARD_PATHS, ClientMetrics, RequestTimer, dashboard_routes, on_commitment_too
from shardmarket.client.routing import RouteError
from shardmarket.client.session import PrivateRouteError, RequestRefused
from shardmarket.client.text import TextStream
from shardmarket.engine.errors import EngineError
from shardmarket.engine.sampling import SamplingParams
from shardmarket.ipfs.blockstore import Blockstore
from shardmarket.ipfs.gateway import gateway_routes
from shardmarket.net import wire
from shardmarket.net.dashboard import guard, static_routes

log = logging.getLogger("shardmarket.api")
MAX_TOKENS_LIMIT = 4096
PRIVATE_SUFFIX = ":private"  # a model name ending so asks for a private request


class ApiError(Exception):
    """An error answered in OpenAI's JSON shape."""

    def __init__(
        self, status: int, message: str, kind: str = "invalid_request_error", param: str | None = None, code: str | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.kind, self.param, self.code = status, kind, param, code

    def body(self) -> dict:
        return {"error": {"message": str(self), "type": self.kind, "param": self.param, "code": self.code}}


SEED_MIN, SEED_MAX = -(2**63), 2**64 - 1  # what a torch generator takes
INTERNAL_ERROR = "internal error; the server's log has the details"


@dataclass
class _Request:
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    include_usage: bool
    private: bool | None = None  # None: the client's default
    hidden: bool | None = None


def _flag(body: dict, name: str) -> bool | None:
    value = body.get(name)
    if value is not None and not isinstance(value, bool):
        raise ApiError(400, f"'{name}' must be true or false", param=name)
    return value


def _no_route(exc: RouteError) -> ApiError:
    code = "no_private_route" if isinstance(exc, PrivateRouteError) else "no_route"
    return ApiError(503, str(exc), "server_error", code=code)


def _number(body: dict, name: str, default, kind, low, high):
    value = body.get(name)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (kind is int and not isinstance(value, int)):
        raise ApiError(400, f"'{name}' must be a {kind.__name__}", param=name)
    if not low <= value <= high:
        raise ApiError(400, f"'{name}' must be between {low} and {high}, got {value}", param=name)
    return kind(value)


def _text(value: str, param: str) -> str:
    """`value` if it is text a tokenizer can take: JSON lets a caller send a lone surrogate such as \\ud800, which is not."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise ApiError(400, f"'{param}' must be valid Unicode text (it holds a lone surrogate)", param=param) from None
    return value


def _sampling(body: dict, default_max_tokens: int) -> tuple[SamplingParams, bool, bool]:
    if body.get("n", 1) != 1:
        raise ApiError(400, "only n=1 is supported", param="n")
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    max_tokens = _number({"max_tokens": max_tokens}, "max_tokens", default_max_tokens, int, 1, MAX_TOKENS_LIMIT)
    stop = body.get("stop") or []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) for s in stop):
        raise ApiError(400, "'stop' must be a string or a list of up to 4 strings", param="stop")
    stop = [_text(s, "stop") for s in stop]
    seed = _number(body, "seed", None, int, SEED_MIN, SEED_MAX)
    params = SamplingParams(
        max_tokens=max_tokens,
        temperature=_number(body, "temperature", 1.0, float, 0.0, 2.0),
        top_p=_number(body, "top_p", 1.0, float, 0.0, 1.0),
        seed=seed,
        stop=stop,
    )
    options = body.get("stream_options") or {}
    return params, bool(body.get("stream", False)), bool(isinstance(options, dict) and options.get("include_usage"))


def _usage(completion: Completion) -> dict:
    """OpenAI's token counts (completion tokens are the accepted ones), what the request cost, and what each hop computed
    and billed: speculation computes positions of draft tokens it then rejects."""
    n = len(completion.tokens)
    usage: dict[str, object] = {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": n,
        "total_tokens": completion.prompt_tokens + n,
        "cost": completion.cost,
        "cost_per_completion_token": completion.cost / n if n else 0,
        "computed_positions": completion.computed_positions,
    }
    if completion.speculation is not None:
        usage["speculation"] = completion.speculation.as_dict()
    return usage


async def _timed(tokens: AsyncGenerator[int, None], timer: RequestTimer) -> AsyncGenerator[int, None]:
    """`tokens`, each one timed; the request counts as done when the generator closes."""
    try:
        async with aclosing(tokens):
            async for token in tokens:
                timer.token()
                yield token
    finally:
        timer.done()


def build_api(
    model: RemoteModel,
    api_key: str,
    default_max_tokens: int = 256,
    store: Blockstore | None = None,
    metrics: ClientMetrics | None = None,
    dashboard_key: str = "",
) -> web.Application:
    """The aiohttp app serving `model` to callers holding `api_key`; with `metrics`, /metrics and /dashboard too, for
    local addresses or holders of `dashboard_key`."""
    routes = web.RouteTableDef()
    metrics = metrics or ClientMetrics(model.model_id)
    model.on_commitment = on_commitment_too(metrics, model.on_commitment)

    @web.middleware
    async def errors_and_auth(request: web.Request, handler):
        if store is not None and request.path.startswith("/ipfs/"):  # public, content-addressed: no key
            return await handler(request)
        if request.path.startswith((*DASHBOARD_PATHS, "/static/")):  # guarded by the dashboard's own rule
            return await handler(request)
        try:
            given = request.headers.get("Authorization", "")
            if not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                raise ApiError(401, "Incorrect or missing API key: send 'Authorization: Bearer <key>'.", code="invalid_api_key")
            return await handler(request)
        except ApiError as exc:
            return web.json_response(exc.body(), status=exc.status)
        except web.HTTPException as exc:
            return web.json_response(ApiError(exc.status, exc.reason).body(), status=exc.status)
        except RouteError as exc:
            return web.json_response(_no_route(exc).body(), status=503)
        except RequestRefused as exc:
            status = 503 if exc.code in wire.DECLINES else 400  # every node full or unpaid: retry later
            return web.json_response(ApiError(status, str(exc), code=exc.code).body(), status=status)
        except EngineError as exc:
            return web.json_response(ApiError(400, str(exc)).body(), status=400)
        except Exception:  # answer in OpenAI's shape, and keep serving
            log.exception("request failed")
            return web.json_response(ApiError(500, INTERNAL_ERROR, "server_error").body(), status=500)

    async def read_body(request: web.Request) -> dict:
        try:
            body = await request.json()
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise ApiError(400, "the request body must be JSON") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        if body.get("model") not in (None, model.model_id, model.model_id + PRIVATE_SUFFIX):
            raise ApiError(
                404,
                f"The model '{body.get('model')}' does not exist; this endpoint serves '{model.model_id}'.",
                param="model",
                code="model_not_found",
            )
        return body

    @routes.get("/v1/models")
    async def models(request: web.Request) -> web.Response:
        entry = {"id": model.model_id, "object": "model", "created": 0, "owned_by": "shardmarket"}
        return web.json_response({"object": "list", "data": [entry]})

    @routes.post("/v1/chat/completions")
    async def chat(request: web.Request) -> web.StreamResponse:
        body = await read_body(request)
        messages = body.get("messages")
        if (
            not isinstance(messages, list)
            or not messages
            or not all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str) for m in messages
            )
        ):
            raise ApiError(
                400, "'messages' must be a non-empty list of {role, content} objects with text content", param="messages"
            )
        params, stream, include_usage = _sampling(body, default_max_tokens)
        messages = [{"role": _text(m["role"], "messages"), "content": _text(m["content"], "messages")} for m in messages]
        req = _Request(model.chat_ids(messages), params, stream, include_usage, *_privacy(body))
        return await _respond(request, _within_context(req, "messages"), chat=True)

    @routes.post("/v1/completions")
    async def completions(request: web.Request) -> web.StreamResponse:
        body = await read_body(request)
        prompt = body.get("prompt")
        if isinstance(prompt, list) and len(prompt) == 1:
            prompt = prompt[0]
        if not isinstance(prompt, str) or not prompt:
            raise ApiError(400, "'prompt' must be a non-empty string", param="prompt")
        params, stream, include_usage = _sampling(body, default_max_tokens)
        req = _Request(model.prompt_ids(_text(prompt, "prompt")), params, stream, include_usage, *_privacy(body))
        return await _respond(request, _within_context(req, "prompt"), chat=False)

    def _privacy(body: dict) -> tuple[bool | None, bool | None]:
        """The request's `private` and `hidden` (None: not asked); a `:private` model name is private."""
        private = _flag(body, "private")
        if body.get("model") == model.model_id + PRIVATE_SUFFIX:
            if private is False:
                raise ApiError(
                    400, f"model '{body['model']}' asks for a private request, and 'private' is false", param="private"
                )
            private = True
        return private, _flag(body, "hidden")

    def _within_context(req: _Request, param: str) -> _Request:
        """`req` if its prompt and its max_tokens fit the model's context: a caller's mistake, answered as OpenAI does,
        that must not reach the nodes (they would refuse it, and the route would look broken)."""
        context = model.head.config.max_position_embeddings
        needed = len(req.prompt_ids) + req.params.max_tokens
        if needed > context:
            raise ApiError(
                400,
                f"This model's maximum context length is {context} tokens. However, you requested {needed} tokens "
                f"({len(req.prompt_ids)} in the {param}, {req.params.max_tokens} for the completion). Please reduce the "
                f"length of the {param} or max_tokens.",
                param=param,
                code="context_length_exceeded",
            )
        return req

    async def _respond(request: web.Request, req: _Request, chat: bool) -> web.StreamResponse:
        ident = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        created = int(time.time())
        completion = Completion(prompt_tokens=len(req.prompt_ids))
        text = TextStream(model.head.tokenizer)
        timer = RequestTimer(metrics, len(req.prompt_ids))
        tokens = _timed(model.stream(req.prompt_ids, req.params, completion, private=req.private, hidden=req.hidden), timer)

        def finish_reason() -> str:
            return "length" if len(completion.tokens) >= req.params.max_tokens else "stop"

        def chunk(delta: str | None, reason: str | None, role: bool = False) -> dict:
            if chat:
                content = {"role": "assistant", "content": ""} if role else ({} if delta is None else {"content": delta})
                choice = {"index": 0, "delta": content, "finish_reason": reason, "logprobs": None}
                return {
                    "id": ident,
                    "object": "chat.completion.chunk",
                    "created": created,
                    "model": model.model_id,
                    "choices": [choice],
                }
            choice = {"index": 0, "text": delta or "", "finish_reason": reason, "logprobs": None}
            return {"id": ident, "object": "text_completion", "created": created, "model": model.model_id, "choices": [choice]}

        if not req.stream:
            parts = []
            async with aclosing(tokens):
                async for token in tokens:
                    if request.transport is None or request.transport.is_closing():  # streaming finds out when it writes
                        log.info("caller of %s hung up; stopping its generation", ident)
                        return web.Response(status=499)  # nobody reads it
                    parts.append(text.push(token))
            parts.append(text.finish())
            content = "".join(parts)
            if chat:
                choice = {
                    "index": 0,
                    "message": {"role": "assistant", "content": content},
                    "finish_reason": finish_reason(),
                    "logprobs": None,
                }
                body = {
                    "id": ident,
                    "object": "chat.completion",
                    "created": created,
                    "model": model.model_id,
                    "choices": [choice],
                }
            else:
                choice = {"index": 0, "text": content, "finish_reason": finish_reason(), "logprobs": None}
                body = {
                    "id": ident,
                    "object": "text_completion",
                    "created": created,
                    "model": model.model_id,
                    "choices": [choice],
                }
            body["usage"] = _usage(completion)
            return web.json_response(body)

        response = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
        await response.prepare(request)

        async def send(data: dict | str) -> None:
            await response.write(f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n".encode())

        try:
            if chat:
                await send(chunk(None, None, role=True))
            async for token in tokens:
                delta = text.push(token)
                if delta:
                    await send(chunk(delta, None))
            tail = text.finish()
            if tail:
                await send(chunk(tail, None))
            await send(chunk(None, finish_reason()))
            if req.include_usage:
                await send({**chunk(None, None), "choices": [], "usage": _usage(completion)})
        except RouteError as exc:
            log.warning("generation %s failed: %s", ident, exc)
            await send(_no_route(exc).body())
        except RequestRefused as exc:
            await send(ApiError(503 if exc.code in wire.DECLINES else 400, str(exc), code=exc.code).body())
        except ConnectionResetError:
            log.info("caller of %s hung up; stopping its generation", ident)
            return response
        finally:
            await tokens.aclose()
        await send("[DONE]")
        await response.write_eof()
        return response

    async def close_connections(_app: web.Application) -> None:
        await model.aclose()

    app = web.Application(middlewares=[guard(dashboard_key, DASHBOARD_PATHS), errors_and_auth])
    app.add_routes(routes)
    app.add_routes(dashboard_routes(metrics, lambda: list(model.nodes)))
    app.add_routes(static_routes())
    app.on_cleanup.append(close_connections)  # the connections kept to the nodes
    if store is not None:  # the client's block store, where verifiers fetch its dispute evidence
        app.add_routes(gateway_routes(store))
    return app
