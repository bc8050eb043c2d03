"""`shardmarket node register|update|pause|unpause|status|earnings|redeem|unbond|withdraw`: the operator's side of
the chain."""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING

from eth_utils import is_address, to_checksum_address
from web3.exceptions import BadFunctionCallOutput

from shardmarket.chain import units
from shardmarket.chain.contracts import CONTRACTS, ChainError, Market
from shardmarket.chain.deployments import deployments_path
from shardmarket.chain.keys import KeystoreError, load_account, read_password, x25519_public
from shardmarket.chain.units import AMOUNT_HELP, Amount, AmountError, TokenUnits
from shardmarket.cli.keys import add_password_file, home_keys
from shardmarket.config import load_config

if TYPE_CHECKING:
    from web3.types import TxReceipt


def parse_amount(text: str) -> Amount:
    """An amount as typed (tokens, or raw base units with 'raw' or an exponent); `connect` turns it into raw units."""
    try:
        return units.parse_amount(text)
    except AmountError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def resolve_amounts(args: argparse.Namespace, token: TokenUnits) -> None:
    """Replace every amount in `args` by its raw base units in `token`, and keep `token` as args.units for printing."""
    for name, value in vars(args).items():
        if isinstance(value, Amount):
            try:
                setattr(args, name, value.raw(token))
            except AmountError as exc:
                raise ChainError(str(exc)) from None
    args.units = token


def add_raw_flag(parser: argparse.ArgumentParser) -> None:
    """`--raw`: print amounts as integers of the token's base units, for scripts."""
    parser.add_argument("--raw", action="store_true", help="print amounts in raw base units (integers) instead of tokens")


def amount_format(args: argparse.Namespace) -> Callable[[int], str]:
    """How the command prints an amount: tokens with the symbol, or raw base units with --raw."""
    return str if getattr(args, "raw", False) else args.units.format


def connect(args: argparse.Namespace) -> Market:
    """The market with this home's account unlocked; ChainError when the deployment's contracts are not on the chain
    (a transaction to an empty address would succeed and do nothing)."""
    account = load_account(read_password(getattr(args, "password_file", None)), home_keys())
    market = Market.connect(load_config().chain, account)
    missing = [
        name
        for name in CONTRACTS
        if name in market.addresses and not market.w3.eth.get_code(to_checksum_address(market.addresses[name]))
    ]
    if missing:
        raise ChainError(f"no contract at the addresses of {', '.join(missing)}: {deployment_advice()}")
    resolve_amounts(args, market.units())
    return market


def deployment_advice() -> str:
    """What is wrong when the deployments file does not match the chain, and what to do."""
    chain = load_config().chain
    path = deployments_path(chain.chain_id, chain.deployments_dir)
    return (
        f"{path} does not match the chain at {chain.rpc_url} (a dev chain restarted empty?); deploy the contracts "
        "again (`brownie run scripts/deploy.py --network NAME`) or point SHARDMARKET_CHAIN_DEPLOYMENTS_DIR or "
        "SHARDMARKET_CHAIN_RPC_URL at the matching deployment and chain"
    )


def chain_command(handler):
    """Wrap a command so chain and keystore errors print one clear line and exit 1."""

    def run(args: argparse.Namespace) -> int:
        try:
            return handler(args) or 0
        except (ChainError, KeystoreError) as exc:
            print(f"error: {exc}", file=sys.stderr)
        except BadFunctionCallOutput:
            print(
                f"error: the contracts there do not answer as shardmarket's contracts do: {deployment_advice()}", file=sys.stderr
            )
        return 1

    return run


def print_tx(what: str, receipt: TxReceipt) -> None:
    print(f"{what}: tx {receipt['transactionHash'].hex()} ({receipt['gasUsed']} gas)", flush=True)


