"""The form of an http(s) URL that ScaiGrid calls out to (a backend, a webhook), checked where each is saved."""

from urllib.parse import urlsplit


def http_url_problem(url: str) -> str | None:
    """What keeps `url` from being an http(s) URL to call (None: nothing): its form, scheme, host or port."""
    try:
        parts = urlsplit(url)  # raises ValueError on a broken IPv6 address
        port = parts.port  # and this on a port that is not a number or out of range
    except ValueError:
        return "not a valid URL"
    if port == 0:
        return "not a valid URL"
    if parts.scheme not in ("http", "https"):
        return "must be an http or https URL"
    if not parts.hostname:
        return "must name a host"
    return None
