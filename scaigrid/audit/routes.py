"""GET /v1/audit-log (a page at a time, newest first) and GET /v1/audit-log/export (every match, streamed as CSV, JSON
lines or a JSON array, oldest first): tenant admins read their tenant's entries, partner admins their partner's,
the platform everything."""

from collections.abc import AsyncIterator, Mapping
from typing import Any

from aiohttp import web
from sqlalchemy import Select, select

from scaigrid import errors
from scaigrid.access import requires
from scaigrid.appkeys import DB, PRINCIPAL
from scaigrid.auth.service_tokens import OPERATOR
from scaigrid.auth.tenancy import visible_to
from scaigrid.clock import iso
from scaigrid.db.tables import audit_log
from scaigrid.envelope import PAGE, download, listing
from scaigrid.errors import FieldError
from scaigrid.fields import query_time

PAGE_DEFAULT, PAGE_MAX = 100, 1000
EXPORT_BATCH = 1000  # entries written to the client at a time
COLUMN_FILTERS = ("action", "actor_id", "resource_type", "resource_id", "status")
FILTERS = ("start", "end", *COLUMN_FILTERS)
STATUSES = ("SUCCESS", "FAILURE")
FIELDS = ("id", "created_at", "request_id", "actor_type", "actor_id", "actor_email", "actor_partner_id",
          "actor_tenant_id", "api_key_id", "action", "resource_type", "resource_id", "partner_id", "tenant_id",
          "status", "http_status", "error_code", "method", "path", "ip", "user_agent", "before", "after")


def _query(request: web.Request) -> Select[Any]:
    """The caller's visible entries, narrowed by the filters."""
    query = visible_to(request[PRINCIPAL], select(audit_log), audit_log.c.tenant_id, audit_log.c.partner_id)
    params = request.query
    problems: list[FieldError] = []
    start, end = query_time(params, "start", problems), query_time(params, "end", problems)
    status = params.get("status")
    if status is not None and status.upper() not in STATUSES:
        problems.append(FieldError("status", "SUCCESS or FAILURE"))
    if problems:
        raise errors.validation_error(problems, "invalid query parameters")
    if start is not None:
        query = query.where(audit_log.c.created_at >= start)
    if end is not None:
        query = query.where(audit_log.c.created_at < end)
    for name in COLUMN_FILTERS:
        if name in params:
            value = params[name].upper() if name == "status" else params[name]
            query = query.where(audit_log.c[name] == value)
    return query


def _entry(row: Mapping[str, Any]) -> dict[str, Any]:
    entry = {name: row[name] for name in FIELDS}
    entry["created_at"] = entry["timestamp"] = iso(row["created_at"])
    return entry


@requires("admin:access", scopes=(OPERATOR,), query=(*FILTERS, *PAGE))
async def list_audit_log(request: web.Request) -> web.Response:
    """Newest first: ?start=&end= (ISO 8601), ?action=, ?actor_id=, ?resource_type=, ?resource_id=, ?status=,
    ?limit= (1-1000, default 100), ?cursor=."""
    return await listing(request, _query(request), audit_log.c.created_at, audit_log.c.id, _entry,
                         default_limit=PAGE_DEFAULT, max_limit=PAGE_MAX)


@requires("admin:access", scopes=(OPERATOR,), query=(*FILTERS, "format"))
async def export_audit_log(request: web.Request) -> web.StreamResponse:
    """Every visible entry under the same filters, oldest first, streamed: ?format=csv (default), ndjson or json."""
    query = _query(request).order_by(audit_log.c.created_at, audit_log.c.id)

    async def batches() -> AsyncIterator[list[dict[str, Any]]]:
        async with request.app[DB].connect() as conn:
            result = await conn.stream(query)  # a server-side cursor: the export is never held whole in memory
            async for rows in result.mappings().partitions(EXPORT_BATCH):
                yield [_entry(dict(row)) for row in rows]

    return await download(request, "audit-log", FIELDS, batches())


ROUTES: list[web.RouteDef] = [
    web.get("/v1/audit-log", list_audit_log),
    web.get("/v1/audit-log/export", export_audit_log, allow_head=False),  # a stream: no HEAD
]
