"""Which URLs a webhook may call: http(s) without credentials, and (unless allowed) only what scaigrid.netguard passes.

The address check runs when the webhook is saved (a clear 422) and again on every delivery (delivery.py).
"""

from urllib.parse import urlsplit

from scaigrid import netguard
from scaigrid.urls import http_url_problem

ALLOW_HINT = " (set WEBHOOK_ALLOW_PRIVATE_TARGETS=true to allow it)"


def url_problem(url: str) -> str | None:
    """What is wrong with the URL's form (None: nothing): that of any URL ScaiGrid calls, and no credentials."""
    problem = http_url_problem(url)
    if problem is not None:
        return problem
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        return "must not contain credentials; authenticate the sender by the signature"
    return None


async def target_problem(url: str, *, allow_private: bool) -> str | None:
    """url_problem, then (unless allow_private) the addresses the host resolves to now."""
    problem = url_problem(url)
    if problem is not None or allow_private:
        return problem
    host = urlsplit(url).hostname
    assert host is not None  # url_problem checked it
    refused = await netguard.host_refusal(host)
    return None if refused is None else refused + ALLOW_HINT
