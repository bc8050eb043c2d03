"""Endpoint proofs: a node answers `/health?challenge=C` with its operator's signature over C, so whoever checks an
endpoint from outside learns that it reached this node, not just some HTTP server. EIP-191 personal messages under
their own prefix: a signature made here can never pass as an EIP-712 tab or commitment."""

from __future__ import annotations

import re

from eth_account import Account
from eth_account.messages import encode_defunct

PREFIX = "shardmarket endpoint challenge: "
CHALLENGE = re.compile(r"[0-9a-f]{32,128}")  # what a node signs: only fresh random hex, nothing chosen to mean more


def valid_challenge(challenge: str) -> bool:
    return CHALLENGE.fullmatch(challenge) is not None


def sign_challenge(operator_key: bytes, challenge: str) -> str:
    """The operator's signature (0x hex) over `challenge`; raises ValueError on a challenge that is not 32-128 hex digits."""
    if not valid_challenge(challenge):
        raise ValueError("a challenge is 32 to 128 lowercase hex digits")
    return "0x" + bytes(Account.sign_message(encode_defunct(text=PREFIX + challenge), operator_key).signature).hex()


def proves(health: dict, challenge: str, operator: str) -> bool:
    """Whether a `/health?challenge=` answer carries `operator`'s signature over `challenge`."""
    signature = health.get("signature")
    if not isinstance(signature, str) or health.get("challenge") != challenge:
        return False
    try:
        signer = Account.recover_message(encode_defunct(text=PREFIX + challenge), signature=signature)
    except (ValueError, TypeError):
        return False
    return signer.lower() == operator.lower()
