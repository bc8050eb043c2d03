"""web3.py bindings of the deployed contracts: ABIs from brownie's build/contracts, addresses from the
deployments file; transactions signed locally, reverts decoded into their custom errors."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from enum import IntEnum
from functools import cache, lru_cache
from pathlib import Path
from typing import Protocol

import requests
from eth_abi import decode
from eth_abi.exceptions import DecodingError
from eth_account.signers.local import LocalAccount
from eth_typing import ChecksumAddress, HexStr
from eth_utils import keccak, to_checksum_address
from web3 import Web3
from web3.exceptions import BadFunctionCallOutput, ContractCustomError, ContractLogicError, TimeExhausted, Web3Exception
from web3.providers.base import BaseProvider
from web3.types import TxReceipt

from shardmarket.chain.deployments import read_deployments
from shardmarket.chain.eip712 import Domain
from shardmarket.chain.units import TokenUnits

BUILD_DIR = Path(__file__).resolve().parents[2] / "build" / "contracts"
DECIMALS_SELECTOR = HexStr("0x313ce567")  # decimals()
SYMBOL_SELECTOR = HexStr("0x95d89b41")  # symbol()
# One lock per sending account in this process: two threads sending from one account (a client's background reserve
# funding and its auditor's report) would otherwise both read the same pending nonce, and one transaction would fail.
_SENDERS: dict[str, threading.Lock] = {}
_SENDERS_GUARD = threading.Lock()


def _sending(sender: str) -> threading.Lock:
    with _SENDERS_GUARD:
        return _SENDERS.setdefault(sender, threading.Lock())


CONTRACTS = ("TestToken", "StakeManager", "ModelRegistry", "NodeRegistry", "PaymentEscrow", "DisputeManager")


class ChainSettings(Protocol):
    """Where the chain is: the `[chain]` section of the config has these."""

    # read-only, so that the frozen ChainConfig qualifies
    @property
    def rpc_url(self) -> str: ...
    @property
    def chain_id(self) -> int: ...
    @property
    def deployments_dir(self) -> Path: ...


class DisputeStatus(IntEnum):
    """DisputeManager.Status: where a dispute stands (getDispute's `status`, resolve's outcome)."""

    NONE = 0
    DRAWING = 1  # waiting for its panel (drawPanel)
    OPEN = 2  # voting
    NODE_SLASHED = 3
    CHALLENGER_LOST = 4
    VOID = 5


class Rejection(IntEnum):
    """PaymentEscrow.Rejection: why settleTabs skipped a tab (TabRejected's `reason`)."""

    NONE = 0
    BAD_SIGNATURE = 1
    STALE_SEQ = 2
    WRONG_PREVIOUS = 3
    MALFORMED = 4


class ChainError(RuntimeError):
    """A chain call that failed; the message says what happened and what to do."""


class ChainUnreachable(ChainError):
    """The RPC endpoint does not answer."""


@cache
def abi(name: str) -> list:
    """The ABI of contract `name` from brownie's build folder."""
    path = BUILD_DIR / f"{name}.json"
    try:
        return json.loads(path.read_text())["abi"]
    except FileNotFoundError:
        raise ChainError(f"no compiled {name} at {path}: run `brownie compile` in the repository first") from None


@lru_cache(maxsize=1)
def _error_selectors() -> dict[bytes, tuple[str, list[str]]]:
    selectors = {}
    for name in CONTRACTS:
        for entry in abi(name):
            if entry.get("type") == "error":
                types = [
                    i["type"] if i["type"] != "tuple" else "(" + ",".join(c["type"] for c in i["components"]) + ")"
                    for i in entry["inputs"]
                ]
                selectors[keccak(text=f"{entry['name']}({','.join(types)})")[:4]] = (entry["name"], types)
    return selectors


def decode_revert(data: str | bytes | None) -> str:
    """`Name(arg, ...)` of a custom-error revert, or a short description of other revert data."""
    raw = bytes.fromhex(data.removeprefix("0x")) if isinstance(data, str) else (data or b"")
    known = _error_selectors().get(raw[:4])
    if known is None:
        return f"revert data 0x{raw.hex()}" if raw else "reverted without a reason"
    name, types = known
    try:
        args = decode(types, raw[4:])
    except Exception:
        return name
    shown = [("0x" + a.hex()) if isinstance(a, bytes) else str(a) for a in args]
    return f"{name}({', '.join(shown)})"


HINTS = {
    "InsufficientStake": "stake at least the registry's minimum (--stake)",
    "UnknownModel": "publish the model first with `shardmarket model publish` or check --model",
    "InvalidLayerRange": "the layer range must lie inside the model's layers (start < end <= layer count)",
    "AlreadyRegistered": "use `shardmarket node update` to change a registration",
    "NotRegistered": "register first with `shardmarket node register`",
    "ERC20InsufficientBalance": "the account holds too few tokens; get some from the token's holder",
    "InsufficientBalance": "the escrow balance is smaller than asked; see `shardmarket client balance`",
    "WithdrawalLocked": "the withdrawal timelock has not passed yet; try again after it",
    "NoWithdrawalRequested": "request it first with `shardmarket client withdraw AMOUNT`",
    "NothingUnbonding": "unbond first with `shardmarket node unbond AMOUNT`",
    "UnbondingNotReady": "the unbonding delay has not passed yet",
    "NothingToWithdraw": "there are no redeemed earnings; run `shardmarket node redeem` first",
    "NoReserve": "there is no reserve for that node; see `shardmarket client balance`",
    "NoReleaseRequested": "ask for the reserve first with `shardmarket client release NODE`",
    "ReserveLocked": "the reserve's timelock has not passed yet; try again after it",
    "NothingOwed": "the client owes this node nothing more on that tab, or has no balance and no reserve for it",
    "ModelExists": "this model name is taken; publish under another name",
    "ChallengeWindowClosed": "a commitment can only be challenged within the DisputeManager's challengeWindow of its issuedAt",
    "SliceTooSmall": "too few nodes serve the commitment's slice for a full panel of verifiers",
    "DrawTooEarly": "the panel is drawn from the challenge block's hash: send drawPanel once the next block is mined",
}


def _explain(exc: Exception, what: str) -> ChainError:
    if isinstance(exc, ContractCustomError):
        reason = decode_revert(exc.data if isinstance(exc.data, str) else exc.args[0])
    elif isinstance(exc, ContractLogicError):
        reason = decode_revert(exc.data) if isinstance(exc.data, str) and exc.data else str(exc)
    else:
        reason = str(exc)
    name = reason.split("(")[0]
    hint = HINTS.get(name)
    return ChainError(f"{what} was refused by the contract: {reason}" + (f"; {hint}" if hint else ""))


def lean_web3(provider: BaseProvider) -> Web3:
    """Web3 over `provider` without web3's validation middleware, which asks the chain its id before every eth_call and
    doubles a client's calls (Market.connect checks the id once; transactions are signed with it)."""
    w3 = Web3(provider)
    w3.middleware_onion.remove("validation")
    return w3


@dataclass
class Market:
    """The deployed contracts on one chain, and optionally the local account that sends transactions."""

    w3: Web3
    addresses: dict[str, str]
    account: LocalAccount | None = None
    _units: TokenUnits | None = field(default=None, repr=False)

    @classmethod
    def connect(cls, chain: ChainSettings, account=None, timeout_s: float = 10.0) -> Market:
        """Connect to `chain.rpc_url` and load the deployments of its chain id."""
        w3 = lean_web3(Web3.HTTPProvider(chain.rpc_url, request_kwargs={"timeout": timeout_s}))
        try:
            chain_id = w3.eth.chain_id
        except (requests.ConnectionError, requests.Timeout, OSError) as exc:
            raise ChainUnreachable(
                f"cannot reach the chain at {chain.rpc_url} ({type(exc).__name__}); start it or set SHARDMARKET_CHAIN_RPC_URL"
            ) from None
        if chain_id != chain.chain_id:
            raise ChainError(
                f"{chain.rpc_url} is chain {chain_id}, the config says {chain.chain_id}; set SHARDMARKET_CHAIN_CHAIN_ID"
            )
        try:
            addresses = read_deployments(chain_id, chain.deployments_dir)
        except FileNotFoundError as exc:
            raise ChainError(str(exc)) from None
        return cls(w3, addresses, account)

    def contract(self, name: str):
        """Contract `name`; a call returning a struct, or several named values, gives a named tuple (`node.endpoints`)."""
        return self.w3.eth.contract(address=to_checksum_address(self.addresses[name]), abi=abi(name), decode_tuples=True)

    @property
    def token(self):
        return self.contract("TestToken")

    @property
    def stake(self):
        return self.contract("StakeManager")

    @property
    def models(self):
        return self.contract("ModelRegistry")

    @property
    def registry(self):
        return self.contract("NodeRegistry")

    @property
    def escrow(self):
        return self.contract("PaymentEscrow")

    @property
    def disputes(self):
        return self.contract("DisputeManager")

    @property
    def chain_id(self) -> int:
        return self.w3.eth.chain_id

    def units(self) -> TokenUnits:
        """The payment token's decimals and symbol, for showing amounts to people; read once per Market, by two bare
        eth_calls (through the contract's ABI every command would spend a tenth of a second on them)."""
        if self._units is None:
            token = to_checksum_address(self.addresses["TestToken"])
            try:
                decimals = decode(["uint8"], self.w3.eth.call({"to": token, "data": DECIMALS_SELECTOR}))[0]
                symbol = decode(["string"], self.w3.eth.call({"to": token, "data": SYMBOL_SELECTOR}))[0]
            except (requests.ConnectionError, requests.Timeout) as exc:
                raise ChainUnreachable(
                    f"reading the token's decimals failed: the chain does not answer ({type(exc).__name__})"
                ) from None
            except (DecodingError, Web3Exception, ValueError) as exc:  # as a call through the ABI would say it
                raise BadFunctionCallOutput(f"the token at {token} does not answer decimals() and symbol(): {exc}") from None
            self._units = TokenUnits(decimals, symbol)
        return self._units

    def escrow_domain(self) -> Domain:
        return Domain(self.chain_id, self.addresses["PaymentEscrow"])

    def dispute_domain(self) -> Domain:
        return Domain(self.chain_id, self.addresses["DisputeManager"])

    def _signer(self) -> LocalAccount:
        if self.account is None:
            raise ChainError("this command needs an account: create one with `shardmarket keys new`")
        return self.account

    @property
    def address(self) -> ChecksumAddress:
        return self._signer().address

    def read(self, call, what: str = "a chain read", block: int | str = "latest"):
        """Call a view function (as of `block`) with clear errors."""
        try:
            return call.call(block_identifier=block)
        except (ContractCustomError, ContractLogicError) as exc:
            raise _explain(exc, what) from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise ChainUnreachable(
                f"{what} failed: the chain does not answer ({type(exc).__name__}); retry when it is back"
            ) from None

    def transact(self, call, what: str, gas: int | None = None) -> TxReceipt:
        """Sign and send `call` from the account, wait for it to be mined; returns the receipt."""
        sender = self.address
        try:
            with _sending(sender):  # from reading the pending nonce until the transaction is in the pool
                nonce = self.w3.eth.get_transaction_count(sender, "pending")
                params = {"from": sender, "nonce": nonce, "chainId": self.chain_id}
                # A margin over the estimate: some calls (a dispute's verifier draw) cost more in the block they land in.
                params["gas"] = gas if gas is not None else call.estimate_gas({"from": sender}) * 3 // 2 + 50_000
                tx = call.build_transaction(params)
                cost = tx["gas"] * tx.get("maxFeePerGas", tx.get("gasPrice", 0))
                balance = self.w3.eth.get_balance(sender)
                if balance < cost:
                    raise ChainError(
                        f"{what}: not enough gas money: {sender} holds {balance / 1e18:.6f} ETH, the transaction may cost "
                        f"{cost / 1e18:.6f}; send ETH to that account"
                    )
                signed = self._signer().sign_transaction(tx)
                tx_hash = self.w3.eth.send_raw_transaction(signed.raw_transaction)
            receipt = self.w3.eth.wait_for_transaction_receipt(tx_hash, timeout=120)
        except (ContractCustomError, ContractLogicError) as exc:
            raise _explain(exc, what) from None
        except (requests.ConnectionError, requests.Timeout) as exc:
            raise ChainUnreachable(
                f"{what} failed: the chain does not answer ({type(exc).__name__}); retry when it is back"
            ) from None
        except TimeExhausted:
            raise ChainError(f"{what}: the transaction was not mined within 120 s; check the chain and retry") from None
        except (Web3Exception, ValueError) as exc:
            if "insufficient funds" in str(exc):
                raise ChainError(f"{what}: not enough gas money in {sender}; send ETH to that account") from None
            raise ChainError(f"{what} failed: {exc}") from None
        if receipt["status"] != 1:
            out_of_gas = receipt["gasUsed"] >= tx["gas"]
            why = f"ran out of gas ({tx['gas']}); retry with more" if out_of_gas else "reverted"
            raise ChainError(f"{what}: transaction {tx_hash.hex()} {why}")
        return receipt

    def model_id(self, name: str) -> bytes:
        return keccak(text=name)
