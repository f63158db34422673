"""The appliance's side of hybrid enrolment: enrol with a managed ScaiGrid, keep the node credential, rotate, leave.

The credential lives in CONFIG_DIR/secrets/link.json (0600) and is never printed. Every call goes over HTTPS,
verified against the CA file given at enrolment (copied to CONFIG_DIR/tls/link-ca.pem) or the system CAs. The
rendered scaigrid.env takes the node's HYBRID_* settings from link.json (appliance/config.py).
"""

from __future__ import annotations

import json
import re
import ssl
import urllib.error
import urllib.request
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from appliance.config import Appliance
from appliance.files import write_private_file

TIMEOUT_S = 15
# Where the managed side's nginx takes gRPC over TLS unless told otherwise: the appliance's GRPC_TLS_PORT default.
DEFAULT_LINK_PORT = 50443
_TARGET = re.compile(r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?):(\d{1,5})")


class LinkError(Exception):
    """A refused or failed link operation, in one line for the operator."""


@dataclass(frozen=True)
class Link:
    url: str
    node_id: str
    credential: str
    ca_file: str | None
    link_target: str  # host:port of the managed side's gRPC TLS endpoint, dialled by the link program


def read(appliance: Appliance) -> Link | None:
    path = appliance.config.link_file
    if not path.exists():
        return None
    return Link(**json.loads(path.read_text()))


def _write(appliance: Appliance, link: Link) -> None:
    appliance.config.link_file.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    write_private_file(appliance.config.link_file, json.dumps(asdict(link), indent=2))


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


def link_target(url: str, given: str | None) -> str:
    """HOST:PORT the link dials: the one given, checked, or the managed URL's host on DEFAULT_LINK_PORT."""
    if given is None:
        host = urlsplit(_base_url(url)).hostname or ""
        return f"[{host}]:{DEFAULT_LINK_PORT}" if ":" in host else f"{host}:{DEFAULT_LINK_PORT}"
    match = _TARGET.fullmatch(given)
    if match is None or not 1 <= int(match[3]) <= 65535:
        raise LinkError(f"--link-target {given!r}: expected HOST:PORT, e.g. grid.example.com:50443")
    return given


def enroll(appliance: Appliance, url: str, token: str, ca_file: str | None, name: str, software_version: str,
           target: str | None = None) -> Link:
    if (current := read(appliance)) is not None:
        raise LinkError(f"already enrolled as {current.node_id}; `link unenroll` first")
    if appliance.passthrough.get("HYBRID_ROLE", "").lower() == "managed":  # parsed case-insensitively
        raise LinkError(f"this appliance is a managed side (HYBRID_ROLE=managed in {appliance.path}): "
                        "only a node enrols")
    dialled = link_target(url, target)
    kept_ca = None
    if ca_file is not None:  # before the token is spent: a local failure here then costs no enrolment
        _copy_ca(Path(ca_file), appliance.config.link_ca_file)
        kept_ca = str(appliance.config.link_ca_file)
    data = _call(url, ca_file, "POST", "/v1/hybrid/enroll",
                 body={"token": token, "name": name, "software_version": software_version})
    link = Link(url=_base_url(url), node_id=data["node_id"], credential=data["credential"], ca_file=kept_ca,
                link_target=dialled)
    _write(appliance, link)
    return link


def _copy_ca(source: Path, target: Path) -> None:
    """A 0644 copy: the link program runs as the service user, who may not read the operator's file."""
    target.parent.mkdir(parents=True, exist_ok=True)
    temporary = target.with_name(f".{target.name}.tmp")
    temporary.write_bytes(source.read_bytes())
    temporary.chmod(0o644)
    temporary.replace(target)


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
    rotated = Link(url=link.url, node_id=link.node_id, credential=data["credential"], ca_file=link.ca_file,
                   link_target=link.link_target)
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
        _forget(appliance)
        return False
    _forget(appliance)
    return True


def _forget(appliance: Appliance) -> None:
    appliance.config.link_file.unlink()
    appliance.config.link_ca_file.unlink(missing_ok=True)


def local_state(appliance: Appliance, http_port: int) -> dict[str, Any]:
    """The link as this appliance's http process sees it (the "link" section of its /health/detailed).

    The link program publishes its state for the http process; {"problem": ...} when that cannot be asked.
    """
    try:
        admin_key = appliance.config.admin_key_file.read_text().strip()
    except OSError as exc:
        return {"connected": False, "problem": f"cannot read the admin key ({exc.strerror})"}
    request = urllib.request.Request(f"http://127.0.0.1:{http_port}/health/detailed",
                                     headers={"Authorization": f"Bearer {admin_key}", "Accept": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=TIMEOUT_S) as response:
            body = json.loads(response.read())
    except (urllib.error.URLError, OSError, ValueError) as exc:
        return {"connected": False, "problem": f"the http program does not answer /health/detailed ({exc})"}
    state = body.get("link")
    if not isinstance(state, dict):
        return {"connected": False, "problem": "the http program reports no link state"}
    return state


def describe(state: dict[str, Any], now_unix: float) -> str:
    """One line for `scaigrid-appliance status`."""
    if "connected" not in state or state.get("problem"):  # e.g. {"status": "link program not running"}
        return f"NOT connected: {state.get('problem') or state.get('status', 'state unknown')}"
    details = []
    if state.get("last_heartbeat_unix"):
        details.append(f"last heartbeat {max(0.0, now_unix - float(state['last_heartbeat_unix'])):.0f}s ago")
    details += [f"config v{state.get('config_version', 0)}", f"outbox {state.get('outbox_depth', 0)}",
                f"tunnels {state.get('tunnels_in_flight', 0)}"]
    if state.get("connected"):
        return f"connected to {state.get('target', '?')}; " + ", ".join(details)
    reason = f" ({state['last_error']})" if state.get("last_error") else ""
    return f"NOT connected{reason}; " + ", ".join(details)
