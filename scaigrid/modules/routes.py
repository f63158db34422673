"""Modules admin: GET /v1/modules[/{module_id}] and POST /v1/modules/{module_id}/enable|disable (per tenant or
per partner; a partner's switch wins). A module switched off answers MODULE_NOT_ENABLED on its routes (the gateway
asks `ModuleGate.require`); its data is kept, and switching it back on restores it."""

import contextlib
from typing import Any

from aiohttp import web
from sqlalchemy import and_, or_, select
from sqlalchemy.dialects.mysql import insert
from sqlalchemy.ext.asyncio import AsyncConnection

from scaigrid import errors
from scaigrid.access import requires
from scaigrid.appkeys import AUDIT_BEFORE, DB, MODULE_GATE, MODULES, PRINCIPAL, REDIS, SCHEMA_HEADS
from scaigrid.auth.principal import Principal
from scaigrid.auth.service_tokens import OPERATOR
from scaigrid.auth.tenancy import target_tenant
from scaigrid.cache import announce
from scaigrid.clock import utc_now
from scaigrid.db import migrations
from scaigrid.db.tables import module_switches, partners
from scaigrid.envelope import ok
from scaigrid.fields import Fields, load_object
from scaigrid.modules import Module, known_modules
from scaigrid.modules.gate import SCOPES, TOPIC_MODULES, Switches

# The routes of this file share /v1/modules/{module_id}/ with the modules' own: mount_module refuses a module route
# that would shadow one of them.
RESERVED_PATHS = ("", "/", "/enable", "/disable")


def _item(module: Module, *, enabled_on_node: bool, schema_ok: bool, disabled_by: str | None,
          tenant_id: str | None) -> dict[str, Any]:
    if not enabled_on_node:
        status = "available"  # built in, but SCAIGRID_MODULES leaves it out: only the operator can add it
    elif not schema_ok:
        status = "error"  # its migrations did not reach head (`scaigrid migrate` says why)
    else:
        status = "disabled" if disabled_by else "active"
    return {"id": module.id, "module_id": module.id, "display_name": module.display_name or module.id,
            "version": module.version, "description": module.description, "status": status,
            "disabled_by": disabled_by, "tenant_id": tenant_id,
            "permissions": [{"key": p.key, "display_name": p.display_name or p.key, "description": p.description}
                            for p in module.permissions],
            "dependencies": list(module.dependencies)}


async def _schema_behind(request: web.Request) -> set[str]:
    """Ids of enabled modules whose schema is not at head (none when the database cannot say)."""
    modules, heads = request.app[MODULES], request.app[SCHEMA_HEADS]
    with contextlib.suppress(Exception):  # readiness reports the database itself; here "not known" is "not behind"
        revisions = await migrations.stream_revisions(request.app[DB], modules)
        return {m.id for m in modules if m.id in revisions and (revisions[m.id],) != heads[m.id]}
    return set()


async def _viewpoint(request: web.Request, principal: Principal) -> tuple[str | None, str | None]:
    """The tenant (and its partner) whose view is shown: ?tenant_id= in reach, else the caller's own (none for a
    service)."""
    wanted = request.query.get("tenant_id")
    if wanted is None and not principal.tenant_id:
        return None, None
    async with request.app[DB].connect() as conn:
        return await target_tenant(conn, principal, wanted)


def _find(request: web.Request, module_id: str) -> tuple[Module, bool]:
    """The module and whether this node enables it; 404 for a module the node does not know."""
    enabled = request.app[MODULES]
    for module in known_modules(enabled):
        if module.id == module_id:
            return module, module in enabled
    raise errors.not_found(f"no module {module_id!r}")


@requires("modules:use", scopes=(OPERATOR,), query=("tenant_id",))
async def list_modules(request: web.Request) -> web.Response:
    """Every module this node knows, with its status as the caller's tenant (or ?tenant_id=) sees it."""
    tenant_id, partner_id = await _viewpoint(request, request[PRINCIPAL])
    switches, behind = await request.app[MODULE_GATE].switches(), await _schema_behind(request)
    enabled = request.app[MODULES]
    items = [_item(m, enabled_on_node=m in enabled, schema_ok=m.id not in behind, tenant_id=tenant_id,
                   disabled_by=switches.disabled_by(m.id, tenant_id, partner_id)) for m in known_modules(enabled)]
    return ok({"items": items, "pagination": {"has_more": False, "next_cursor": None}})


