"""Random deposits, receipts, redeems, withdrawals, stakes, unbonds and slashes against a model of the market.

After every step: every token is accounted for (holders and contracts sum to the total supply), each contract
holds exactly what it owes, and no node was ever paid more than its newest receipt.
"""

from itertools import count

import brownie
from hypothesis import strategies as st

from conftest import TOKEN
from node.chain import eip712
from scripts.deploy import UNBONDING_DELAY, WITHDRAWAL_TIMELOCK

SETTINGS = {"max_examples": 15, "stateful_step_count": 15, "deadline": None, "database": None}
START_DEPOSIT, START_STAKE = 40 * TOKEN, 50 * TOKEN
REQUEST_IDS = count(1)  # never reused, so no two runs send byte-identical slash transactions


class MarketMachine:
    st_client = st.integers(0, 1)
    st_node = st.integers(0, 1)
    st_amount = st.integers(1, 50)
    st_step = st.integers(0, 20)
    st_mask = st.integers(1, 3)
    st_rounds = st.lists(st.tuples(st_client, st_node, st_step, st.integers(0, 2)), min_size=1, max_size=6)
    st_bool = st.booleans()

    def __init__(cls, market, clients, nodes, accounts, treasury):
        cls.market, cls.clients, cls.nodes = market, clients[:2], nodes[:2]
        cls.reporter, cls.owner = accounts[1], accounts[0]
        cls.holders = [accounts[0], accounts[1], treasury, *cls.clients, *cls.nodes]
        cls.contracts = [market.escrow, market.stake, market.disputes]
        for client in cls.clients:  # every run starts with funded clients and staked nodes
            market.deposit(client, START_DEPOSIT)
        for node in cls.nodes:
            market.stake_for(node, START_STAKE)
        for account in [*cls.clients, *cls.nodes]:
            market.token.approve(market.escrow, 2**255, {"from": account})
            market.token.approve(market.stake, 2**255, {"from": account})

    def setup(self):
        self.signed = {}  # (client, node) -> (receipt, signature) with the highest amount signed
        self.paid = {}  # (client, node) -> tokens the model expects the channel to have paid

    # ---- escrow

    def rule_deposit(self, client="st_client", amount="st_amount"):
        self.market.fund(self.clients[client], amount * TOKEN)
        self.market.escrow.deposit(self.clients[client], amount * TOKEN, {"from": self.clients[client]})

    def rule_serve(self, rounds="st_rounds"):
        """Clients sign newer receipts; each time the node keeps it (0), redeems it (1) or redeems a batch (2)."""
        for client, node, step, settle in rounds:
            key = (client, node)
            previous = self.signed[key][0].cumulative_amount if key in self.signed else 0
            self.signed[key] = self.market.receipt(self.clients[client], self.nodes[node], previous + step * TOKEN,
                                                   nonce=previous + step)
            if settle == 1:
                self.rule_redeem(client, node)
            elif settle == 2:
                self.rule_redeem_batch(node, 3, step % 2 == 0)

    def rule_redeem(self, client="st_client", node="st_node"):
        key = (client, node)
        if key not in self.signed:
            return
        receipt, signature = self.signed[key]
        paid = self.paid.get(key, 0)
        if receipt.cumulative_amount <= paid:
            with brownie.reverts():
                self.market.redeem(receipt, signature, self.nodes[node])
            return
        balance = self.market.escrow.balanceOf(self.clients[client])
        tx = self.market.redeem(receipt, signature, self.nodes[node])
        pay = tx.events["ReceiptRedeemed"]["paid"]
        assert pay == min(receipt.cumulative_amount - paid, balance)
        self.paid[key] = paid + pay

    def rule_redeem_batch(self, node="st_node", mask="st_mask", twice="st_bool"):
        chosen = [c for c in range(2) if mask >> c & 1 and (c, node) in self.signed]
        if twice:
            chosen += chosen  # duplicates must pay once
        items = [self.market.batch_item(*self.signed[(c, node)]) for c in chosen]
        balances = {c: self.market.escrow.balanceOf(self.clients[c]) for c in chosen}
        tx = self.market.escrow.redeemBatch(self.nodes[node], items, {"from": self.nodes[node]})
        expected = 0
        for c in dict.fromkeys(chosen):
            due = max(self.signed[(c, node)][0].cumulative_amount - self.paid.get((c, node), 0), 0)
            pay = min(due, balances[c])
            self.paid[(c, node)] = self.paid.get((c, node), 0) + pay
            expected += pay
        assert tx.events["BatchRedeemed"]["paid"] == expected

    def rule_request_withdrawal(self, client="st_client", amount="st_amount"):
        account = self.clients[client]
        if self.market.escrow.balanceOf(account) >= amount * TOKEN:
            self.market.escrow.requestWithdrawal(amount * TOKEN, {"from": account})

    def rule_withdraw(self, client="st_client", wait="st_bool"):
        account = self.clients[client]
        amount, ready_at = self.market.escrow.pendingWithdrawalOf(account)
        if ready_at == 0:
            return
        if wait:
            brownie.chain.sleep(WITHDRAWAL_TIMELOCK + 1)
            brownie.chain.mine()
        if brownie.chain.time() < ready_at:
            with brownie.reverts():
                self.market.escrow.withdraw({"from": account})
        else:
            self.market.escrow.withdraw({"from": account})

    def rule_withdraw_earnings(self, node="st_node"):
        account = self.nodes[node]
        if self.market.escrow.earningsOf(account):
            self.market.escrow.withdrawEarnings(account, {"from": account})

    # ---- stake

    def rule_stake(self, node="st_node", amount="st_amount"):
        self.market.fund(self.nodes[node], amount * TOKEN)
        self.market.stake.stake(amount * TOKEN, {"from": self.nodes[node]})

    def rule_unbond(self, node="st_node", amount="st_amount"):
        account = self.nodes[node]
        if self.market.stake.bondedOf(account) >= amount * TOKEN:
            self.market.stake.unbond(amount * TOKEN, {"from": account})

    def rule_withdraw_stake(self, node="st_node"):
        account = self.nodes[node]
        info = self.market.stake.stakeOf(account)
        if info["unbonding"]:
            brownie.chain.sleep(UNBONDING_DELAY + 1)
            self.market.stake.withdraw({"from": account})

    def rule_slash_equivocation(self, node="st_node"):
        request = next(REQUEST_IDS).to_bytes(32, "big")
        a, sig_a = self.market.commitment(self.nodes[node], request=request, output=b"\x01" * 32)
        b, sig_b = self.market.commitment(self.nodes[node], request=request, output=b"\x02" * 32)
        before = self.market.stake.totalStakeOf(self.nodes[node])
        tx = self.market.disputes.slashEquivocation(a, sig_a, b, sig_b, {"from": self.reporter})
        assert tx.events["EquivocationSlashed"]["slashed"] == before
        assert self.market.stake.totalStakeOf(self.nodes[node]) == 0

    # ---- invariants

    def invariant_tokens_are_accounted_for_and_no_node_is_overpaid(self):
        escrow, stake, token = self.market.escrow, self.market.stake, self.market.token
        held = sum(token.balanceOf(a) for a in self.holders) + sum(token.balanceOf(c) for c in self.contracts)
        assert held == token.totalSupply()
        owed = sum(escrow.balanceOf(c) for c in self.clients) + sum(escrow.earningsOf(n) for n in self.nodes)
        assert token.balanceOf(escrow) == owed
        assert token.balanceOf(stake) == sum(stake.totalStakeOf(n) for n in self.nodes)
        assert token.balanceOf(self.market.disputes) == 0
        for (client, node), (receipt, _) in self.signed.items():
            paid, claimed = escrow.channelOf(self.clients[client], self.nodes[node])
            assert paid == self.paid.get((client, node), 0)
            assert paid <= claimed <= receipt.cumulative_amount

def test_market_state_machine(state_machine, market, clients, nodes, accounts, treasury):
    state_machine(MarketMachine, market, clients, nodes, accounts, treasury, settings=SETTINGS)
