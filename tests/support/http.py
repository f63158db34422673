"""Plain HTTP GETs for probing processes under test: any status comes back, errors included."""

import urllib.error
import urllib.request


def http_get(url: str, timeout_s: float = 5) -> tuple[int, dict[str, str], bytes]:
    """GET returning (status, headers, body) for any status, errors included."""
    try:
        with urllib.request.urlopen(url, timeout=timeout_s) as response:
            return response.status, dict(response.headers), response.read()
    except urllib.error.HTTPError as error:
        return error.code, dict(error.headers), error.read()


def http_ok(url: str) -> bool:
    return http_get(url, timeout_s=2)[0] == 200
