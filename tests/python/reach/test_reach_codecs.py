"""STUN, PCP and NAT-PMP messages: what we send is what the RFCs lay out; bad replies get clear errors."""

from __future__ import annotations

import ipaddress
import struct

import pytest

from shardmarket.net import pcp, stun
from shardmarket.net.portmap import MappingError


def stun_success(txid: bytes, ip: str, port: int, xor: bool = True) -> bytes:
    raw = int(ipaddress.IPv4Address(ip))
    if xor:
        attr = struct.pack("!HHBBHI", stun.XOR_MAPPED_ADDRESS, 8, 0, 1, port ^ 0x2112, raw ^ stun.MAGIC_COOKIE)
    else:
        attr = struct.pack("!HHBBHI", stun.MAPPED_ADDRESS, 8, 0, 1, port, raw)
    software = struct.pack("!HH", 0x8022, 5) + b"lab\x00\x00" + b"\x00" * 3  # padded to 4 bytes
    body = software + attr
    return struct.pack("!HHI", stun.BINDING_SUCCESS, len(body), stun.MAGIC_COOKIE) + txid + body


def test_stun_request_layout_and_change_request():
    txid = bytes(range(12))
    assert stun.binding_request(txid) == struct.pack("!HHI", 1, 0, 0x2112A442) + txid
    changed = stun.binding_request(txid, change_ip=True, change_port=True)
    assert changed[2:4] == b"\x00\x08" and changed[-8:] == struct.pack("!HHI", 3, 4, 6)


@pytest.mark.parametrize("xor", [True, False])
def test_stun_response_gives_mapped_address_after_other_attributes(xor):
    txid = b"x" * 12
    assert stun.parse_binding_response(stun_success(txid, "203.0.113.7", 40123, xor), txid) == ("203.0.113.7", 40123)


@pytest.mark.parametrize(
    ("mangle", "message"),
    [
        (lambda r: r[:12], "shorter than a header"),
        (lambda r: r[:8] + b"y" * 12 + r[20:], "does not belong"),
        (lambda r: b"\x01\x11" + r[2:], "not a binding success"),
        (lambda r: r[:-4], "truncated"),
    ],
)
def test_stun_bad_responses_are_refused(mangle, message):
    txid = b"x" * 12
    with pytest.raises(stun.StunError, match=message):
        stun.parse_binding_response(mangle(stun_success(txid, "203.0.113.7", 1)), txid)


def test_stun_server_addresses():
    assert stun.parse_server("10.99.0.1") == ("10.99.0.1", 3478)
    assert stun.parse_server("stun.example.org:19302") == ("stun.example.org", 19302)
    for bad in ["", "host:", "host:99999", "host:abc"]:
        with pytest.raises(ValueError, match="host\\[:port\\]"):
            stun.parse_server(bad)


def test_nat_type_names():
    assert stun.NatBehavior("1.2.3.4", "endpoint-dependent", "address-and-port-dependent").nat_type == "symmetric NAT"
    assert stun.NatBehavior("1.2.3.4", "endpoint-independent", "endpoint-independent").nat_type == "full-cone NAT"
    assert stun.NatBehavior("1.2.3.4", "none", "endpoint-independent").nat_type == "open internet"


def pcp_response(nonce: bytes, result: int = 0, version: int = 2, opcode: int = 0x81) -> bytes:
    header = struct.pack("!BBxBII12x", version, opcode, result, 7200, 99)
    external = ipaddress.IPv6Address("::ffff:198.51.100.9").packed
    return header + struct.pack("!12sB3xHH16s", nonce, 6, 7300, 40000, external)


def test_pcp_map_request_layout():
    nonce = bytes(range(12))
    request = pcp.map_request("192.168.1.20", nonce, 7300, 7300, 3600)
    assert len(request) == 60
    assert request[:8] == struct.pack("!BBHI", 2, 1, 0, 3600)
    assert request[8:24] == ipaddress.IPv6Address("::ffff:192.168.1.20").packed
    assert request[24:36] == nonce and request[36] == 6 and struct.unpack("!HH", request[40:44]) == (7300, 7300)


def test_pcp_response_and_errors():
    nonce = b"n" * 12
    assert pcp.parse_map_response(pcp_response(nonce), nonce) == (7200, 99, 40000, "198.51.100.9")
    with pytest.raises(MappingError, match="NOT_AUTHORIZED"):
        pcp.parse_map_response(pcp_response(nonce, result=2), nonce)
    with pytest.raises(MappingError, match="another mapping"):
        pcp.parse_map_response(pcp_response(b"m" * 12), nonce)
    with pytest.raises(MappingError, match="too short"):
        pcp.parse_map_response(pcp_response(nonce)[:30], nonce)
    with pytest.raises(pcp.UnsupportedVersion):
        pcp.parse_map_response(struct.pack("!BBHI", 0, 129, 1, 0), nonce)
