"""Amounts as people read and type them: tokens by the token's decimals, raw base units only with an explicit form."""

import pytest

from shardmarket.chain.units import AmountError, TokenUnits

SMT = TokenUnits(18, "SMT")


@pytest.mark.parametrize(
    ("raw", "shown"),
    [
        (1106000000000, "0.000001106 SMT"),
        (0, "0 SMT"),
        (100 * 10**18, "100 SMT"),
        (1, "0.000000000000000001 SMT"),
        (-5 * 10**17, "-0.5 SMT"),
    ],
)
def test_raw_units_are_shown_as_exact_tokens(raw, shown):
    assert SMT.format(raw) == shown


def test_a_gain_is_signed_and_six_decimals_count():
    assert SMT.tokens(25 * 10**16, signed=True) == "+0.25"
    assert TokenUnits(6, "USDC").format(1_500_000) == "1.5 USDC"


@pytest.mark.parametrize(
    ("text", "raw"),
    [
        ("100", 100 * 10**18),
        ("0.5", 5 * 10**17),
        ("100 SMT", 100 * 10**18),
        ("0.000000002smt", 2 * 10**9),
        ("100e18", 100 * 10**18),
        ("2000000000raw", 2 * 10**9),
        ("7 raw", 7),
        ("1_000", 1000 * 10**18),
    ],
)
def test_a_plain_number_is_tokens_and_raw_units_need_their_suffix_or_an_exponent(text, raw):
    assert SMT.parse(text) == raw


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("1000000000000000000", "ambiguous"),
        ("0.0000000000000000001", "more decimal places"),
        ("5 USDC", "this market's token is SMT"),
        ("1.5raw", "not a whole number of raw base units"),
        ("1e18 SMT", "an exponent means raw base units"),
        ("ten", "is not an amount"),
        ("-3", "is not an amount"),
    ],
)
def test_ambiguous_or_impossible_amounts_are_refused_with_what_to_write(text, says):
    with pytest.raises(AmountError, match=says):
        SMT.parse(text)
