"""The node's dashboard in a real browser (Debian's chromium driven by Playwright) over a running market: after a paid
request and a settlement, the numbers on the page are the chain's and the node's; /metrics says the same."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import urllib.request
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from shardmarket.chain.contracts import Market
from shardmarket.chain.keys import load_account
from shardmarket.cli.devmarket import PASSWORD
from shardmarket.cli.keys import home_keys
from shardmarket.config import load_config

from .conftest import client_model, generate

CHROMIUM = Path("/usr/bin/chromium")
PROMPT = [1, 2, 3, 4]


def get(url: str) -> bytes:
    with urllib.request.urlopen(url, timeout=30) as response:
        return response.read()


def browser_or_skip():
    if not CHROMIUM.exists():
        pytest.skip(f"no chromium at {CHROMIUM}: `make setup` installs Debian's chromium as root")
    if os.geteuid() != 0:
        pytest.skip("chromium's sandbox needs root here (or user namespaces); run as root, as CI does")
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("playwright is not installed (pip install -e '.[dev]')")
    return sync_playwright


def test_the_dashboard_shows_the_chain_and_the_node_as_they_are(market, tmp_path, capsys):
    sync_playwright = browser_or_skip()
    model = asyncio.run(client_model(market, "dora"))
    _, completion = asyncio.run(generate(model, PROMPT, 4))
    node = market.nodes["node1"]
    operator, client = market.accounts["node1"], market.accounts["dora"]
    market.cli("node1", "node", "redeem")  # settles every tab owing node1: its earnings leave the escrow for its wallet
    with market.acting_as("node1"):
        chain = Market.connect(load_config().chain, load_account(PASSWORD, home_keys()))
    units = chain.units()
    price = chain.read(chain.registry.functions.getNode(operator)).pricePerToken
    promised = model.payer.promised(operator)  # what the client's tabs promise node1
    settled = chain.escrow.events.EarningsWithdrawn.get_logs(from_block=0, argument_filters={"node": operator})
    withdrawn = sum(e["args"]["amount"] for e in settled)
    assert promised > 0 and withdrawn == promised  # the chain paid node1 all it was promised

    summary = json.loads(get(f"{node.url}/dashboard/summary.json"))
    mine = [c for c in summary["earnings"]["clients"] if c["client"].lower() == client.lower()]
    assert mine == [{"client": mine[0]["client"], "tab": mine[0]["tab"], "promised": promised, "settled": promised, "pending": 0}]
    assert summary["price"] == price and summary["layers"] == [2, 4]
    assert summary["units"] == {"symbol": units.symbol, "decimals": units.decimals}

    capsys.readouterr()
    market.cli("node1", "node", "status")  # the same summary in the terminal
    out = capsys.readouterr().out
    assert f"earned (promised by tabs) {units.format(promised)}, settled {units.format(promised)}, pending 0 SMT" in out
    assert f"client {mine[0]['client']}: earned {units.format(promised)}" in out
    assert f"reachability: direct at {node.url}, not verified from outside, last outside check never" in out
    assert "running: layers 2:4 of 5" in out and "disputes: 0 against this node, 0 on its verifier panel" in out

    families = {f.name: f for f in text_string_to_metric_families(get(f"{node.url}/metrics").decode())}
    earned = {s.labels["client"]: s.value for s in families["shardmarket:earned_base_units"].samples if s.name.endswith("_total")}
    assert earned[client.lower()] == promised
    assert (
        sum(s.value for s in families["shardmarket:settlement_gas"].samples if s.name.endswith("_total")) == 0
    )  # node redeem sent it

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=str(CHROMIUM), args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1200, "height": 1300})
            page.goto(f"{node.url}/dashboard")
            shown = {tid: page.get_by_test_id(tid).inner_text() for tid in ("layers", "price", "earned", "settled", "pending")}
            assert shown == {
                "layers": "2:4 of 5",
                "price": units.format(price),
                "earned": units.format(summary["earnings"]["promised"]),
                "settled": units.format(summary["earnings"]["settled"]),
                "pending": units.format(summary["earnings"]["pending"]),
            }
            row = page.get_by_test_id("clients").locator("tr", has_text=mine[0]["client"]).inner_text()
            assert units.format(promised) in row
            assert page.locator("#earnings-chart canvas").count() == 1  # uPlot drew the chart
            hourly = page.get_by_test_id("earnings-hourly").inner_text()
            assert (
                client.lower() in hourly
                and str(summary["load"]["steps_served"]) == page.get_by_test_id("steps-served").inner_text()
            )
            shot = tmp_path / "dashboard.png"
            page.screenshot(path=str(shot), full_page=True)
            page.goto(f"{node.url}/dashboard/market")
            assert page.get_by_test_id("coverage").inner_text().startswith("5 of 5 layers served by a reachable node")
            page.screenshot(path=str(tmp_path / "market.png"), full_page=True)
        finally:
            browser.close()
    keep = os.environ.get("SHARDMARKET_DASHBOARD_SCREENSHOT")
    if keep:
        shutil.copy(shot, keep)
    print(f"dashboard screenshots: {shot} and {tmp_path / 'market.png'}")

    csv_rows = get(f"{node.url}/dashboard/earnings.csv").decode().splitlines()
    assert csv_rows[0] == "hour,host,model,client,value_raw,value,steps,tokens"
    rows = json.loads(get(f"{node.url}/dashboard/earnings.json"))
    assert sum(r["value_raw"] for r in rows if r["client"] == client.lower()) == promised
    assert promised == price * completion.prompt_tokens + price * (len(completion.tokens) - 1)  # every position it ran
