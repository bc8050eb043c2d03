"""`shardmarket client deposit|balance|withdraw|withdraw-credit|reserve|release`: the client's escrow account that
pays nodes, its dispute credit, and the reserves it sets aside for single nodes."""

from __future__ import annotations

import argparse

from eth_utils import to_checksum_address

from shardmarket.chain.contracts import Market
from shardmarket.chain.eip712 import Domain, Permit, sign_permit
from shardmarket.chain.units import AMOUNT_HELP
from shardmarket.cli.keys import add_password_file
from shardmarket.cli.operator import (
    add_credit_command,
    add_raw_flag,
    amount_format,
    chain_command,
    connect,
    parse_amount,
    print_tx,
)


def add_wallet_commands(group) -> None:
    """Add the escrow commands to the `client` command group."""
    deposit = group.add_parser("deposit", help="deposit tokens into the escrow that pays nodes")
    deposit.add_argument("amount", type=parse_amount, help=AMOUNT_HELP)
    deposit.add_argument(
        "--no-permit",
        action="store_true",
        help="approve, then deposit (two transactions), for a token without EIP-2612 permit; default: one permit signature",
    )
    add_password_file(deposit)
    deposit.set_defaults(run=chain_command(cmd_deposit))
    balance = group.add_parser("balance", help="escrow balance, pending withdrawal and wallet tokens")
    add_raw_flag(balance)
    add_password_file(balance)
    balance.set_defaults(run=chain_command(cmd_balance))
    withdraw = group.add_parser("withdraw", help="request a withdrawal (nodes redeem first), or --complete it after the timelock")
    withdraw.add_argument("amount", type=parse_amount, nargs="?", help=f"amount to request; {AMOUNT_HELP}")
    withdraw.add_argument("--complete", action="store_true", help="withdraw the requested amount once the timelock has passed")
    add_password_file(withdraw)
    withdraw.set_defaults(run=chain_command(cmd_withdraw))
    add_credit_command(group)
    reserve = group.add_parser("reserve", help="set part of the escrow balance aside for one node (only it can draw on it)")
    reserve.add_argument("node", help="the node's operator address")
    reserve.add_argument("amount", type=parse_amount, help=AMOUNT_HELP)
    add_password_file(reserve)
    reserve.set_defaults(run=chain_command(cmd_reserve))
    release = group.add_parser("release", help="ask for a node's reserve back (the node claims first), or --complete it")
    release.add_argument("node", help="the node's operator address")
    release.add_argument("--complete", action="store_true", help="move the reserve back to the balance once the timelock passed")
    add_password_file(release)
    release.set_defaults(run=chain_command(cmd_release))


def cmd_deposit(args: argparse.Namespace) -> None:
    market = connect(args)
    if not args.no_permit:
        call = deposit_with_permit(market, args.amount)
        print_tx(f"deposit {args.units.format(args.amount)} (EIP-2612 permit)", market.transact(call, "depositing"))
        return
    print_tx(
        "approve",
        market.transact(market.token.functions.approve(market.addresses["PaymentEscrow"], args.amount), "approving the deposit"),
    )
    print_tx(
        f"deposit {args.units.format(args.amount)}",
        market.transact(market.escrow.functions.deposit(market.address, args.amount), "depositing"),
    )


def deposit_with_permit(market: Market, amount: int, deadline_s: int = 3600):
    """The escrow call that deposits `amount` for the account, approved by a permit it signs (valid `deadline_s`)."""
    me, escrow = market.address, market.addresses["PaymentEscrow"]
    token = market.token.functions
    nonce, name = market.read(token.nonces(me), "reading the permit nonce"), market.read(token.name())
    deadline = market.w3.eth.get_block("latest")["timestamp"] + deadline_s
    permit = Permit(me, escrow, amount, nonce, deadline)
    assert market.account is not None  # connect() unlocked it
    v, r, s = sign_permit(market.account.key, permit, name, Domain(market.chain_id, market.addresses["TestToken"]))
    return market.escrow.functions.depositWithPermit(me, amount, deadline, v, r, s)


def cmd_balance(args: argparse.Namespace) -> None:
    market = connect(args)
    me = market.address
    escrow = market.escrow.functions
    fmt = amount_format(args)
    withdrawal = market.read(escrow.pendingWithdrawalOf(me))
    print(f"client {me}")
    print(f"escrow balance {fmt(market.read(escrow.balanceOf(me)))}, spendable {fmt(market.read(escrow.spendableOf(me)))}")
    if withdrawal.readyAt:
        print(f"withdrawal of {fmt(withdrawal.amount)} requested, possible from timestamp {withdrawal.readyAt}")
    funded = market.escrow.events.ReserveFunded.get_logs(from_block=0, argument_filters={"client": me})
    for node in sorted({entry["args"]["node"] for entry in funded}):
        reserve = market.read(escrow.reserveOf(me, node))
        if reserve.amount:
            release = f", released from timestamp {reserve.releaseAt}" if reserve.releaseAt else ""
            print(f"reserve for node {node}: {fmt(reserve.amount)}{release}")
    print(f"wallet tokens {fmt(market.read(market.token.functions.balanceOf(me)))}")
    print(f"dispute credit (withdraw-credit) {fmt(market.read(market.disputes.functions.creditOf(me)))}")


def cmd_withdraw(args: argparse.Namespace) -> None:
    market = connect(args)
    if args.complete:
        print_tx("withdraw", market.transact(market.escrow.functions.withdraw(), "withdrawing"))
    elif args.amount:
        receipt = market.transact(market.escrow.functions.requestWithdrawal(args.amount), "requesting a withdrawal")
        print_tx(
            f"withdrawal of {args.units.format(args.amount)} requested (complete it with --complete after the timelock)", receipt
        )
    else:
        raise SystemExit("error: give an AMOUNT to request, or --complete")


def cmd_reserve(args: argparse.Namespace) -> None:
    market = connect(args)
    node = to_checksum_address(args.node)
    receipt = market.transact(market.escrow.functions.fundReserves([node], [args.amount]), "reserving")
    print_tx(f"reserved {args.units.format(args.amount)} for node {node}", receipt)


def cmd_release(args: argparse.Namespace) -> None:
    market = connect(args)
    node = to_checksum_address(args.node)
    if args.complete:
        print_tx(f"reserve for node {node} released", market.transact(market.escrow.functions.releaseReserve(node), "releasing"))
    else:
        receipt = market.transact(market.escrow.functions.requestReserveRelease(node), "requesting a reserve release")
        print_tx(f"release of the reserve for node {node} requested (complete it with --complete after the timelock)", receipt)
