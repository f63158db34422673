"""The audit log's writer: every POST, PUT, PATCH and DELETE on /v1/ but inference is one row, written by
`audit_middleware` once the answer is decided (one INSERT, the request's own lookups done inside it).

What a row holds (docs/api.md, "Audit log"): the actor (user id, email, partner, tenant, API key; or the service,
or the webhook's sender), the action derived from the route (`api_key.create`, `budget.update`, `module.enable`),
the resource type and id, whose object it is (tenant and partner, for who may read it), SUCCESS or FAILURE with the
HTTP status and error code, IP, User-Agent, request id, and the object after the change (the answer's data) and
before it where the route has it at hand. Secrets (keys, tokens, webhook secrets, credentials) are never written.
"""

import ipaddress
import json
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from prometheus_client import Counter
from sqlalchemy import ScalarSelect, insert, select

from scaigrid import errors
from scaigrid.access import route_access
from scaigrid.appkeys import AUDIT_BEFORE, DB, PRINCIPAL, REQUEST_ID
from scaigrid.clock import utc_now
from scaigrid.db.tables import audit_log, new_id, tenants, users

logger = logging.getLogger(__name__)

AUDITED_METHODS = {"POST": "create", "PUT": "update", "PATCH": "update", "DELETE": "delete"}
# Data-plane traffic with its own record: object reads and writes of sandbox workers (ScaiBunker's storage audit).
UNAUDITED_PREFIXES = ("/v1/modules/scaibunker/storage/objects",)
# Where the path alone names things badly: (method, route) -> (action, resource type).
ACTIONS: dict[tuple[str, str], tuple[str, str]] = {
    ("POST", "/v1/webhooks/scaikey"): ("scaikey_event.receive", "scaikey_event"),
    ("POST", "/v1/hybrid/enrollment-tokens"): ("hybrid_enrollment_token.create", "hybrid_enrollment_token"),
    ("DELETE", "/v1/hybrid/nodes/{id}"): ("hybrid_node.delete", "hybrid_node"),
    ("PUT", "/v1/hybrid/nodes/{id}/tenants"): ("hybrid_node.set_tenants", "hybrid_node"),
    ("POST", "/v1/hybrid/enroll"): ("hybrid_node.enroll", "hybrid_node"),
    ("POST", "/v1/hybrid/link/rotate"): ("hybrid_link.rotate", "hybrid_link"),
    ("DELETE", "/v1/hybrid/link"): ("hybrid_link.delete", "hybrid_link"),
}
# Open routes that authenticate themselves: who is acting when they succeed (their failures name nobody).
PUBLIC_ACTORS = {"/v1/webhooks/scaikey": ("webhook", "scaikey")}
# Never written, at any depth of before/after, whatever the route: credentials of every kind.
SECRET_NAMES = {"key", "secret", "token", "api_key", "credential", "password", "node_credential"}
SECRET_SUFFIXES = ("_secret", "_token", "_password", "_credential", "_encrypted")
MAX_OBJECT_BYTES = 60_000  # a larger before/after is replaced by a note (a JSON column is no archive)

AUDIT_WRITES = Counter("scaigrid_audit_writes_total", "audit log rows written, or failed to be", ["result"])


def _singular(segment: str) -> str:
    name = segment.replace("-", "_")
    if name.endswith("ies"):
        return name[:-3] + "y"
    if name.endswith(("ches", "shes", "sses", "xes")):
        return name[:-2]
    return name[:-1] if name.endswith("s") and not name.endswith("ss") else name


def action_of(method: str, path: str) -> tuple[str, str]:
    """(action, resource type) of a route: `POST /v1/api-keys` is api_key.create, `PUT /v1/accounting/budgets/{id}`
    budget.update, `POST /v1/webhooks/{id}/test` webhook.test, a module's `POST /v1/modules/scaibunker/storage/
    capabilities` scaibunker.capability.create."""
    if (method, path) in ACTIONS:
        return ACTIONS[method, path]
    segments = path.strip("/").split("/")[1:]  # without "v1"
    verb = AUDITED_METHODS[method]
    if len(segments) >= 2 and segments[-2].startswith("{") and not segments[-1].startswith("{"):
        verb = segments.pop().replace("-", "_")  # a verb on an object: /webhooks/{id}/test, /modules/{id}/enable
    statics = [s for s in segments if not s.startswith("{")]
    resource = _singular(statics[-1])
    if len(statics) > 2 and statics[0] == "modules":  # a module's own route: prefixed with the module's id
        resource = f"{statics[1]}.{resource}"
    return f"{resource}.{verb}", resource


def redact(value: Any) -> Any:
    """The value without any field that holds a credential, at any depth."""
    if isinstance(value, dict):
        return {k: redact(v) for k, v in value.items()
                if not (k in SECRET_NAMES or (isinstance(k, str) and k.endswith(SECRET_SUFFIXES)))}
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def _bounded(value: dict[str, Any] | None) -> dict[str, Any] | None:
    if value is None:
        return None
    value = redact(value)
    if len(json.dumps(value, default=str)) > MAX_OBJECT_BYTES:
        return {"truncated": True, "id": value.get("id")}
    return value


def _answer_data(response: web.StreamResponse) -> dict[str, Any] | None:
    """The `data` object of an enveloped JSON answer, or None."""
    body = getattr(response, "body", None)
    if not isinstance(body, bytes) or response.content_type != "application/json" or len(body) > 4 * MAX_OBJECT_BYTES:
        return None
    try:
        data = json.loads(body).get("data")
    except (ValueError, AttributeError):
        return None
    return data if isinstance(data, dict) else None