@requires("modules:use", scopes=(OPERATOR,), query=("tenant_id",))
async def get_module(request: web.Request) -> web.Response:
    module, on_node = _find(request, request.match_info["module_id"])
    tenant_id, partner_id = await _viewpoint(request, request[PRINCIPAL])
    switches: Switches = await request.app[MODULE_GATE].switches()
    return ok(_item(module, enabled_on_node=on_node, schema_ok=module.id not in await _schema_behind(request),
                    disabled_by=switches.disabled_by(module.id, tenant_id, partner_id), tenant_id=tenant_id))


async def _disabled_by(conn: AsyncConnection, module_id: str, tenant_id: str | None, partner_id: str) -> str | None:
    """As Switches.disabled_by, read from the database inside the change's transaction (the cache may lag)."""
    rows = (await conn.execute(select(module_switches.c.scope).where(
        module_switches.c.module_id == module_id, module_switches.c.enabled.is_(False),
        or_(and_(module_switches.c.scope == "partner", module_switches.c.scope_id == partner_id),
            and_(module_switches.c.scope == "tenant", module_switches.c.scope_id == (tenant_id or "")))))).scalars()
    scopes = set(rows)
    return "partner" if "partner" in scopes else "tenant" if "tenant" in scopes else None


async def _switch(request: web.Request, enabled: bool) -> web.Response:
    """Body (optional): {"scope": "tenant" (default) | "partner", "tenant_id"?, "partner_id"?}; the caller's own
    tenant or partner by default. A tenant's switch is its admins' (tenant_admin and above, in reach); a partner's
    needs partner reach or more."""
    principal = request[PRINCIPAL]
    module, on_node = _find(request, request.match_info["module_id"])
    raw = await request.read()
    body = Fields(load_object(raw) if raw.strip() else {})
    scope = body.string("scope", choices=SCOPES) or "tenant"
    wanted_tenant = body.string("tenant_id", max_length=40)
    wanted_partner = body.string("partner_id", max_length=40)
    if scope == "tenant" and wanted_partner is not None:
        body.fail("partner_id", "only with scope partner")
    if scope == "partner" and wanted_tenant is not None:
        body.fail("tenant_id", "only with scope tenant")
    body.done()
    if not on_node:
        raise errors.module_not_available(module.id)
    async with request.app[DB].begin() as conn:
        if scope == "tenant":
            tenant_id, partner_id = await target_tenant(conn, principal, wanted_tenant)
            scope_id: str = tenant_id
        else:
            if principal.reach == "tenant":
                raise errors.not_permitted("a partner's modules are switched with partner or platform reach")
            partner_id = wanted_partner or principal.partner_id
            exists = await conn.scalar(select(partners.c.id).where(partners.c.id == partner_id))
            if exists is None or (principal.reach == "partner" and partner_id != principal.partner_id):
                raise errors.not_found(f"no partner {partner_id!r}")
            tenant_id, scope_id = None, partner_id
        before = await _disabled_by(conn, module.id, tenant_id, partner_id)
        statement = insert(module_switches).values(
            module_id=module.id, scope=scope, scope_id=scope_id, enabled=enabled, updated_at=utc_now(),
            updated_by=(principal.user_id or principal.name)[:64])
        await conn.execute(statement.on_duplicate_key_update(
            enabled=statement.inserted.enabled, updated_at=statement.inserted.updated_at,
            updated_by=statement.inserted.updated_by))
        after = await _disabled_by(conn, module.id, tenant_id, partner_id)
    await announce(request.app[REDIS], TOPIC_MODULES, module.id)

    def shown(disabled_by: str | None) -> dict[str, Any]:
        return {**_item(module, enabled_on_node=True, schema_ok=True, disabled_by=disabled_by, tenant_id=tenant_id),
                "scope": scope, "scope_id": scope_id}

    request[AUDIT_BEFORE] = shown(before)
    return ok(shown(after))


@requires("modules:manage", scopes=(OPERATOR,))
async def enable_module(request: web.Request) -> web.Response:
    return await _switch(request, True)


@requires("modules:manage", scopes=(OPERATOR,))
async def disable_module(request: web.Request) -> web.Response:
    return await _switch(request, False)


ROUTES: list[web.RouteDef] = [
    web.get("/v1/modules", list_modules),
    web.get("/v1/modules/{module_id}", get_module),
    web.post("/v1/modules/{module_id}/enable", enable_module),
    web.post("/v1/modules/{module_id}/disable", disable_module),
]
