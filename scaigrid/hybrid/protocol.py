"""What both ends of the hybrid link agree on: the protocol version, the version-skew rule, and shared names.

Version skew. The managed side is upgraded first and nodes follow, so a node may run the managed side's release or
an older one, never a newer one:
- the link protocol (LINK_PROTOCOL_VERSION) must be one the managed side speaks (MIN_NODE_PROTOCOL..current);
- the node's software version must have the managed side's major version, and a minor version at most
  MAX_MINOR_BEHIND below it. A newer node is refused too: it may send what the managed side does not understand.
A refused node gets HYBRID_VERSION_SKEW (errors.hybrid_version_skew) with both versions and what to do, and
retries with backoff (an upgrade on either side then lets it in without an operator touching the link).
"""

import logging
import re
from collections.abc import Mapping

from scaigrid import errors
from scaigrid.auth import service_tokens
from scaigrid.settings import Secret

logger = logging.getLogger(__name__)

LINK_PROTOCOL_VERSION = 1
MIN_NODE_PROTOCOL = 1
MAX_MINOR_BEHIND = 1
LINK_SERVICE_NAME = "hybrid-link"  # the node's link process calls its own http process as this service
RELAY_SERVICE_NAME = "hybrid-relay"  # managed http processes call TunnelRelay.Open on a grpc replica as this service
TUNNEL_WINDOW = 32  # frames a node may send per tunnel ahead of the managed side's TunnelCredit
# Where the node's link process publishes its state for the http process and `scaigrid-appliance status`.
NODE_STATE_KEY = "scaigrid:hybrid:node:state"
# A request the hybrid link tunnels from the managed side keeps the managed side's request id, so that its usage
# record has one id on both sides; only the node's link process, holding a service token, can set it.
TUNNEL_HEADER, TUNNEL_ID_HEADER = "X-Scaigrid-Tunnel", "X-Scaigrid-Tunnel-Id"
REQUEST_ID_PATTERN = re.compile(r"req_[0-9a-f]{24}")  # every request id has this form (the request middleware gives it)
# An upstream request (a node's `managed` backend) names the node's request id. The managed side cannot take it as its
# own (any API-key holder could send it, and request ids key the usage records): it logs it beside its own id
# (`node_request_id`) and echoes it, so one request is found on both sides by either id.
NODE_REQUEST_ID_HEADER = "X-Scaigrid-Node-Request-Id"


def node_request_id(headers: Mapping[str, str]) -> str | None:
    """The node's request id an upstream request names, when it has a request id's form."""
    value = headers.get(NODE_REQUEST_ID_HEADER, "")
    return value if REQUEST_ID_PATTERN.fullmatch(value) else None

_VERSION = re.compile(r"(\d+)\.(\d+)(?:\.\d+)?(?:[-+.].*)?")


def _major_minor(version: str) -> tuple[int, int] | None:
    match = _VERSION.fullmatch(version)
    return (int(match[1]), int(match[2])) if match else None


def skew_problem(node_protocol: int, node_version: str, managed_version: str) -> str | None:
    """Why a node may not link to this managed side; None when it may."""
    if not MIN_NODE_PROTOCOL <= node_protocol <= LINK_PROTOCOL_VERSION:
        return (f"the node speaks link protocol {node_protocol}; this managed side speaks "
                f"{MIN_NODE_PROTOCOL}..{LINK_PROTOCOL_VERSION}: upgrade the "
                f"{'managed side' if node_protocol > LINK_PROTOCOL_VERSION else 'appliance'}")
    node, managed = _major_minor(node_version), _major_minor(managed_version)
    if node is None:
        return f"the node's software version {node_version!r} is not MAJOR.MINOR[.PATCH]"
    if managed is None:  # a development build on the managed side: only the protocol is checked
        return None
    if node[0] != managed[0] or node[1] > managed[1]:
        return (f"the node runs {node_version}, the managed side {managed_version}: a node must run the managed "
                f"side's major version and no newer a release; upgrade the managed side first, then the appliance")
    if managed[1] - node[1] > MAX_MINOR_BEHIND:
        return (f"the node runs {node_version}, more than {MAX_MINOR_BEHIND} minor release(s) behind the managed "
                f"side's {managed_version}: upgrade the appliance (`scaigrid-appliance upgrade`)")
    return None


def tunnel_id(headers: Mapping[str, str], secret: Secret | None, path: str) -> str | None:
    """The tunnel id the link process gives its request, when its token is valid; a forgery is logged and ignored."""
    token = headers.get(TUNNEL_HEADER)
    if token is None:
        return None
    tunnel_id = headers.get(TUNNEL_ID_HEADER, "")
    try:
        scope = service_tokens.verify(secret, token).scope
    except errors.ScaigridError as exc:
        problem = exc.message
    else:
        if scope != service_tokens.HYBRID_LINK:
            problem = f"the token's scope is {scope}, not {service_tokens.HYBRID_LINK}"
        elif not REQUEST_ID_PATTERN.fullmatch(tunnel_id):
            problem = f"{TUNNEL_ID_HEADER} is not a request id"
        else:
            return tunnel_id
    logger.warning("%s ignored: %s", TUNNEL_HEADER, problem, extra={"event": "tunnel_header_ignored", "path": path})
    return None
