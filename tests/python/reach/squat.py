"""Another host of the lab's LAN takes an external port on the router: `python -m tests.python.reach.squat
pcp|upnp GATEWAY HOST_IP EXTERNAL_PORT OWNER_IP` prints "ready", waits for a line on stdin, then maps EXTERNAL_PORT to
HOST_IP:7399 (by UPnP: first deleting OWNER_IP's mapping of it, as its owner may; by PCP: asking again until the
router answers) and prints the external port it got."""

from __future__ import annotations

import asyncio
import os
import sys

import aiohttp

from shardmarket.net import pcp
from shardmarket.net.udp import exchange
from shardmarket.net.upnp import control_url

INTERNAL_PORT = 7399


async def by_pcp(gateway: str, host: str, port: int, owner: str) -> int:
    nonce = os.urandom(12)
    request = pcp.map_request(host, nonce, INTERNAL_PORT, port, 600)
    sys.stdin.readline()
    while True:
        try:
            data, _, _ = await exchange((gateway, pcp.PORT), request, lambda d, a: len(d) > 1, timeout=0.3, local=(host, 0))
            return pcp.parse_map_response(data, nonce)[2]
        except (TimeoutError, OSError):
            await asyncio.sleep(0.02)


async def soap(source: str, control: str, service: str, action: str, args: str) -> None:
    body = (
        '<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
        's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
        f'<u:{action} xmlns:u="{service}">{args}</u:{action}></s:Body></s:Envelope>'
    )
    headers = {"Content-Type": 'text/xml; charset="utf-8"', "SOAPAction": f'"{service}#{action}"'}
    async with (
        aiohttp.ClientSession(connector=aiohttp.TCPConnector(local_addr=(source, 0))) as session,
        session.post(control, data=body, headers=headers) as resp,
    ):
        if resp.status != 200:
            raise SystemExit(f"{action} refused: {await resp.text()}")


async def by_upnp(gateway: str, host: str, port: int, owner: str) -> int:
    location = f"http://{gateway}:5000/rootDesc.xml"
    async with aiohttp.ClientSession() as session, session.get(location) as resp:
        control, service = control_url(location, await resp.text())
    sys.stdin.readline()
    mapping = f"<NewRemoteHost></NewRemoteHost><NewExternalPort>{port}</NewExternalPort><NewProtocol>TCP</NewProtocol>"
    await soap(owner, control, service, "DeletePortMapping", mapping)
    await soap(
        host,
        control,
        service,
        "AddPortMapping",
        mapping
        + (
            f"<NewInternalPort>{INTERNAL_PORT}</NewInternalPort><NewInternalClient>{host}</NewInternalClient><NewEnabled>1</NewEnabled>"
            "<NewPortMappingDescription>squat</NewPortMappingDescription><NewLeaseDuration>600</NewLeaseDuration>"
        ),
    )
    return port


if __name__ == "__main__":
    method, gateway, host, port, owner = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
    print("ready", flush=True)
    print(asyncio.run((by_pcp if method == "pcp" else by_upnp)(gateway, host, port, owner)), flush=True)
