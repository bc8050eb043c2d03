"""`shardmarket client deposit|balance|withdraw|withdraw-credit`: the client's escrow account that pays nodes, and its
dispute credit."""

from __future__ import annotations

import argparse

from shardmarket.cli.keys import add_password_file
from shardmarket.cli.operator import add_credit_command, chain_command, connect, parse_amount, print_tx


def add_wallet_commands(group) -> None:
    """Add the escrow commands to the `client` command group."""
    deposit = group.add_parser("deposit", help="deposit tokens into the escrow that pays nodes")
    deposit.add_argument("amount", type=parse_amount, help="token units")
    add_password_file(deposit)
    deposit.set_defaults(run=chain_command(cmd_deposit))
    balance = group.add_parser("balance", help="escrow balance, pending withdrawal and wallet tokens")
    add_password_file(balance)
    balance.set_defaults(run=chain_command(cmd_balance))
    withdraw = group.add_parser("withdraw", help="request a withdrawal (nodes redeem first), or --complete it after the timelock")
    withdraw.add_argument("amount", type=parse_amount, nargs="?", help="token units to request")
    withdraw.add_argument("--complete", action="store_true", help="withdraw the requested amount once the timelock has passed")
    add_password_file(withdraw)
    withdraw.set_defaults(run=chain_command(cmd_withdraw))
    add_credit_command(group)


def cmd_deposit(args: argparse.Namespace) -> None:
    market = connect(args)
    print_tx(
        "approve",
        market.transact(market.token.functions.approve(market.addresses["PaymentEscrow"], args.amount), "approving the deposit"),
    )
    print_tx(
        f"deposit {args.amount}", market.transact(market.escrow.functions.deposit(market.address, args.amount), "depositing")
    )


def cmd_balance(args: argparse.Namespace) -> None:
    market = connect(args)
    me = market.address
    escrow = market.escrow.functions
    withdrawal = market.read(escrow.pendingWithdrawalOf(me))
    print(f"client {me}")
    print(f"escrow balance {market.read(escrow.balanceOf(me))}, spendable {market.read(escrow.spendableOf(me))}")
    if withdrawal.readyAt:
        print(f"withdrawal of {withdrawal.amount} requested, possible from timestamp {withdrawal.readyAt}")
    print(f"wallet tokens {market.read(market.token.functions.balanceOf(me))}")
    print(f"dispute credit (withdraw-credit) {market.read(market.disputes.functions.creditOf(me))}")


def cmd_withdraw(args: argparse.Namespace) -> None:
    market = connect(args)
    if args.complete:
        print_tx("withdraw", market.transact(market.escrow.functions.withdraw(), "withdrawing"))
    elif args.amount:
        receipt = market.transact(market.escrow.functions.requestWithdrawal(args.amount), "requesting a withdrawal")
        print_tx(f"withdrawal of {args.amount} requested (complete it with --complete after the timelock)", receipt)
    else:
        raise SystemExit("error: give an AMOUNT to request, or --complete")
