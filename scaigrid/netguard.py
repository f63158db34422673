"""Where the node may connect: the one guard of every outbound address (backends, webhooks), unless allowed.

Only globally reachable addresses pass: loopback, private, link-local (the cloud metadata address included), shared
(CGNAT), unspecified, multicast, reserved, documentation and benchmarking ranges, unique-local and site-local IPv6
are refused, and so is any IPv6 address that embeds a refused IPv4 one (IPv4-mapped or -compatible, 6to4, NAT64).

The check runs twice: when the URL is saved (a clear 422) and inside the connection's own DNS resolution
(`GuardedResolver`), so a name that later resolves to an internal address (DNS rebinding) is refused on the very
connection that would have reached it. aiohttp does not resolve an IP-literal host, so a caller connecting to a
stored URL checks those itself (`literal_refusal`).
"""

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

_SHARED = ipaddress.IPv4Network("100.64.0.0/10")  # carrier-grade NAT: inside a provider, not the internet
_IPV4_COMPATIBLE = ipaddress.IPv6Network("::/96")  # deprecated ::a.b.c.d
_NAT64 = ipaddress.IPv6Network("64:ff9b::/96")  # the well-known NAT64 prefix: the last 32 bits are the IPv4 target
_LOCAL_NAT64 = ipaddress.IPv6Network("64:ff9b:1::/48")  # NAT64 prefixes of one site


class RefusedTarget(OSError):
    """The target is not allowed; an OSError so that aiohttp reports it as the connection's cause."""


def _embedded(ip: ipaddress.IPv6Address) -> ipaddress.IPv4Address | None:
    """The IPv4 address an IPv6 one stands for, where traffic to it ends up at that IPv4 address."""
    if ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    if ip.sixtofour is not None:
        return ip.sixtofour
    if ip in _NAT64 or (ip in _IPV4_COMPATIBLE and int(ip) > 1):  # :: and ::1 are themselves
        return ipaddress.IPv4Address(int(ip) & 0xFFFFFFFF)
    return None


def _kind(ip: IPAddress) -> str | None:
    """What kind of non-global address `ip` is (None: a global one)."""
    # Most specific first: loopback and link-local ranges are also `is_private`.
    checks = [("loopback", ip.is_loopback), ("link-local", ip.is_link_local), ("multicast", ip.is_multicast),
              ("wildcard (unspecified)", ip.is_unspecified)]
    if isinstance(ip, ipaddress.IPv4Address):
        checks.append(("shared (CGNAT)", ip in _SHARED))
    else:
        checks += [("site-local", ip.is_site_local), ("local NAT64", ip in _LOCAL_NAT64)]
    checks += [("private", ip.is_private), ("reserved", ip.is_reserved), ("non-global", not ip.is_global)]
    return next((kind for kind, flag in checks if flag), None)


def refusal(address: str) -> str | None:
    """Why the node may not connect to this IP address (None: it may)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address) and (inner := _embedded(ip)) is not None:
        # Judged by where it leads: the IPv6 wrapping of a global IPv4 address is as good as that address.
        kind = _kind(inner)
        return None if kind is None else f"{address} embeds {inner}, a {kind} address"
    kind = _kind(ip)
    return None if kind is None else f"{address} is a {kind} address"


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


async def host_refusal(host: str) -> str | None:
    """Why the node may not connect to `host` (an IP address, or a name by the addresses it resolves to now)."""
    if _is_ip(host):
        return refusal(host)
    try:
        found = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return f"the host {host} does not resolve"
    for *_, sockaddr in found:
        problem = refusal(str(sockaddr[0]))
        if problem is not None:
            return f"{host} resolves to {problem}"
    return None


def literal_refusal(url: str) -> str | None:
    """For connecting: an IP-literal host (which aiohttp connects to without resolving) that is refused."""
    host = urlsplit(url).hostname or ""
    return refusal(host) if _is_ip(host) else None


class GuardedResolver(AbstractResolver):
    """The default resolver, refusing any name that resolves to an address the guard refuses."""

    def __init__(self) -> None:
        self._inner = DefaultResolver()

    async def resolve(self, host: str, port: int = 0, family: socket.AddressFamily = socket.AF_INET
                      ) -> list[ResolveResult]:
        found = await self._inner.resolve(host, port, family)
        for result in found:
            problem = refusal(result["host"])
            if problem is not None:
                raise RefusedTarget(f"{host} resolves to {problem}")
        return found

    async def close(self) -> None:
        await self._inner.close()