def add_operator_commands(group) -> None:
    """Add the chain-side operator commands to the `node` command group."""
    reg = group.add_parser("register", help="stake and register a layer range of a published model")
    reg.add_argument("--model", required=True, help="model name as published on the ModelRegistry")
    reg.add_argument("--layers", required=True, help="layer range A:B (half-open)")
    reg.add_argument("--price", type=parse_amount, required=True, help=f"price per token processed; {AMOUNT_HELP}")
    reg.add_argument(
        "--stake",
        type=parse_amount,
        required=True,
        help=f"stake to add now (with what is staked: at least the minimum); {AMOUNT_HELP}",
    )
    reg.add_argument("--endpoint", help="URL clients reach this node at (default: http://node.host:node.port)")
    add_password_file(reg)
    reg.set_defaults(run=chain_command(cmd_register))

    upd = group.add_parser("update", help="change price, endpoint, layers or model of the registration")
    upd.add_argument("--model")
    upd.add_argument("--layers")
    upd.add_argument("--price", type=parse_amount, help=f"new price per token processed; {AMOUNT_HELP}")
    upd.add_argument("--endpoint")
    add_password_file(upd)
    upd.set_defaults(run=chain_command(cmd_update))

    for name, helptext, handler in (
        ("pause", "stop being listed (keeps the registration)", cmd_pause),
        ("unpause", "be listed again", cmd_unpause),
        ("status", "registration, stake and earnings; the running node's dashboard summary", cmd_status),
        ("earnings", "per client: the newest tab's promise to this node, redeemed and pending", cmd_earnings),
        ("redeem", "settle every client's tab that owes this node, in one transaction, and withdraw the earnings", cmd_redeem),
        ("withdraw", "withdraw unbonded stake after the unbonding delay", cmd_withdraw),
    ):
        sub = group.add_parser(name, help=helptext)
        add_password_file(sub)
        if name in ("status", "earnings", "redeem"):
            add_raw_flag(sub)
        sub.set_defaults(run=chain_command(handler))
    unbond = group.add_parser("unbond", help="start unbonding stake (withdraw after the delay)")
    unbond.add_argument("amount", type=parse_amount, help=AMOUNT_HELP)
    add_password_file(unbond)
    unbond.set_defaults(run=chain_command(cmd_unbond))
    add_credit_command(group)


def add_credit_command(group) -> None:
    """Add `withdraw-credit` (dispute payouts: bonds, rewards, refunds) to a command group."""
    credit = group.add_parser("withdraw-credit", help="withdraw what disputes credited this account (bonds, rewards)")
    credit.add_argument("--to", type=parse_address, help="send it to this address instead (e.g. when the token blocks yours)")
    add_password_file(credit)
    credit.set_defaults(run=chain_command(cmd_withdraw_credit))


def parse_address(text: str) -> str:
    """A 0x-prefixed 20-byte address, checksummed."""
    if not is_address(text):
        raise argparse.ArgumentTypeError(f"not an address: {text!r}")
    return to_checksum_address(text)


