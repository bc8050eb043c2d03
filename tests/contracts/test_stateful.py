"""Random deposits, tabs, settlements, withdrawals, stakes, unbonds, slashes and disputes against a model of the market.

Clients sometimes sign a tab lowering a node's entry, and the node claims the older promise (claim). Clients fund
reserves for nodes; a node acknowledges a tab only while what it promises the node beyond what the node was paid fits
in the node's reserve (the node's payment check). A client sometimes drains its balance to an alias with a newer tab,
and the chain sometimes forgets recent blocks (a reorg: the state goes back to a snapshot).
After every step: every token is accounted for (holders and contracts sum to the total supply), each contract
holds exactly what it owes, no node was ever paid more than the most any of its client's tabs promised it, every node
can still collect all it acknowledged, and the escrow's stored paid vector is the model's. Disputes: a node of the panel
section signs a commitment, then pauses, deregisters, unbonds or moves to another slice; the challenge still goes
through, its panel is drawn from the slice the commitment names, and every payout waits as a credit (the
DisputeManager holds exactly the credits).
"""

import copy
from itertools import count

import brownie
from hypothesis import strategies as st

from scripts.deploy import DISPUTE_PARAMS, UNBONDING_DELAY, WITHDRAWAL_TIMELOCK
from shardmarket.chain import eip712
from shardmarket.chain.contracts import DisputeStatus

from conftest import TOKEN


def vector_of(paid: dict) -> tuple:
    """The model's paid amounts {node: amount} as the escrow's paid vector (sorted, the nodes paid nothing left out)."""
    return tuple(eip712.Entry(n, a) for n, a in sorted(paid.items(), key=lambda item: int(item[0], 16)) if a)


def aligned_item(tab, signature, paid: dict) -> bytes:
    """settleTabs' item for `tab` with the paid amounts of `paid` aligned with its entries, without the Python packer's
    check that the tab names every node paid (an attacker or a careless settler skips it)."""
    packed = eip712.pack_tab(tab, signature)
    if not any(paid.values()):
        return packed
    amounts = b"".join(paid.get(e.node, 0).to_bytes(eip712.PAID_BYTES, "big") for e in tab.entries)
    count_at = eip712.TAB_PAID_COUNT
    return packed[:count_at] + bytes([len(tab.entries)]) + packed[count_at + 1 :] + amounts


SETTINGS = {"max_examples": 15, "stateful_step_count": 15, "deadline": None, "database": None}
START_DEPOSIT, START_STAKE = 15 * TOKEN, 50 * TOKEN  # small deposits: settlements often run short
REQUEST_IDS = count(1)  # never reused, so no two runs send byte-identical slash transactions
BOND = DISPUTE_PARAMS["challengeBond"]
PANEL_STAKE = 100 * TOKEN  # the registry's minimum: a slashed or penalized panel node drops out of later draws


