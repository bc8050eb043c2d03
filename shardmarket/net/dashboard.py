"""What the node's and the client's dashboards share: who may see them, the page around their content, tables, the
earnings chart, and the vendored chart library (uPlot 1.6.32 from npm, MIT, in ./static with its license)."""

from __future__ import annotations

import hmac
import ipaddress
import json
import time
from collections.abc import Iterable
from html import escape
from pathlib import Path

from aiohttp import web
from aiohttp.typedefs import Middleware

STATIC = Path(__file__).parent / "static"
KEY_COOKIE = "shardmarket_dashboard"
STYLE = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222;max-width:1200px}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em}
table{border-collapse:collapse;margin:.4em 0}td,th{border:1px solid #ccc;padding:.25em .6em;text-align:left}
td.n{text-align:right;font-variant-numeric:tabular-nums}
.cards{display:flex;flex-wrap:wrap;gap:.8em}.card{border:1px solid #ccc;border-radius:6px;padding:.5em .9em;min-width:11em}
.card b{display:block;font-size:1.25em}.ok{color:#176d2c}.bad{color:#a31515}nav a{margin-right:1em}
.span{display:inline-block;height:.9em;background:#4a7bd0}.gap{display:inline-block;height:.9em;background:#eee}
"""


def is_local(address: str | None) -> bool:
    """A loopback address: the machine's own user, who needs no key."""
    if not address:
        return False
    try:
        return ipaddress.ip_address(address.split("%")[0]).is_loopback
    except ValueError:
        return False


def guard(key: str, paths: tuple[str, ...]) -> Middleware:
    """Serve `paths` (prefixes) to local addresses, and when `key` is set to anyone presenting it too (as
    'Authorization: Bearer KEY', or ?key=KEY, which sets a cookie for the page's links, or that cookie)."""

    @web.middleware
    async def check(request: web.Request, handler):
        if not request.path.startswith(paths) or is_local(request.remote):
            return await handler(request)
        given = request.query.get("key") or request.cookies.get(KEY_COOKIE) or request.headers.get("Authorization") or ""
        if key and hmac.compare_digest(given.removeprefix("Bearer ").encode(), key.encode()):
            response = await handler(request)
            if request.query.get("key"):
                response.set_cookie(KEY_COOKIE, key, httponly=True, samesite="Strict")
            return response
        why = "local addresses and holders of the dashboard key" if key else "local addresses (set a dashboard key to open it)"
        raise web.HTTPForbidden(text=f"the dashboard and /metrics are served only to {why}; see the README's Dashboard\n")

    return check


def static_routes() -> list[web.AbstractRouteDef]:
    """The vendored chart library."""
    return [web.static("/static", STATIC, append_version=False)]


def page(title: str, nav: dict[str, str], body: str) -> web.Response:
    """A whole HTML page around `body` (already escaped)."""
    links = "".join(f'<a href="{escape(href)}">{escape(label)}</a>' for label, href in nav.items())
    html = (
        f'<!doctype html><html><head><meta charset="utf-8"><title>{escape(title)}</title>'
        f'<link rel="stylesheet" href="/static/uPlot.min.css"><script src="/static/uPlot.iife.min.js"></script>'
        f"<style>{STYLE}</style></head><body><nav>{links}</nav><h1>{escape(title)}</h1>{body}</body></html>"
    )
    return web.Response(text=html, content_type="text/html")


def cards(items: dict[str, tuple[str, str]]) -> str:
    """Figure cards: label -> (value, test id)."""
    return (
        '<div class="cards">'
        + "".join(
            f'<div class="card">{escape(label)}<b data-testid="{escape(tid)}">{escape(value)}</b></div>'
            for label, (value, tid) in items.items()
        )
        + "</div>"
    )


def table(headers: Iterable[str], rows: Iterable[Iterable[object]], testid: str, numeric: Iterable[int] = ()) -> str:
    """An HTML table; cells at the `numeric` column indexes are right-aligned."""
    right = set(numeric)
    head = "".join(f"<th>{escape(h)}</th>" for h in headers)
    body = "".join(
        "<tr>" + "".join(f"<td{' class=n' if k in right else ''}>{escape(str(v))}</td>" for k, v in enumerate(row)) + "</tr>"
        for row in rows
    )
    return f'<table data-testid="{escape(testid)}"><tr>{head}</tr>{body or "<tr><td>none yet</td></tr>"}</table>'


def chart(element: str, per_hour: dict[int, float], label: str, unit: str, hours: int = 24) -> str:
    """A uPlot step chart of `per_hour` (unix hour -> value in tokens) over the last `hours` hours, missing hours as 0."""
    now = int(time.time() // 3600 * 3600)
    xs = [now - 3600 * k for k in range(hours - 1, -1, -1)]
    data = json.dumps([xs, [per_hour.get(x, 0.0) for x in xs]])
    return (
        f'<div id="{escape(element)}"></div><script>(function(){{const data={data};'
        f'const series=[{{}},{{label:{json.dumps(label)},stroke:"#4a7bd0",fill:"rgba(74,123,208,.15)",width:2,'
        f"paths:uPlot.paths.stepped({{align:1}})}}];"
        f"new uPlot({{width:900,height:260,series:series,axes:[{{}},{{label:{json.dumps(unit + ' per hour')},size:90,"
        f"values:(u,v)=>v.map(x=>+x.toPrecision(3))}}],scales:{{x:{{time:true}}}}}},data,"
        f'document.getElementById("{escape(element)}"));}})();</script>'
    )