def parse_layers(text: str) -> tuple[int, int]:
    """`A:B` -> (A, B): the half-open layer range [A, B)."""
    try:
        start, end = (int(part) for part in text.split(":"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"layers must look like 0:10 (start:end), got {text!r}") from None
    if not 0 <= start < end:
        raise argparse.ArgumentTypeError(f"layers {text}: need 0 <= start < end")
    return start, end


def _layers(text: str) -> tuple[int, int]:
    try:
        return parse_layers(text)
    except argparse.ArgumentTypeError as exc:
        raise ChainError(str(exc)) from None


def _check_model(market: Market, name: str, start: int, end: int) -> bytes:
    model_id = market.model_id(name)
    count = market.read(market.models.functions.layerCountOf(model_id))
    if count == 0:
        raise ChainError(
            f"unknown model {name!r}: no such model on the ModelRegistry; publish it with `shardmarket model publish`"
        )
    if not 0 <= start < end <= count:
        raise ChainError(f"layer range {start}:{end} is outside the model {name!r}, which has layers 0:{count}")
    return model_id


def _endpoint(args: argparse.Namespace) -> str:
    config = load_config()
    return args.endpoint or f"http://{config.node.host}:{config.node.port}"


def cmd_register(args: argparse.Namespace) -> None:
    market = connect(args)
    start, end = _layers(args.layers)
    model_id = _check_model(market, args.model, start, end)
    me = market.address
    minimum = market.read(market.registry.functions.minStake())
    bonded = market.read(market.stake.functions.bondedOf(me))
    fmt = args.units.format
    if bonded + args.stake < minimum:
        raise ChainError(
            f"too little stake: the registry needs {fmt(minimum)} bonded, you have {fmt(bonded)} and add {fmt(args.stake)}; "
            "raise --stake"
        )
    held = market.read(market.token.functions.balanceOf(me))
    if held < args.stake:
        raise ChainError(f"too few tokens to stake {fmt(args.stake)}: {me} holds {fmt(held)}")
    print(f"registering {me} for layers {start}:{end} of {args.model} at {fmt(args.price)} per token", flush=True)
    if args.stake:
        print_tx(
            "approve",
            market.transact(market.token.functions.approve(market.addresses["StakeManager"], args.stake), "approving the stake"),
        )
        print_tx(f"stake {fmt(args.stake)}", market.transact(market.stake.functions.stake(args.stake), "staking"))
    key = x25519_public(home_keys())
    receipt = market.transact(
        market.registry.functions.register(model_id, start, end, args.price, key, [_endpoint(args)]), "registering the node"
    )
    print_tx(f"register at {_endpoint(args)}", receipt)


def cmd_update(args: argparse.Namespace) -> None:
    market = connect(args)
    node = market.read(market.registry.functions.getNode(market.address), "reading the registration")
    start, end, model_id = node.layerStart, node.layerEnd, node.modelId
    if args.layers:
        start, end = _layers(args.layers)
    if args.model:
        model_id = _check_model(market, args.model, start, end)
    price = args.price if args.price is not None else node.pricePerToken
    endpoints = [args.endpoint] if args.endpoint else list(node.endpoints)
    call = market.registry.functions.update(model_id, start, end, price, x25519_public(home_keys()), endpoints)
    print_tx("update", market.transact(call, "updating the registration"))


def cmd_pause(args: argparse.Namespace) -> None:
    market = connect(args)
    print_tx("pause", market.transact(market.registry.functions.pause(), "pausing"))


def cmd_unpause(args: argparse.Namespace) -> None:
    market = connect(args)
    print_tx("unpause", market.transact(market.registry.functions.unpause(), "unpausing"))


def cmd_status(args: argparse.Namespace) -> None:
    market = connect(args)
    me = market.address
    fmt = amount_format(args)
    stake = market.read(market.stake.functions.stakeOf(me))
    print(f"operator {me}")
    print(
        f"stake: bonded {fmt(stake.bonded)}, unbonding {fmt(stake.unbonding)} (ready at {stake.unbondReadyAt}), "
        f"dispute locks {stake.locks}"
    )
    print(f"escrow earnings (redeemed, not withdrawn): {fmt(market.read(market.escrow.functions.earningsOf(me)))}")
    print(f"dispute credit (withdraw-credit): {fmt(market.read(market.disputes.functions.creditOf(me)))}")
    try:
        node = market.read(market.registry.functions.getNode(me))
    except ChainError:
        print("not registered")
        return
    model = market.read(market.models.functions.getModel(node.modelId))
    listed = market.read(market.registry.functions.isListed(me))
    print(
        f"serving layers {node.layerStart}:{node.layerEnd} of {model.name} at {fmt(node.pricePerToken)} per token on "
        f"{', '.join(node.endpoints)}; {'listed' if listed else 'NOT listed'}{' (paused)' if node.paused else ''}"
    )
    print_node_summary(fmt)


def print_node_summary(fmt: Callable[[int], str]) -> None:
    """What the running node's dashboard shows, read from its /dashboard/summary.json on this machine."""
    import requests

    node = load_config().node
    host = "127.0.0.1" if node.host in ("0.0.0.0", "::", "") else node.host
    url = f"http://{host}:{node.port}/dashboard/summary.json"
    headers = {"Authorization": f"Bearer {node.dashboard_key}"} if node.dashboard_key else {}
    try:
        s = requests.get(url, headers=headers, timeout=5).json()
    except (requests.RequestException, ValueError):
        s = None
    if not isinstance(s, dict) or "load" not in s:
        print(f"no node of this home answers at {url} (start it with `shardmarket node up` or `node run`)")
        return
    load, reach = s["load"], s["reachability"]
    checked = "never" if reach["checked_at"] is None else time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(reach["checked_at"]))
    print(
        f"running: layers {s['layers'][0]}:{s['layers'][1]} of {s['num_layers']}, up {s['uptime_s']:.0f} s; "
        f"{load['sessions']} session(s), {load['queued']} queued, {load['steps_served']} steps served, "
        f"{load['tokens_per_s']:.2f} tokens/s over the last minute, decode step {load['decode_ms']:.1f} ms, "
        f"KV cache {100 * load['kv_cache']:.1f} % in use"
    )
    print(
        f"reachability: {reach['method']} at {reach['endpoint']}, "
        f"{'verified' if reach['verified'] else 'not verified'} from outside, last outside check {checked}"
    )
    money = s.get("earnings")
    if money is None:
        return
    print(f"earned (promised by tabs) {fmt(money['promised'])}, settled {fmt(money['settled'])}, pending {fmt(money['pending'])}")
    for c in money["clients"]:
        print(f"  client {c['client']}: earned {fmt(c['promised'])}, settled {fmt(c['settled'])}, pending {fmt(c['pending'])}")
    settlement, disputes = s["settlement"], s["disputes"]
    next_at = time.strftime("%H:%M:%S UTC", time.gmtime(settlement["next_check_at"]))
    print(
        f"settlement: next check {next_at} (settles once {fmt(settlement['min_value'])} is pending, at once when a client "
        f"asks to withdraw); {len(settlement['transactions'])} settlement(s) by this run, {settlement['gas']} gas"
    )
    print(f"disputes: {disputes['accused']} against this node, {disputes['verifier']} on its verifier panel")