class MarketMachine:
    st_client = st.integers(0, 1)
    st_node = st.integers(0, 2)
    st_amount = st.integers(1, 50)
    st_step = st.integers(0, 20)
    st_rounds = st.lists(
        st.tuples(st_client, st.lists(st.tuples(st_node, st_step), min_size=1, max_size=3), st.integers(0, 3)),
        min_size=1,
        max_size=6,
    )
    st_bool = st.booleans()

    def __init__(cls, market, clients, nodes, accounts, treasury):
        cls.market, cls.clients, cls.nodes, cls.alias = market, clients[:2], nodes[:3], accounts[2]
        cls.reporter, cls.owner = accounts[1], accounts[0]
        cls.holders = [accounts[0], accounts[1], treasury, *cls.clients, *cls.nodes, cls.alias]
        cls.contracts = [market.escrow, market.stake, market.disputes]
        for client in cls.clients:  # every run starts with funded clients and staked nodes
            market.deposit(client, START_DEPOSIT)
        for node in cls.nodes:
            market.stake_for(node, START_STAKE)
        for account in [*cls.clients, *cls.nodes]:
            market.token.approve(market.escrow, 2**255, {"from": account})
            market.token.approve(market.stake, 2**255, {"from": account})
        cls.init_disputes(market, nodes[3:7], treasury)

    def setup(self):
        self.tabs = {}  # client -> [(tab, signature)] every tab it signed, oldest first
        self.paid = {}  # client -> {node address: tokens the model expects the escrow to have paid}
        self.settled_seq = {}  # client -> highest seq settled
        self.reserves = {}  # client -> {node address: its reserve}
        self.acked = {}  # client -> {node address: the most a tab the node acknowledged promised it}
        self.snapshot = None  # (chain snapshot id, the model then), for the chain to go back to

    # ---- escrow

    def rule_deposit(self, client="st_client", amount="st_amount"):
        self.market.fund(self.clients[client], amount * TOKEN)
        self.market.escrow.deposit(self.clients[client], amount * TOKEN, {"from": self.clients[client]})

    def rule_serve(self, rounds="st_rounds", reserving="st_bool"):
        """A client signs a newer tab raising some nodes' entries (reserving first, as the client software does, what
        each raised node would be owed, while its balance lasts); then nothing (0), a settlement of its newest tab (1),
        of an older one (2) or of its newest tab with a wrong previous vector (3) follows."""
        for client, raises, settle in rounds:
            signed = self.tabs.setdefault(client, [])
            amounts = {e.node: e.amount for e in signed[-1][0].entries} if signed else {}
            for node, step in raises:
                address = self.nodes[node].address
                amounts[address] = amounts.get(address, 0) + step * TOKEN
            if reserving:
                paid, reserves = self.paid.get(client, {}), self.reserves.get(client, {})
                for node, _ in raises:
                    address = self.nodes[node].address
                    short = amounts[address] - paid.get(address, 0) - reserves.get(address, 0)
                    if short > 0 and self.market.escrow.balanceOf(self.clients[client]) >= short:
                        self.market.fund_reserves(self.clients[client], {address: short})
                        self.reserves.setdefault(client, {})[address] = reserves.get(address, 0) + short
            signed.append(self.market.tab(self.clients[client], amounts, seq=len(signed) + 1))
            self._acknowledge(client, signed[-1][0])
            if settle:
                self.rule_settle(client, len(signed) - 1 if settle != 2 else 0, settle == 3)

    def _acknowledge(self, client, tab):
        """Each node the tab names acknowledges it if what it promises the node beyond what the node was paid fits in the
        node's reserve (a node's payment check), and is otherwise owed it at its own risk."""
        paid, reserves = self.paid.get(client, {}), self.reserves.get(client, {})
        acked = self.acked.setdefault(client, {})
        for entry in tab.entries:
            if entry.amount - paid.get(entry.node, 0) <= reserves.get(entry.node, 0):
                acked[entry.node] = max(acked.get(entry.node, 0), entry.amount)

    def rule_settle(self, client="st_client", which="st_step", wrong_previous="st_bool"):
        signed = self.tabs.get(client)
        if not signed:
            return
        tab, signature = signed[min(which, len(signed) - 1)]
        account = self.clients[client]
        paid = self.paid.setdefault(client, {})
        previous = dict(paid)
        if wrong_previous:
            previous = {n: a + 1 for n, a in previous.items()} or {tab.entries[0].node: 1}
        balance = self.market.escrow.balanceOf(account)
        tx = self.market.settle([aligned_item(tab, signature, previous)], self.nodes[0])
        names_every_paid_node = all(node in {e.node for e in tab.entries} for node, amount in paid.items() if amount)
        if wrong_previous or tab.seq < self.settled_seq.get(client, 0) or not names_every_paid_node:
            assert tx.return_value == 0 and "TabSettled" not in tx.events
            return
        expected = 0
        for entry in tab.entries:
            pay = min(max(entry.amount - paid.get(entry.node, 0), 0), balance)
            balance -= pay
            expected += pay
            paid[entry.node] = paid.get(entry.node, 0) + pay
        self.settled_seq[client] = tab.seq
        assert tx.return_value == expected
        assert self.market.paid_vector(tx, account) == vector_of(paid)

    def rule_lower(self, client="st_client", node="st_node", amount="st_amount", settle="st_bool"):
        """The client signs a tab raising a node's entry, then a newer one halving it, maybe settles that one; the node
        claims its older promise."""
        signed = self.tabs.setdefault(client, [])
        address = self.nodes[node].address
        amounts = {e.node: e.amount for e in signed[-1][0].entries} if signed else {}
        amounts[address] = amounts.get(address, 0) + amount * TOKEN
        signed.append(self.market.tab(self.clients[client], amounts, seq=len(signed) + 1))
        self._acknowledge(client, signed[-1][0])
        amounts[address] //= 2
        signed.append(self.market.tab(self.clients[client], amounts, seq=len(signed) + 1))
        if settle:
            self.rule_settle(client, len(signed) - 1, False)
        self.rule_claim(client, node)

    def rule_claim(self, client="st_client", node="st_node"):
        """The node claims the tab promising it the most: paid out of the balance, then out of its reserve."""
        signed, address = self.tabs.get(client, []), self.nodes[node].address
        if not signed:
            return
        tab = max(signed, key=lambda pair: pair[0].amount_for(address))
        self._claim(client, address, tab)

    def _claim(self, client, address, signed_tab):
        account, paid = self.clients[client], self.paid.setdefault(client, {})
        reserves = self.reserves.setdefault(client, {})
        owed = max(signed_tab[0].amount_for(address) - paid.get(address, 0), 0)
        balance = self.market.escrow.balanceOf(account)
        from_balance = min(owed, balance)
        from_reserve = min(owed - from_balance, reserves.get(address, 0))
        if from_balance + from_reserve == 0:
            with brownie.reverts(revert_pattern=r"NothingOwed(: .*)?"):
                self.market.claim(address, signed_tab, vector_of(paid), self.nodes[0])
            return
        tx = self.market.claim(address, signed_tab, vector_of(paid), self.nodes[0])
        assert (tx.events["Claimed"]["fromBalance"], tx.events["Claimed"]["fromReserve"]) == (from_balance, from_reserve)
        paid[address] = paid.get(address, 0) + from_balance + from_reserve
        reserves[address] = reserves.get(address, 0) - from_reserve

    # ---- reserves, aliases and a forgetful chain (rules of their own, apart from the disputes')

    def rule_fund_reserve(self, client="st_client", node="st_node", amount="st_amount"):
        account, address = self.clients[client], self.nodes[node].address
        balance = self.market.escrow.balanceOf(account)
        amount = min(amount * TOKEN, balance)
        if amount == 0:
            return
        self.market.fund_reserves(account, {address: amount})
        reserves = self.reserves.setdefault(client, {})
        reserves[address] = reserves.get(address, 0) + amount

    def rule_release_reserve(self, client="st_client", node="st_node"):
        """The client takes a reserve back; the node, seeing the request, claims first (within the timelock)."""
        account, address = self.clients[client], self.nodes[node].address
        if not self.reserves.get(client, {}).get(address):
            return
        self.market.escrow.requestReserveRelease(address, {"from": account})
        acknowledged = [pair for pair in self.tabs.get(client, []) if pair[0].amount_for(address)]
        if acknowledged:
            self._claim(client, address, max(acknowledged, key=lambda pair: pair[0].amount_for(address)))
        brownie.chain.sleep(WITHDRAWAL_TIMELOCK + 1)
        self.market.escrow.releaseReserve(address, {"from": account})
        self.reserves[client][address] = 0

    def rule_drain_to_alias(self, client="st_client", drop="st_bool", node="st_node", step="st_step"):
        """A node serves the client within its reserve; the client then signs a newer tab paying an alias its whole
        balance, first (or dropping every other node), settles it, and the alias withdraws at once; every node claims
        the tab it acknowledged and is paid all of it."""
        self.rule_serve([(client, [(node, step)], 0)], reserving=True)
        account, signed = self.clients[client], self.tabs.setdefault(client, [])
        paid = self.paid.setdefault(client, {})
        balance = self.market.escrow.balanceOf(account)
        amounts = {} if drop else ({e.node: e.amount for e in signed[-1][0].entries} if signed else {})
        amounts.update({n: max(amounts.get(n, 0), a) for n, a in paid.items() if a})  # the escrow's paid nodes stay named
        alias = self.alias.address
        amounts[alias] = paid.get(alias, 0) + balance
        if amounts[alias] == 0:
            return
        signed.append(self.market.tab(account, amounts, seq=max(len(signed), self.settled_seq.get(client, 0)) + 1))
        self.rule_settle(client, len(signed) - 1, False)
        if self.market.escrow.earningsOf(alias):
            self.market.escrow.withdrawEarnings(alias, {"from": alias})
        for node in self.nodes:
            acked = self.acked.get(client, {}).get(node.address, 0)
            if acked > paid.get(node.address, 0):
                tab = next(pair for pair in signed if pair[0].amount_for(node.address) == acked)
                self._claim(client, node.address, tab)
            assert paid.get(node.address, 0) >= acked  # property: every acknowledged tab is paid in full

    def rule_chain_forgets(self, remember="st_bool"):
        """Either remember this state, or go back to the one remembered (as a reorg or a dev chain restarted from an
        older state would): the contracts and the model both return to it."""
        # brownie's own snapshot calls: they keep its clock offset and transaction history in step with the chain, and
        # leave the snapshot that isolates each run alone
        if remember or self.snapshot is None:
            self.snapshot = (brownie.chain._take_snapshot(), self._model())
            return
        snapshot_id, model = self.snapshot
        brownie.chain._revert(snapshot_id)
        self.snapshot = None
        self.tabs, self.paid, self.settled_seq, self.reserves, self.acked = model

    def _model(self):
        return copy.deepcopy((self.tabs, self.paid, self.settled_seq, self.reserves, self.acked))

    def rule_request_withdrawal(self, client="st_client", amount="st_amount"):
        account = self.clients[client]
        if self.market.escrow.balanceOf(account) >= amount * TOKEN:
            self.market.escrow.requestWithdrawal(amount * TOKEN, {"from": account})

    def rule_withdraw(self, client="st_client", wait="st_bool"):
        account = self.clients[client]
        _, ready_at = self.market.escrow.pendingWithdrawalOf(account)
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

    # ---- disputes

    st_panel_node = st.integers(0, 3)
    st_escape = st.sampled_from(["stay", "pause", "deregister", "unbond", "move"])
    st_verdict = st.sampled_from(["guilty", "innocent", "silent"])
    st_creditor = st.integers(0, 5)

    @classmethod
    def init_disputes(cls, market, panel_nodes, treasury):
        """Four nodes serve layers [0, 4) with the minimum stake: the accused and the panel of every dispute."""
        cls.panel_nodes = list(panel_nodes)
        cls.slice, cls.other_slice = (market.model_id, 0, 4), (market.model_id, 4, 8)
        for node in cls.panel_nodes:
            market.register(node, 0, 4, stake=PANEL_STAKE)
        cls.holders = [*cls.holders, *cls.panel_nodes]
        cls.creditors = [cls.reporter, treasury, *cls.panel_nodes]
        market.token.approve(market.disputes, 2**255, {"from": cls.reporter})

    def rule_challenge_after_leaving(self, accused="st_panel_node", escape="st_escape", verdict="st_verdict"):
        """A panel node signs a commitment on [0, 4), then escapes as it can; the reporter challenges it and draws the
        panel; the seated verifiers vote `verdict` (silent ones are penalized) and the dispute is resolved."""
        market, disputes, node = self.market, self.market.disputes, self.panel_nodes[accused]
        request = next(REQUEST_IDS).to_bytes(32, "big")
        commitment, signature = market.commitment(node, request=request, output=b"\x0e" * 32)
        self._escape(node, escape)
        if market.stake.totalStakeOf(node) == 0:
            with brownie.reverts(revert_pattern=r"NoStake(: .*)?"):
                disputes.challenge(node, commitment, signature, "", {"from": self.reporter})
            return
        market.fund(self.reporter, BOND)
        dispute_id = disputes.challenge(node, commitment, signature, "", {"from": self.reporter}).return_value
        draw = disputes.drawPanel(dispute_id, {"from": self.reporter})
        if "PanelDrawn" not in draw.events:  # too few eligible verifiers left in [0, 4): void, the bond credited back
            assert disputes.getDispute(dispute_id)["status"] == DisputeStatus.VOID
            return
        verifiers = list(draw.events["PanelDrawn"]["verifiers"])
        assert node not in verifiers and all(
            market.registry.isSliceMember(v, market.registry.sliceKey(*self.slice)) for v in verifiers
        )
        stake_before = market.stake.totalStakeOf(node)
        if verdict == "silent":
            brownie.chain.sleep(DISPUTE_PARAMS["commitPeriod"] + DISPUTE_PARAMS["revealPeriod"] + 1)
        else:
            salt = b"\x05" * 32
            for verifier in verifiers:
                hidden = disputes.voteHash(dispute_id, verifier, verdict == "guilty", salt)
                disputes.commitVote(dispute_id, hidden, {"from": verifier})
            for verifier in verifiers:
                disputes.revealVote(dispute_id, verdict == "guilty", salt, {"from": verifier})
        outcome = disputes.resolve(dispute_id, {"from": self.reporter}).return_value
        expected = {"guilty": DisputeStatus.NODE_SLASHED, "innocent": DisputeStatus.CHALLENGER_LOST}
        assert outcome == expected.get(verdict, DisputeStatus.VOID)
        slashed = stake_before * DISPUTE_PARAMS["wrongOutputSlashBps"] // 10_000 if verdict == "guilty" else 0
        assert market.stake.totalStakeOf(node) == stake_before - slashed
        assert market.stake.stakeOf(node)["locks"] == 0

    def _escape(self, node, escape):
        registry, stake = self.market.registry, self.market.stake
        registered = any(registry.isSliceMember(node, registry.sliceKey(*key)) for key in (self.slice, self.other_slice))
        if escape == "pause" and registered and not registry.getNode(node)["paused"]:
            registry.pause({"from": node})
        elif escape == "deregister" and registered:
            registry.deregister({"from": node})
        elif escape == "move" and registered:
            target = self.other_slice if registry.isSliceMember(node, registry.sliceKey(*self.slice)) else self.slice
            registry.update(*target, 10, b"\x01" * 32, ["http://moved.example"], {"from": node})
        elif escape == "unbond":
            info = stake.stakeOf(node)
            if info["bonded"]:
                stake.unbond(info["bonded"], {"from": node})
            elif info["unbonding"] and info["locks"] == 0 and brownie.chain.time() >= info["unbondReadyAt"]:
                stake.withdraw({"from": node})  # gone: nothing left to challenge

    def rule_withdraw_credit(self, creditor="st_creditor"):
        account = self.creditors[creditor]
        credit = self.market.disputes.creditOf(account)
        if credit:
            before = self.market.token.balanceOf(account)
            self.market.disputes.withdrawCredit(account, {"from": account})
            assert self.market.token.balanceOf(account) == before + credit

    def invariant_no_dispute_leaves_stake_locked(self):
        assert all(self.market.stake.stakeOf(n)["locks"] == 0 for n in [*self.nodes, *self.panel_nodes])

    # ---- invariants

    def invariant_tokens_are_accounted_for_and_no_node_is_overpaid(self):
        escrow, stake, token = self.market.escrow, self.market.stake, self.market.token
        held = sum(token.balanceOf(a) for a in self.holders) + sum(token.balanceOf(c) for c in self.contracts)
        assert held == token.totalSupply()
        reserved = sum(escrow.reserveOf(c, n)[0] for c in self.clients for n in self.nodes)
        earned = sum(escrow.earningsOf(n) for n in [*self.nodes, self.alias])
        assert token.balanceOf(escrow) == sum(escrow.balanceOf(c) for c in self.clients) + earned + reserved
        assert token.balanceOf(stake) == sum(stake.totalStakeOf(n) for n in [*self.nodes, *self.panel_nodes])
        assert token.balanceOf(self.market.disputes) == sum(self.market.disputes.creditOf(a) for a in self.creditors)
        for client, signed in self.tabs.items():
            paid = self.paid.get(client, {})
            assert all(amount <= max(tab.amount_for(node) for tab, _ in signed) for node, amount in paid.items())
            assert escrow.tabOf(self.clients[client]) == (
                self.settled_seq.get(client, 0),
                eip712.paid_vector_hash(vector_of(paid)),
            )

    def invariant_every_node_can_collect_what_it_acknowledged(self):
        """What a node acknowledged beyond what it was paid always fits in its reserve, whatever the client did."""
        for client, acked in self.acked.items():
            paid, reserves = self.paid.get(client, {}), self.reserves.get(client, {})
            for node, amount in acked.items():
                assert amount - paid.get(node, 0) <= reserves.get(node, 0)
                assert self.market.escrow.reserveOf(self.clients[client], node)[0] == reserves.get(node, 0)


def test_market_state_machine(state_machine, market, clients, nodes, accounts, treasury):
    state_machine(MarketMachine, market, clients, nodes, accounts, treasury, settings=SETTINGS)