def client_ip(request: web.Request) -> str | None:
    """The client's address: nginx's X-Real-IP when nginx (on loopback) sent the request, else the peer's."""
    peer = request.remote
    try:
        behind_proxy = peer is not None and ipaddress.ip_address(peer).is_loopback
    except ValueError:
        behind_proxy = False
    return (request.headers.get("X-Real-IP") if behind_proxy else None) or peer


def _audited(request: web.Request) -> tuple[str, str] | None:
    """(action, resource type) when this request is recorded, else None."""
    if request.method not in AUDITED_METHODS or not request.path.startswith("/v1/"):
        return None
    if request.match_info.http_exception is not None or request.path.startswith(UNAUDITED_PREFIXES):
        return None
    access = route_access(request)
    resource = request.match_info.route.resource
    if access is None or access.metered or resource is None:  # metered: inference, in the usage records instead
        return None
    return action_of(request.method, resource.canonical)


def _subject(row: dict[str, Any], obj: dict[str, Any] | None, resource_type: str, resource_id: str | None
             ) -> tuple[Any, Any]:
    """(tenant, partner) whose object it is, as values or subqueries for the INSERT: from the object itself where it
    says, else the actor's own."""
    def partner_of(tenant: Any) -> ScalarSelect[Any]:
        return select(tenants.c.partner_id).where(tenants.c.id == tenant).scalar_subquery()

    obj = obj or {}
    if resource_type == "partner":
        return None, resource_id
    if resource_type == "tenant" and resource_id:
        return resource_id, obj.get("partner_id") or partner_of(resource_id)
    if "tenant_id" in obj:
        tenant = obj["tenant_id"]
    elif "tenant" in obj:  # catalogue objects name their tenant by slug (null: the platform's)
        slug = obj["tenant"]
        tenant = None if slug is None else select(tenants.c.id).where(tenants.c.slug == slug).scalar_subquery()
        if slug is not None:
            return tenant, select(tenants.c.partner_id).where(tenants.c.slug == slug).scalar_subquery()
    else:
        return row["actor_tenant_id"], row["actor_partner_id"]
    partner = obj.get("partner_id")
    if partner is None and tenant is not None:
        partner = partner_of(tenant)
    return tenant, partner


async def record(request: web.Request, action: str, resource_type: str, http_status: int, error_code: str | None,
                 response: web.StreamResponse | None) -> None:
    """Writes the row; a failure to write is logged and counted, never the request's failure."""
    principal = request.get(PRINCIPAL)
    if principal is None and http_status >= 400:
        return  # refused before anyone was known: it names nobody, and anyone could fill the log with them
    after = _answer_data(response) if response is not None and http_status < 400 else None
    before = request.get(AUDIT_BEFORE)
    obj = after or before
    if principal is None:  # an open route that authenticated its caller itself
        route = request.match_info.route.resource
        actor_type, actor_id = PUBLIC_ACTORS.get(route.canonical if route else "", ("service", None))
        actor_id = actor_id or (None if obj is None else obj.get("node_id"))
    else:
        actor_type = "service" if principal.kind == "service" else "user"
        actor_id = principal.user_id or f"service:{principal.name}"
    resource_id = "/".join(request.match_info.values()) or None
    if resource_id is None and obj is not None:
        found = obj.get("id") or obj.get("slug") or obj.get("node_id")
        resource_id = None if found is None else str(found)
    if resource_type == "module" and obj is not None and "scope" in obj:  # whose switch it is
        obj = {"tenant_id": obj["scope_id"]} if obj["scope"] == "tenant" else {
            "tenant_id": None, "partner_id": obj["scope_id"]}
    row: dict[str, Any] = {
        "id": new_id("aud"), "created_at": utc_now(), "request_id": request[REQUEST_ID], "actor_type": actor_type,
        "actor_id": actor_id, "actor_partner_id": (principal.partner_id or None) if principal else None,
        "actor_tenant_id": (principal.tenant_id or None) if principal else None,
        "api_key_id": principal.api_key_id if principal else None, "action": action[:96],
        "resource_type": resource_type[:64], "resource_id": None if resource_id is None else resource_id[:191],
        "status": "SUCCESS" if http_status < 400 else "FAILURE", "http_status": http_status,
        "error_code": error_code, "method": request.method, "path": request.path[:1024],
        "ip": (client_ip(request) or "")[:64] or None,
        "user_agent": request.headers.get("User-Agent", "")[:512] or None,
        "before": _bounded(before), "after": _bounded(after)}
    row["tenant_id"], row["partner_id"] = _subject(row, obj, resource_type, resource_id)
    if principal is not None and principal.user_id:
        row["actor_email"] = select(users.c.email).where(users.c.id == principal.user_id).scalar_subquery()
    try:
        async with request.app[DB].begin() as conn:
            await conn.execute(insert(audit_log).values(**row))
    except Exception as exc:  # the change itself is done: its answer must not turn into an error here
        AUDIT_WRITES.labels("failed").inc()
        logger.warning("audit log entry not written (%s): %s %s", type(exc).__name__, action, resource_id,
                       extra={"event": "audit_write_failed", "action": action})
        return
    AUDIT_WRITES.labels("written").inc()


@web.middleware
async def audit_middleware(request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
                           ) -> web.StreamResponse:
    """Records each audited request after its answer is decided: the answer itself, or the error it raised."""
    audited = _audited(request)
    if audited is None:
        return await handler(request)
    try:
        response = await handler(request)
    except errors.ScaigridError as exc:
        await record(request, *audited, exc.status, exc.code, None)
        raise
    except web.HTTPException as exc:
        if exc.status >= 400:
            await record(request, *audited, exc.status, f"HTTP_{exc.status}", None)
        raise
    except Exception:
        await record(request, *audited, 500, "INTERNAL_ERROR", None)
        raise
    await record(request, *audited, response.status, None, response)
    return response