def _node_books(args: argparse.Namespace):
    """The market with this home's account unlocked, its address, and the tabs this node holds."""
    from shardmarket.server.tabs import TabStore, tab_store_path

    market = connect(args)
    return market, market.address, TabStore(tab_store_path(load_config().node.data_dir), market.address)


def cmd_earnings(args: argparse.Namespace) -> None:
    from shardmarket.server.settlement import sync_paid_vectors

    market, me, store = _node_books(args)
    confirmations = load_config().chain.confirmations
    if sync_paid_vectors(market, store, confirmations=confirmations):
        print("the chain forgot blocks this node had read: the settlements they held are pending again", file=sys.stderr)
    rows = store.all()
    fmt = amount_format(args) if args.raw else args.units.tokens
    unit = "raw base units" if args.raw else args.units.symbol
    print(f"amounts in {unit}")
    print(f"{'client':44} {'tab':>6} {'served':>20} {'promised':>20} {'redeemed':>20} {'unconfirmed':>20} {'pending':>20}")
    for s in rows:
        unconfirmed = s.redeemed - s.redeemed_final
        print(
            f"{s.client:44} {s.tab.seq:>6} {fmt(s.served):>20} {fmt(s.entry):>20} {fmt(s.redeemed_final):>20} "
            f"{fmt(unconfirmed):>20} {fmt(s.owed):>20}"
        )
    redeemed = market.read(market.escrow.functions.earningsOf(me))
    print(
        f"total pending {fmt(sum(s.owed for s in rows))}; redeemed, in the escrow: {fmt(redeemed)} (a settlement counts as "
        f"redeemed "
        f"once {confirmations} block(s) are on top of it)"
    )
    _print_claims(store.claims(), amount_format(args))


def _print_claims(claims: Iterable, fmt: Callable[[int], str]) -> None:
    """One line per claim this node sent."""
    for c in claims:
        why = "it had settled a newer tab promising this node less" if c.lowered else "settling could not collect it"
        print(
            f"claim on client {c.client}'s tab {c.tab_seq} ({why}) collected {fmt(c.amount)}, {fmt(c.from_reserve)} of it out of "
            f"its reserve for this node: tx {c.tx}"
        )


def cmd_redeem(args: argparse.Namespace) -> None:
    from shardmarket.server.settlement import settle_pending

    market, me, store = _node_books(args)
    fmt = amount_format(args)
    claimed = set(store.claims())
    for r in settle_pending(market, store, confirmations=load_config().chain.confirmations):
        print(f"settled {r.tabs} client tab(s), {fmt(r.paid)} to this node: tx {r.tx} ({r.gas} gas)")
    _print_claims((c for c in store.claims() if c not in claimed), fmt)
    earnings = market.read(market.escrow.functions.earningsOf(me))
    if earnings:
        print_tx(
            f"withdraw earnings {fmt(earnings)} to {me}",
            market.transact(market.escrow.functions.withdrawEarnings(me), "withdrawing earnings"),
        )
    else:
        print("no earnings to withdraw")


def cmd_unbond(args: argparse.Namespace) -> None:
    market = connect(args)
    print_tx(f"unbond {args.units.format(args.amount)}", market.transact(market.stake.functions.unbond(args.amount), "unbonding"))


def cmd_withdraw(args: argparse.Namespace) -> None:
    market = connect(args)
    print_tx("withdraw stake", market.transact(market.stake.functions.withdraw(), "withdrawing stake"))


def cmd_withdraw_credit(args: argparse.Namespace) -> None:
    market = connect(args)
    credit = market.read(market.disputes.functions.creditOf(market.address))
    if not credit:
        raise SystemExit(f"error: {market.address} has no dispute credit (disputes credit bonds, rewards and refunds)")
    to = args.to or market.address
    receipt = market.transact(market.disputes.functions.withdrawCredit(to), "withdrawing the dispute credit")
    print_tx(f"withdraw dispute credit {args.units.format(credit)} to {to}", receipt)
