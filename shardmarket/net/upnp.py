"""UPnP IGD: find the router by SSDP, then AddPortMapping / DeletePortMapping over SOAP (aiohttp)."""

from __future__ import annotations

import asyncio
import random
import re
import xml.etree.ElementTree as ET
from urllib.parse import urljoin
from xml.sax.saxutils import escape

import aiohttp

from shardmarket.net.portmap import Mapping, MappingError
from shardmarket.net.udp import local_address_towards

SSDP = ("239.255.255.250", 1900)
SEARCH_TARGETS = [
    "urn:schemas-upnp-org:device:InternetGatewayDevice:1",
    "urn:schemas-upnp-org:device:InternetGatewayDevice:2",
]
CONNECTION_SERVICES = ("WANIPConnection", "WANPPPConnection")
CONFLICT = "718"  # ConflictInMappingEntry: the external port is taken


class _SsdpSearch(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.location: asyncio.Future[str] = asyncio.get_running_loop().create_future()

    def datagram_received(self, data: bytes, addr: tuple) -> None:
        match = re.search(rb"(?im)^location:\s*(\S+)\s*$", data)
        if match and not self.location.done():
            self.location.set_result(match.group(1).decode("ascii", "replace"))


async def discover(timeout: float = 1.5) -> str:
    """The description URL of the first Internet Gateway Device that answers an SSDP M-SEARCH."""
    loop = asyncio.get_running_loop()
    transport, proto = await loop.create_datagram_endpoint(_SsdpSearch, local_addr=("0.0.0.0", 0))
    try:
        for _attempt in range(3):
            for target in SEARCH_TARGETS:
                message = (
                    f'M-SEARCH * HTTP/1.1\r\nHOST: {SSDP[0]}:{SSDP[1]}\r\nMAN: "ssdp:discover"\r\nMX: 1\r\nST: {target}\r\n\r\n'
                )
                transport.sendto(message.encode(), SSDP)
            try:
                return await asyncio.wait_for(asyncio.shield(proto.location), timeout / 3)
            except TimeoutError:
                continue
        raise MappingError(f"no UPnP Internet Gateway Device answered SSDP within {timeout:.1f} s")
    finally:
        transport.close()


def control_url(location: str, description: str) -> tuple[str, str]:
    """(control URL, service type) of the WAN IP/PPP connection service in a device description."""
    try:
        root = ET.fromstring(description)
    except ET.ParseError as exc:
        raise MappingError(f"the gateway's description at {location} is not XML: {exc}") from None
    base = next((e.text for e in root.iter() if e.tag.endswith("URLBase") and e.text), location)
    for service in root.iter():
        if not service.tag.endswith("service"):
            continue
        fields = {child.tag.rsplit("}", 1)[-1]: (child.text or "").strip() for child in service}
        if any(name in fields.get("serviceType", "") for name in CONNECTION_SERVICES) and fields.get("controlURL"):
            return urljoin(base, fields["controlURL"]), fields["serviceType"]
    raise MappingError(f"the gateway at {location} offers no WANIPConnection service")


class UpnpMapper:
    """UPnP IGD client: discovers the gateway once, re-discovers when its control URL stops answering."""

    method = "upnp"

    def __init__(self, timeout: float = 1.5, location: str | None = None) -> None:
        self.timeout, self.location = timeout, location
        self.control: tuple[str, str] | None = None

    async def _control(self, session: aiohttp.ClientSession, fresh: bool = False) -> tuple[str, str]:
        if self.control and not fresh:
            return self.control
        if fresh or not self.location:
            self.location = await discover(self.timeout)
        async with session.get(self.location) as resp:
            self.control = control_url(self.location, await resp.text())
        return self.control

    async def prepare(self) -> tuple[str, str]:
        """Discover the gateway and read its control URL and service type (so a later `map` is a single SOAP call)."""
        timeout = aiohttp.ClientTimeout(total=self.timeout * 2)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            return await self._control(session)

    async def _soap(self, action: str, args: dict[str, str | int]) -> dict[str, str]:
        timeout = aiohttp.ClientTimeout(total=self.timeout * 2)
        async with aiohttp.ClientSession(timeout=timeout) as session:
            for fresh in (False, True):
                try:
                    url, service = await self._control(session, fresh)
                    return await self._call(session, url, service, action, args)
                except (aiohttp.ClientConnectionError, TimeoutError) as exc:
                    if fresh:
                        raise MappingError(f"UPnP {action} failed: {exc or type(exc).__name__}") from None
        raise AssertionError("unreachable")

    @staticmethod
    async def _call(session, url: str, service: str, action: str, args: dict[str, str | int]) -> dict[str, str]:
        body = "".join(f"<{k}>{escape(str(v))}</{k}>" for k, v in args.items())
        envelope = (
            '<?xml version="1.0"?><s:Envelope xmlns:s="http://schemas.xmlsoap.org/soap/envelope/" '
            's:encodingStyle="http://schemas.xmlsoap.org/soap/encoding/"><s:Body>'
            f'<u:{action} xmlns:u="{service}">{body}</u:{action}></s:Body></s:Envelope>'
        )
        headers = {"Content-Type": 'text/xml; charset="utf-8"', "SOAPAction": f'"{service}#{action}"'}
        async with session.post(url, data=envelope, headers=headers) as resp:
            text = await resp.text()
        try:
            root = ET.fromstring(text)
        except ET.ParseError:
            raise MappingError(f"UPnP {action}: the gateway answered HTTP {resp.status} with no XML") from None
        values = {e.tag.rsplit("}", 1)[-1]: (e.text or "").strip() for e in root.iter()}
        if resp.status != 200:
            code = values.get("errorCode", "?")
            raise MappingError(f"UPnP {action} refused: error {code} {values.get('errorDescription', '')}".strip())
        return values

    async def external_address(self) -> str:
        return (await self._soap("GetExternalIPAddress", {}))["NewExternalIPAddress"]

    async def _add(self, internal_ip: str, internal_port: int, external_port: int, lifetime: int) -> None:
        await self._soap(
            "AddPortMapping",
            {
                "NewRemoteHost": "",
                "NewExternalPort": external_port,
                "NewProtocol": "TCP",
                "NewInternalPort": internal_port,
                "NewInternalClient": internal_ip,
                "NewEnabled": 1,
                "NewPortMappingDescription": "shardmarket node",
                "NewLeaseDuration": lifetime,
            },
        )

    async def map(self, internal_port: int, external_port: int, lifetime: int) -> Mapping:
        control_url, _ = self.control or await self.prepare()
        internal_ip = local_address_towards(control_url.split("/")[2].split(":")[0])
        port = external_port or internal_port
        for _ in range(4):
            try:
                await self._add(internal_ip, internal_port, port, lifetime)
                break
            except MappingError as exc:
                if CONFLICT not in str(exc):
                    raise
                port = random.randint(20000, 60000)  # taken by another host: try another external port
        else:
            raise MappingError("UPnP: every external port tried is taken by another host")
        return Mapping("upnp", internal_ip, internal_port, await self.external_address(), port, lifetime)

    async def renew(self, mapping: Mapping, lifetime: int) -> Mapping:
        return await self.map(mapping.internal_port, mapping.external_port, lifetime)

    async def unmap(self, mapping: Mapping) -> None:
        await self._soap(
            "DeletePortMapping",
            {
                "NewRemoteHost": "",
                "NewExternalPort": mapping.external_port,
                "NewProtocol": "TCP",
            },
        )
