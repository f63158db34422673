"""The outbound-address guard every connection the node makes goes through: which addresses it refuses, and why."""

import asyncio
import ipaddress
import socket

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from scaigrid import netguard

REFUSED = {
    "127.0.0.1": "loopback", "127.8.9.10": "loopback", "::1": "loopback",
    "10.0.0.1": "private", "172.16.5.4": "private", "192.168.1.1": "private", "fc00::1": "private",
    "fd12:3456::1": "private",
    "169.254.169.254": "link-local", "fe80::1": "link-local", "fe80::1%eth0": "link-local",
    "100.64.0.1": "shared (CGNAT)", "100.127.255.254": "shared (CGNAT)",
    "0.0.0.0": "wildcard (unspecified)", "::": "wildcard (unspecified)", "0.1.2.3": "private",  # 0/8: "this network"
    "224.0.0.1": "multicast", "239.255.255.250": "multicast", "ff02::1": "multicast", "ff0e::1": "multicast",
    "240.0.0.1": "private", "255.255.255.255": "private",  # reserved, and in Python's private list
    "198.18.0.1": "private", "198.19.255.1": "private",  # benchmarking
    "192.0.2.1": "private", "198.51.100.1": "private", "203.0.113.1": "private", "2001:db8::1": "private",
    "fec0::1": "site-local", "64:ff9b:1::1": "local NAT64",
    "2001:0:4136:e378:8000:63bf:3fff:fdd2": "private",  # Teredo (2001::/32)
}
# IPv6 addresses that lead to an IPv4 one, and the IPv4 address each is judged by.
EMBEDDING = {
    "::ffff:127.0.0.1": "127.0.0.1", "::ffff:169.254.169.254": "169.254.169.254", "::127.0.0.1": "127.0.0.1",
    "::10.0.0.1": "10.0.0.1", "2002:7f00:1::": "127.0.0.1", "2002:a9fe:a9fe::1": "169.254.169.254",
    "2002:6440:1::": "100.64.0.1", "64:ff9b::7f00:1": "127.0.0.1", "64:ff9b::a00:1": "10.0.0.1",
}
ALLOWED = ["93.184.216.34", "8.8.8.8", "1.1.1.1", "2606:4700:4700::1111", "2a00:1450:4001:80b::200e",
           "::ffff:8.8.8.8", "2002:808:808::1", "64:ff9b::808:808"]


@pytest.mark.parametrize(("address", "kind"), sorted(REFUSED.items()))
def test_non_global_addresses_are_refused_naming_their_kind(address: str, kind: str) -> None:
    assert netguard.refusal(address) == f"{address} is a {kind} address"


@pytest.mark.parametrize(("address", "inner"), sorted(EMBEDDING.items()))
def test_ipv6_addresses_embedding_a_refused_ipv4_address_are_refused(address: str, inner: str) -> None:
    refused = netguard.refusal(address)
    assert refused is not None and refused.startswith(f"{address} embeds {inner}, a ")


@pytest.mark.parametrize("address", ALLOWED)
def test_global_addresses_pass(address: str) -> None:
    assert netguard.refusal(address) is None


@given(st.ip_addresses(v=4))
def test_an_ipv4_address_and_each_ipv6_form_of_it_are_judged_alike(ip: ipaddress.IPv4Address) -> None:
    refused = netguard.refusal(str(ip)) is not None
    assert refused == (not ip.is_global or ip.is_multicast)
    forms = [ipaddress.IPv6Address(f"::ffff:{ip}"), ipaddress.IPv6Address((0x2002 << 112) | (int(ip) << 80)),
             ipaddress.IPv6Address(int(ipaddress.IPv6Address("64:ff9b::")) | int(ip))]
    if int(ip) > 1:
        forms.append(ipaddress.IPv6Address(int(ip)))  # ::a.b.c.d (:: and ::1 are addresses of their own)
    for form in forms:
        assert (netguard.refusal(str(form)) is not None) == refused, form


def test_a_url_whose_host_is_an_address_is_judged_without_resolving() -> None:
    assert netguard.literal_refusal("http://[::1]:8000/v1") == "::1 is a loopback address"
    assert netguard.literal_refusal("http://93.184.216.34/v1") is None
    assert netguard.literal_refusal("http://localhost:8000/v1") is None  # a name: the resolver's business


def test_a_name_is_judged_by_what_it_resolves_to() -> None:
    assert asyncio.run(netguard.host_refusal("localhost")) in (
        "localhost resolves to 127.0.0.1 is a loopback address", "localhost resolves to ::1 is a loopback address")


def test_the_guarded_resolver_refuses_a_name_that_resolves_to_loopback_before_any_connection() -> None:
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    listener.settimeout(0)

    async def attempt() -> BaseException:
        connector = aiohttp.TCPConnector(resolver=netguard.GuardedResolver())
        async with aiohttp.ClientSession(connector=connector) as session:
            with pytest.raises(aiohttp.ClientConnectorError) as caught:
                await session.get(f"http://localhost:{port}/")
        return caught.value.os_error

    try:
        refused = asyncio.run(attempt())
        assert isinstance(refused, netguard.RefusedTarget) and "loopback" in str(refused)
        with pytest.raises(BlockingIOError):
            listener.accept()  # nothing ever connected
    finally:
        listener.close()
