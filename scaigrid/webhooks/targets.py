"""Which URLs a webhook may call: http(s) without credentials, and (unless allowed) no private addresses.

The address check runs twice: when the webhook is saved (a clear 422) and inside the delivery's own DNS
resolution (`GuardedResolver`), so a name that later resolves to an internal address (DNS rebinding) is
refused on the very connection that would have reached it.
"""

import asyncio
import ipaddress
import socket
from urllib.parse import urlsplit

from aiohttp.abc import AbstractResolver, ResolveResult
from aiohttp.resolver import DefaultResolver

from scaigrid.urls import http_url_problem


class RefusedTarget(OSError):
    """The target is not allowed; an OSError so that aiohttp reports it as the connection's cause."""


def refusal(address: str) -> str | None:
    """Why this IP address may not be called (None: it may)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # drop an IPv6 zone id
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    # Most specific first: loopback and link-local ranges are also `is_private`.
    for kind, flag in (("loopback", ip.is_loopback), ("link-local", ip.is_link_local), ("multicast", ip.is_multicast),
                       ("unspecified", ip.is_unspecified), ("reserved", ip.is_reserved), ("private", ip.is_private)):
        if flag:
            return f"{address} is a {kind} address (set WEBHOOK_ALLOW_PRIVATE_TARGETS=true to allow it)"
    return None


def url_problem(url: str) -> str | None:
    """What is wrong with the URL's form (None: nothing): that of any URL ScaiGrid calls, and no credentials."""
    problem = http_url_problem(url)
    if problem is not None:
        return problem
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        return "must not contain credentials; authenticate the sender by the signature"
    return None


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    return True


async def target_problem(url: str, *, allow_private: bool) -> str | None:
    """url_problem, then (unless allow_private) the addresses the host resolves to now."""
    problem = url_problem(url)
    if problem is not None or allow_private:
        return problem
    host = urlsplit(url).hostname
    assert host is not None  # url_problem checked it
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


def literal_refusal(url: str, *, allow_private: bool) -> str | None:
    """For delivery: an IP-literal host (which aiohttp connects to without resolving) that is refused."""
    host = urlsplit(url).hostname or ""
    if allow_private or not _is_ip(host):
        return None
    return refusal(host)


class GuardedResolver(AbstractResolver):
    """The default resolver, refusing any name that resolves to an address webhooks may not call."""

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
