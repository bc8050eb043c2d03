"""`shardmarket client serve|chat`: use a model through the nodes that serve its layers."""

from __future__ import annotations

import argparse
import asyncio
import logging
import secrets
import sys
from pathlib import Path

from shardmarket.config import load_config


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--checkpoint", type=Path, help="local checkpoint for the tokenizer, embeddings and LM head (default: the default model)"
    )
    parser.add_argument("--nodes", help="comma-separated node base URLs (config client.nodes)")
    parser.add_argument("--model-id", help="model name the nodes must serve (default: the checkpoint folder's name)")
    parser.add_argument("--transport", choices=["tcp", "ws"], help="session transport (config client.transport)")
    parser.add_argument(
        "--password-file", type=Path, help="keystore password file (paid mode; else SHARDMARKET_PASSWORD or a prompt)"
    )
    parser.add_argument(
        "--trust",
        help="comma-separated operator addresses whose nodes may serve private requests (adds to client.trusted_operators)",
    )
    parser.add_argument(
        "--private", action="store_true", help="only trusted operators' nodes see the request, or it fails (client.private)"
    )
    parser.add_argument("--relay", help="HOST:PORT of a relay that forwards clients to nodes (client.relay)")
    parser.add_argument(
        "--hidden", action="store_true", help="reach every node through the relay: no node sees this address (client.hidden)"
    )


def register(commands) -> None:
    group = commands.add_parser("client", help="use a model through the network").add_subparsers(
        dest="client_command", required=True
    )
    serve = group.add_parser("serve", help="serve an OpenAI-compatible API backed by the nodes")
    _common(serve)
    serve.add_argument("--host", help="listen address (config client.api_host)")
    serve.add_argument("--port", type=int, help="listen port (config client.api_port)")
    serve.set_defaults(run=run_serve)
    chat = group.add_parser("chat", help="ask one question and stream the answer")
    _common(chat)
    chat.add_argument("prompt")
    chat.add_argument("--system", help="system message")
    chat.add_argument("--max-tokens", type=int, default=256)
    chat.add_argument("--temperature", type=float, default=0.0)
    chat.set_defaults(run=run_chat)
    from shardmarket.cli.wallet import add_wallet_commands

    add_wallet_commands(group)


def _has_keystore() -> bool:
    from shardmarket.chain.keys import KEYSTORE_FILE
    from shardmarket.cli.keys import home_keys

    return (home_keys() / KEYSTORE_FILE).exists()


async def _connect(args: argparse.Namespace):
    from shardmarket.chain.commitment import commitment_domain
    from shardmarket.client.generation import RemoteModel

    config = load_config()
    privacy = _privacy(args, config)
    checkpoint = args.checkpoint
    if checkpoint is None:
        from shardmarket.engine.models import default_model

        checkpoint = await asyncio.to_thread(default_model, config.home / "models")
    urls = [u.strip() for u in args.nodes.split(",") if u.strip()] if args.nodes else config.client.nodes
    if not urls and _has_keystore():
        from shardmarket.chain.keys import load_account, read_password
        from shardmarket.cli.keys import home_keys
        from shardmarket.client.market import connect_paid

        account = load_account(read_password(args.password_file), home_keys())
        return await connect_paid(
            checkpoint,
            config,
            account,
            args.model_id or checkpoint.name,
            transport=args.transport or config.client.transport,
            step_timeout_s=config.client.step_timeout_s,
            push=config.client.push,
            privacy=privacy,
            max_draft=config.client.max_draft,
        )
    if not urls:
        raise SystemExit("error: no nodes known: pass --nodes http://HOST:PORT,... or set client.nodes in the config")
    return await RemoteModel.connect(
        checkpoint,
        urls,
        commitment_domain(config.chain.chain_id, config.chain.deployments_dir),
        model_id=args.model_id,
        transport=args.transport or config.client.transport,
        step_timeout_s=config.client.step_timeout_s,
        push=config.client.push,
        privacy=privacy,
        max_draft=config.client.max_draft,
    )


def _privacy(args: argparse.Namespace, config):
    """The client's privacy defaults: the config's, raised by the command line."""
    from shardmarket.client.generation import Privacy

    trusted = config.client.trusted_operators + ([a.strip() for a in args.trust.split(",") if a.strip()] if args.trust else [])
    try:
        return Privacy.of(
            trusted, args.relay or config.client.relay, args.private or config.client.private, args.hidden or config.client.hidden
        )
    except ValueError as exc:
        raise SystemExit(f"error: {exc}") from None


def run_serve(args: argparse.Namespace) -> int:
    from aiohttp import web

    from shardmarket.chain.contracts import ChainError
    from shardmarket.chain.keys import KeystoreError
    from shardmarket.client.api import build_api
    from shardmarket.client.metrics import ClientMetrics
    from shardmarket.client.routing import RouteError

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = load_config()
    api_key = config.client.api_key or secrets.token_urlsafe(24)
    host, port = args.host or config.client.api_host, args.port or config.client.api_port

    async def app() -> web.Application:
        model = await _connect(args)
        print(f"OpenAI-compatible API on http://{host}:{port}/v1 serving {model.model_id}", flush=True)
        if not config.client.api_key:
            print(f"API key (set SHARDMARKET_CLIENT_API_KEY to choose one): {api_key}", flush=True)
        from shardmarket.ipfs.blockstore import Blockstore

        metrics = ClientMetrics(model.model_id)
        if model.market is not None:
            metrics.units = await asyncio.to_thread(model.market.units)
        print(f"dashboard: http://{host}:{port}/dashboard (metrics at /metrics)", flush=True)
        return build_api(
            model, api_key, store=Blockstore(config.ipfs.store), metrics=metrics, dashboard_key=config.client.dashboard_key
        )

    try:
        web.run_app(app(), host=host, port=port, print=None, access_log=None)
    except (RouteError, ChainError, KeystoreError) as exc:
        print(f"error: {exc}")
        return 1
    return 0


def run_chat(args: argparse.Namespace) -> int:
    from shardmarket.chain.contracts import ChainError
    from shardmarket.chain.keys import KeystoreError
    from shardmarket.client.generation import Completion
    from shardmarket.client.routing import RouteError
    from shardmarket.client.text import TextStream
    from shardmarket.engine.sampling import SamplingParams

    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")

    async def chat() -> None:
        model = await _connect(args)
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + [
            {"role": "user", "content": args.prompt}
        ]
        ids = model.chat_ids(messages)
        text = TextStream(model.head.tokenizer)
        completion = Completion(prompt_tokens=len(ids))
        params = SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature)
        try:
            async for token in model.stream(ids, params, completion):
                sys.stdout.write(text.push(token))
                sys.stdout.flush()
        finally:
            await model.aclose()
        sys.stdout.write(text.finish() + "\n")

    try:
        asyncio.run(chat())
    except (RouteError, ChainError, KeystoreError) as exc:
        print(f"\nerror: {exc}", file=sys.stderr)
        return 1
    return 0
