"""The appliance's side of hybrid enrolment: enrol with a managed ScaiGrid, keep the node credential, rotate, leave.

The credential lives in CONFIG_DIR/secrets/link.json (0600) and is never printed. Every call goes over HTTPS,
verified against the CA file given at enrolment (kept in link.json) or the system CAs.
"""

from __future__ import annotations

import json
import ssl
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from appliance import devstack
from appliance.config import Appliance

TIMEOUT_S = 15


class LinkError(Exception):
    """A refused or failed link operation, in one line for the operator."""


@dataclass(frozen=True)
class Link:
    url: str
    node_id: str
    credential: str
    ca_file: str | None


def link_file(appliance: Appliance) -> Path:
    return appliance.config.secrets_dir / "link.json"


def read(appliance: Appliance) -> Link | None:
    path = link_file(appliance)
    if not path.exists():
        return None
    return Link(**json.loads(path.read_text()))


def _write(appliance: Appliance, link: Link) -> None:
    link_file(appliance).parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    devstack.write_private_file(link_file(appliance), json.dumps(asdict(link), indent=2))


def _base_url(url: str) -> str:
    if not url.startswith("https://"):
        raise LinkError(f"refusing {url!r}: the link must use https:// (the token and credential would otherwise "
                        "travel in clear); for a private CA give --ca-file")
    return url.rstrip("/")


def _call(url: str, ca_file: str | None, method: str, path: str, *, credential: str | None = None,
          body: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `data` of the managed side's answer; LinkError with its code and message when it refuses."""
    headers = {"Content-Type": "application/json", "Accept": "application/json"}
    if credential is not None:
        headers["Authorization"] = f"Bearer {credential}"
    request = urllib.request.Request(_base_url(url) + path, method=method, headers=headers,
                                     data=None if body is None else json.dumps(body).encode())
    context = ssl.create_default_context(cafile=ca_file)
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S, context=context) as response:
            data: dict[str, Any] = json.loads(response.read())["data"]
            return data
    except urllib.error.HTTPError as exc:
        raise LinkError(_refusal(exc)) from None
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        raise LinkError(f"cannot reach {url}: {reason}") from None


def _refusal(exc: urllib.error.HTTPError) -> str:
    try:
        error = json.loads(exc.read())["error"]
        return f"{error['code']}: {error['message']}"
    except (ValueError, KeyError, TypeError):
        return f"HTTP {exc.code} from the managed side"


def enroll(appliance: Appliance, url: str, token: str, ca_file: str | None, name: str, software_version: str
           ) -> Link:
    if (current := read(appliance)) is not None:
        raise LinkError(f"already enrolled as {current.node_id}; `link unenroll` first")
    if ca_file is not None:
        ca_file = str(Path(ca_file).resolve())
    data = _call(url, ca_file, "POST", "/v1/hybrid/enroll",
                 body={"token": token, "name": name, "software_version": software_version})
    link = Link(url=_base_url(url), node_id=data["node_id"], credential=data["credential"], ca_file=ca_file)
    _write(appliance, link)
    return link


def enrolled(appliance: Appliance) -> Link:
    link = read(appliance)
    if link is None:
        raise LinkError("not enrolled; run `scaigrid-appliance link enroll --url URL --token TOKEN` first")
    return link


def check(link: Link) -> dict[str, Any]:
    """The managed side's record of this node, fetched with the stored credential (LinkError if refused)."""
    return _call(link.url, link.ca_file, "GET", "/v1/hybrid/link", credential=link.credential)


def rotate(appliance: Appliance) -> Link:
    """A new credential, saved before first use; that first use (a check) is the switch that retires the old one."""
    link = enrolled(appliance)
    data = _call(link.url, link.ca_file, "POST", "/v1/hybrid/link/rotate", credential=link.credential)
    rotated = Link(url=link.url, node_id=link.node_id, credential=data["credential"], ca_file=link.ca_file)
    _write(appliance, rotated)
    check(rotated)
    return rotated


def unenroll(appliance: Appliance, *, force: bool) -> bool:
    """Leaves the managed side, then forgets the link; True if the managed side agreed. With `force`, a managed
    side that cannot be reached (or refuses) does not stop the local removal: False, and it may still list the node."""
    link = enrolled(appliance)
    try:
        _call(link.url, link.ca_file, "DELETE", "/v1/hybrid/link", credential=link.credential)
    except LinkError:
        if not force:
            raise
        link_file(appliance).unlink()
        return False
    link_file(appliance).unlink()
    return True
