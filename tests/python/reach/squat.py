"""Another host of the lab's LAN takes an external port on the router: `python -m tests.python.reach.squat
pcp|upnp GATEWAY HOST_IP EXTERNAL_PORT` maps EXTERNAL_PORT to HOST_IP:7399 (asking again until the router answers) and
prints the external port it got."""

from __future__ import annotations

import asyncio
import os
import sys

import aiohttp

from shardmarket.net import pcp
from shardmarket.net.udp import exchange
from shardmarket.net.upnp import control_url

INTERNAL_PORT = 7399


async def by_pcp(gateway: str, host: str, port: int) -> int:
    nonce = os.urandom(12)
    request = pcp.map_request(host, nonce, INTERNAL_PORT, port, 600)
    while True:
        try:
            data, _, _ = await exchange((gateway, pcp.PORT), request, lambda d, a: len(d) > 1, timeout=0.3, local=(host, 0))
            return pcp.parse_map_response(data, nonce)[2]
        except (TimeoutError, OSError):
            await asyncio.sleep(0.02)


async def by_upnp(gateway: str, host: str, port: int) -> int:
    connector = aiohttp.TCPConnector(local_addr=(host, 0))
    async with aiohttp.ClientSession(connector=connector) as session:
        location = f"http://{gateway}:5000/rootDesc.xml"
        async with session.get(location) as resp:
            description = await resp.text()
        control, service = control_url(location, description)
        body = _add_port_mapping(service, host, port)
        headers = {"Content-Type": 'text/xml; charset="utf-8"', "SOAPAction": f'"{service}#AddPortMapping"'}
        async with session.post(control, data=body, headers=headers) as resp:
            if resp.status != 200:
                raise SystemExit(f"AddPortMapping refused: {await resp.text()}")
    return port


def _add_port_mapping(service: str, host: str, port: int) -> str:
    return (
        '<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
        's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
        f'<u:AddPortMapping xmlns:u="{service}"><NewRemoteHost></NewRemoteHost><NewExternalPort>{port}</NewExternalPort>'
        f"<NewProtocol>TCP</NewProtocol><NewInternalPort>{INTERNAL_PORT}</NewInternalPort>"
        f"<NewInternalClient>{host}</NewInternalClient><NewEnabled>1</NewEnabled>"
        "<NewPortMappingDescription>squat</NewPortMappingDescription><NewLeaseDuration>600</NewLeaseDuration>"
        "</u:AddPortMapping></s:Body></s:Envelope>"
    )


if __name__ == "__main__":
    method, gateway, host, port = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
    print(asyncio.run((by_pcp if method == "pcp" else by_upnp)(gateway, host, port)), flush=True)
