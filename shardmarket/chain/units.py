"""Token amounts for people and for programs: the one place that formats raw base units as tokens and parses what a
person types.

The rule for input (`--stake`, `--price`, `client deposit` ...):

- a plain decimal number is tokens: `100`, `0.5`, `0.000000002`, optionally followed by the token's symbol (`100 SMT`);
- raw base units need an explicit form: the suffix `raw` (`2000000000raw`) or scientific notation (`100e18`);
- a plain integer of 13 digits or more is refused as ambiguous (it reads like raw units typed without `raw`);
  write `...raw` or `... SMT` to say which.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation

AMBIGUOUS_DIGITS = 13  # a plain integer this long reads like raw units (1e12 tokens is more than any sane amount)
_AMOUNT = re.compile(r"^\s*(?P<number>[0-9][0-9_]*(?:\.[0-9_]*)?(?:[eE][+-]?[0-9]+)?)\s*(?P<unit>[A-Za-z]*)\s*$")
AMOUNT_HELP = "a plain number is tokens (100, 0.5, '100 SMT'); raw base units need 'raw' or an exponent (2000000000raw, 100e18)"


class AmountError(ValueError):
    """Text that is not an amount, or one the token's decimals cannot hold; the message says how to write it."""


@dataclass(frozen=True)
class TokenUnits:
    """A token's `decimals()` and `symbol()`, as read from the chain."""

    decimals: int = 18
    symbol: str = "SMT"

    def format(self, raw: int, signed: bool = False) -> str:
        """`raw` base units as tokens with the symbol, exact and without trailing zeros: 1106000000000 -> '0.000001106 SMT'."""
        return f"{self.tokens(raw, signed)} {self.symbol}"

    def tokens(self, raw: int, signed: bool = False) -> str:
        """`raw` base units as a token count without the symbol ('0.000001106'); `signed` writes '+' before gains."""
        sign = "-" if raw < 0 else ("+" if signed and raw > 0 else "")
        whole, fraction = divmod(abs(raw), 10**self.decimals)
        text = f"{whole}.{fraction:0{self.decimals}d}".rstrip("0").rstrip(".") if fraction else str(whole)
        return sign + text

    def parse(self, text: str) -> int:
        """Raw base units of what a person typed, by the rule in this module's docstring; AmountError otherwise."""
        return parse_amount(text).raw(self)


@dataclass(frozen=True)
class Amount:
    """An amount as typed, before the token's decimals are known: tokens (a Decimal) or raw base units."""

    text: str
    tokens: Decimal | None = None
    base_units: int | None = None
    symbol: str = ""

    def raw(self, units: TokenUnits) -> int:
        """Raw base units of this amount in a token of `units`."""
        if self.base_units is not None:
            return self.base_units
        assert self.tokens is not None
        if self.symbol and self.symbol.upper() != units.symbol.upper():
            raise AmountError(f"{self.text!r} names {self.symbol}, but this market's token is {units.symbol}")
        raw = self.tokens.scaleb(units.decimals)
        if raw != raw.to_integral_value():
            raise AmountError(
                f"{self.text!r} has more decimal places than {units.symbol}'s {units.decimals}; round it, or give raw units "
                "with the 'raw' suffix"
            )
        return int(raw)


def parse_amount(text: str) -> Amount:
    """Parse an amount by the rule in this module's docstring; AmountError says what is wrong and how to write it."""
    match = _AMOUNT.match(text)
    if match is None:
        raise AmountError(f"{text!r} is not an amount: {AMOUNT_HELP}")
    number, unit = match["number"].replace("_", ""), match["unit"]
    try:
        value = Decimal(number)
    except InvalidOperation:
        raise AmountError(f"{text!r} is not an amount: {AMOUNT_HELP}") from None
    if unit.lower() == "raw" or "e" in number.lower():
        if unit and unit.lower() != "raw":
            raise AmountError(f"{text!r}: an exponent means raw base units, which take no symbol; write {number} alone")
        if value != value.to_integral_value():
            raise AmountError(f"{text!r} is not a whole number of raw base units")
        return Amount(text, base_units=int(value))
    if not unit and "." not in number and len(number.lstrip("0")) >= AMBIGUOUS_DIGITS:
        raise AmountError(
            f"{text!r} is ambiguous: a plain number means tokens, and this one reads like raw base units; write "
            f"'{number}raw' for raw units or '{number} SMT' (the token's symbol) for tokens"
        )
    return Amount(text, tokens=value, symbol=unit)
