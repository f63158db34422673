"""Identity routes: the caller's own profile, API keys, tenancy administration (partners, tenants, users), the ScaiKey
webhook receiver.

Reach decides what a caller sees: another tenant's (partner's) records answer 404, never 403, so that their
existence is not revealed. Among what it reaches, a caller manages only what is no more powerful than itself.
"""

import logging
import re
from typing import Any

from aiohttp import web
from sqlalchemy import Row, RowMapping, select, update
from sqlalchemy.ext.asyncio import AsyncConnection

from scaigrid import errors
from scaigrid.access import requires
from scaigrid.appkeys import DB, MODULES, PRINCIPAL, REDIS
from scaigrid.auth import keys, scaikey_events, tenancy
from scaigrid.auth.authenticator import TOPIC_API_KEY, TOPIC_IDENTITY
from scaigrid.auth.principal import Principal
from scaigrid.auth.roles import AUTHENTICATED, PERMISSIONS, ROLES, grants_at_most
from scaigrid.auth.service_tokens import OPERATOR
from scaigrid.cache import announce
from scaigrid.clock import iso, utc_now
from scaigrid.db import in_transaction
from scaigrid.db.tables import api_keys, partners, tenants, users
from scaigrid.envelope import PAGE, listing, ok
from scaigrid.errors import FieldError
from scaigrid.fields import Fields

logger = logging.getLogger(__name__)

EMAIL = re.compile(r"[^@\s]+@[^@\s]+")
SLUG_HINT = "lower-case letters, digits and dashes, 1-64 characters, not starting or ending with a dash"
SETTABLE_STATUSES = ("active", "suspended")
USER_STATUSES = (*SETTABLE_STATUSES, "deleted")  # deleted: by DELETE /v1/users/{id} or ScaiKey; kept for usage ids


def _roles_within(principal: Principal) -> list[str]:
    return [role for role in ROLES if grants_at_most(role, principal.role)]


def _require_id(body: Fields, name: str, value: str | None, what: str) -> None:
    """A service caller has no user, tenant or partner of its own: it must name the one it means."""
    if not value and not body.problems:
        body.problems.append(FieldError(name, f"required: a service caller has no {what} of its own"))


def _require_platform_link(principal: Principal, scaikey_id: str | None) -> None:
    """Linking to ScaiKey is the platform's: a link made elsewhere could capture another tenant's sign-ins."""
    if scaikey_id is not None and principal.reach != "platform":
        raise errors.not_permitted("only a platform admin (or ScaiKey, by webhook) links records to ScaiKey")


# --- API keys ---

KEY_COLUMNS = (api_keys.c.id, api_keys.c.name, api_keys.c.key_prefix, api_keys.c.role, api_keys.c.user_id,
               api_keys.c.tenant_id, api_keys.c.expires_at, api_keys.c.revoked_at, api_keys.c.last_used_at,
               api_keys.c.created_at)


def _key_json(row: Any) -> dict[str, Any]:
    # assigned_user_id is the documented name; user_id the node's own, kept for its existing clients.
    return {"id": row["id"], "name": row["name"], "prefix": row["key_prefix"], "role": row["role"],
            "assigned_user_id": row["user_id"], "user_id": row["user_id"], "tenant_id": row["tenant_id"],
            "expires_at": iso(row["expires_at"]),
            "revoked_at": iso(row["revoked_at"]), "last_used_at": iso(row["last_used_at"]),
            "created_at": iso(row["created_at"])}


@requires("api_keys:manage", scopes=(OPERATOR,), query=(*PAGE, "user_id", "tenant_id"))
async def list_api_keys(request: web.Request) -> web.Response:
    """The caller's own keys; naming a user or tenant (?user_id=, ?tenant_id=) with users:manage, the keys of the
    tenants in reach whose role and user's role do not outrank the caller. Own by default, as the public API lists
    them: a script counting "my keys" must not count its tenant's."""
    principal = request[PRINCIPAL]
    query = select(*KEY_COLUMNS).select_from(api_keys.join(tenants, tenants.c.id == api_keys.c.tenant_id))
    others = "user_id" in request.query or "tenant_id" in request.query
    if others and principal.can("users:manage"):
        within = _roles_within(principal)
        holder = select(users.c.id).where(users.c.id == api_keys.c.user_id, users.c.role.in_(within))
        query = tenancy.visible_to(principal, query, api_keys.c.tenant_id, tenants.c.partner_id).where(
            (api_keys.c.role.in_(within) & holder.exists()) | (api_keys.c.user_id == principal.user_id))
    else:
        query = query.where(api_keys.c.user_id == principal.user_id)
    return await listing(request, query, api_keys.c.created_at, api_keys.c.id, _key_json,
                         filters=(api_keys.c.user_id, api_keys.c.tenant_id))


async def _user_in_reach(conn: AsyncConnection, principal: Principal, user_id: str) -> Row[Any]:
    row = (await conn.execute(
        select(users, tenants.c.partner_id).join(tenants, tenants.c.id == users.c.tenant_id)
        .where(users.c.id == user_id))).first()
    if row is None or not principal.reaches(row.tenant_id, row.partner_id):
        raise errors.not_found(f"no user {user_id!r}")
    return row


@requires("api_keys:manage", scopes=(OPERATOR,))
async def create_api_key(request: web.Request) -> web.Response:
    """Makes a key for the caller (or, with users:manage, for a user in reach); the key is in this answer only."""
    principal = request[PRINCIPAL]
    body = await Fields.of(request)
    name = body.string("name", required=True)
    role = body.string("role", choices=ROLES)
    expires_at = body.timestamp("expires_at", future=True)
    assigned = body.string("assigned_user_id", max_length=40)
    alias = body.string("user_id", max_length=40)  # the node's older name for assigned_user_id
    if assigned and alias and assigned != alias:
        body.fail("user_id", "differs from assigned_user_id, which it is another name for: give one")
    user_field = "user_id" if alias and not assigned else "assigned_user_id"
    user_id = assigned or alias or principal.user_id
    _require_id(body, user_field, user_id, "user")
    body.done()
    assert name is not None and user_id is not None
    async def create(conn: AsyncConnection) -> tuple[str, str, RowMapping]:
        user = await _user_in_reach(conn, principal, user_id)
        if user_id != principal.user_id:
            if not principal.can("users:manage"):
                raise errors.permission_denied("users:manage")
            # Else a key bound to a stronger user would pass the "own key" rule for that user's keys.
            tenancy.require_rank(principal, user.role)
        key_role = role or (principal.role if user_id == principal.user_id else user.role)
        if not grants_at_most(key_role, principal.role):
            raise errors.not_permitted(f"a key's role may not exceed your own ({principal.role}); {key_role} does")
        if not grants_at_most(key_role, user.role):
            raise errors.validation_error([FieldError("role", f"exceeds the user's role ({user.role})")])
        if user.status != "active":
            raise errors.validation_error([FieldError(user_field, f"the user is {user.status}")])
        key_id, key = await keys.create_api_key(conn, tenant_id=user.tenant_id, user_id=user_id, name=name,
                                                role=key_role, expires_at=expires_at)
        return key_id, key, (await conn.execute(select(*KEY_COLUMNS).where(api_keys.c.id == key_id))).mappings().one()

    key_id, key, row = await in_transaction(request.app[DB], create)
    logger.info("API key %s created", key_id, extra={"event": "api_key_created", "key_id": key_id})
    return ok({**_key_json(row), "key": key}, status=201)


@requires("api_keys:manage", scopes=(OPERATOR,))
async def revoke_api_key(request: web.Request) -> web.Response:
    """Revokes at once, on every http process (announced on the invalidation bus)."""
    principal = request[PRINCIPAL]
    key_id = request.match_info["id"]
    async with request.app[DB].begin() as conn:
        row = (await conn.execute(
            select(*KEY_COLUMNS, api_keys.c.key_hash, tenants.c.partner_id, users.c.role.label("user_role"))
            .join(tenants, tenants.c.id == api_keys.c.tenant_id).join(users, users.c.id == api_keys.c.user_id)
            .where(api_keys.c.id == key_id).with_for_update())).mappings().first()
        own = row is not None and row["user_id"] == principal.user_id
        if row is None or not (own or (principal.can("users:manage")
                                       and principal.reaches(row["tenant_id"], row["partner_id"]))):
            raise errors.not_found(f"no API key {key_id!r}")
        if not own:
            tenancy.require_rank(principal, row["user_role"], "this key's user's role")
            tenancy.require_rank(principal, row["role"], "this key's role")
        revoked_at = row["revoked_at"] or utc_now()
        await conn.execute(update(api_keys).where(api_keys.c.id == key_id).values(revoked_at=revoked_at))
    await announce(request.app[REDIS], TOPIC_API_KEY, row["key_hash"])
    logger.info("API key %s revoked", key_id, extra={"event": "api_key_revoked", "key_id": key_id})
    return ok(_key_json({**row, "revoked_at": revoked_at}))


# --- the caller ---

def _named(row: Any, prefix: str) -> dict[str, Any]:
    return {"id": row[f"{prefix}_id"], "slug": row[f"{prefix}_slug"], "name": row[f"{prefix}_name"]}


@requires(AUTHENTICATED, scopes=(OPERATOR,))
async def me(request: web.Request) -> web.Response:
    """Who the credential is (SDKs call this to check a key): the user, tenant and partner, the role it acts with and
    what that permits, the key it used; a service token has no user, tenant or key, only its name and scope."""
    principal = request[PRINCIPAL]
    declared = (*PERMISSIONS, *(key for module in request.app[MODULES] for key in module.permission_keys))
    profile: dict[str, Any] = {
        "id": None, "email": None, "display_name": None, "status": "active", "role": principal.role,
        "reach": principal.reach, "permissions": sorted({p for p in declared if principal.can(p)}),
        "tenant_id": None, "scaikey_id": None, "created_at": None, "tenant": None, "partner": None,
        "auth_type": principal.kind, "api_key": None, "service": None}
    if principal.user_id is None:
        profile["service"] = {"name": principal.name, "scope": principal.scope}
        return ok(profile)
    async with request.app[DB].connect() as conn:
        row = (await conn.execute(
            select(*USER_COLUMNS, tenants.c.slug.label("tenant_slug"), tenants.c.name.label("tenant_name"),
                   partners.c.id.label("partner_id"), partners.c.slug.label("partner_slug"),
                   partners.c.name.label("partner_name"))
            .select_from(users.join(tenants, tenants.c.id == users.c.tenant_id)
                         .join(partners, partners.c.id == tenants.c.partner_id))
            .where(users.c.id == principal.user_id))).mappings().first()
        if row is None:  # a mirrored user a config snapshot removed a moment ago
            raise errors.auth_token_invalid("this credential's user no longer exists")
        key = None if principal.api_key_id is None else (await conn.execute(
            select(*KEY_COLUMNS).where(api_keys.c.id == principal.api_key_id))).mappings().first()
    # The role is the credential's (a key's may be below its user's): the one its permissions come from.
    profile.update({**_user_json(row), "role": principal.role, "tenant": _named(row, "tenant"),
                    "partner": _named(row, "partner"), "api_key": None if key is None else _key_json(key)})
    return ok(profile)


# --- partners ---

def _partner_json(row: Any) -> dict[str, Any]:
    return {"id": row["id"], "slug": row["slug"], "name": row["name"], "status": row["status"],
            "scaikey_id": row["scaikey_id"], "created_at": iso(row["created_at"])}


PARTNER_COLUMNS = (partners.c.id, partners.c.slug, partners.c.name, partners.c.status, partners.c.scaikey_id,
                   partners.c.created_at)


@requires("admin:access", scopes=(OPERATOR,), query=PAGE)
async def list_partners(request: web.Request) -> web.Response:
    """Every partner for the platform; a partner admin sees its own."""
    principal = request[PRINCIPAL]
    if principal.reach == "tenant":
        raise errors.not_permitted("partners are administered with partner or platform reach")
    query = select(*PARTNER_COLUMNS)
    if principal.reach == "partner":
        query = query.where(partners.c.id == principal.partner_id)
    return await listing(request, query, partners.c.created_at, partners.c.id, _partner_json)


@requires("admin:access", scopes=(OPERATOR,))
async def create_partner(request: web.Request) -> web.Response:
    principal = request[PRINCIPAL]
    if principal.reach != "platform":
        raise errors.not_permitted("only a platform admin creates partners")
    body = await Fields.of(request)
    slug = body.string("slug", required=True, max_length=tenancy.SLUG_MAX, pattern=tenancy.SLUG_PATTERN,
                       hint=SLUG_HINT)
    name = body.string("name", required=True)
    scaikey_id = body.string("scaikey_id", max_length=64)
    body.done()
    assert slug is not None and name is not None
    async with request.app[DB].begin() as conn:
        partner_id = await tenancy.create_partner(conn, slug=slug, name=name, scaikey_id=scaikey_id)
        row = (await conn.execute(select(*PARTNER_COLUMNS).where(partners.c.id == partner_id))).mappings().one()
    return ok(_partner_json(row), status=201)


# --- tenants ---

TENANT_COLUMNS = (tenants.c.id, tenants.c.partner_id, tenants.c.slug, tenants.c.name, tenants.c.status,
                  tenants.c.scaikey_id, tenants.c.created_at)


def _tenant_json(row: Any) -> dict[str, Any]:
    return {"id": row["id"], "partner_id": row["partner_id"], "slug": row["slug"], "name": row["name"],
            "status": row["status"], "scaikey_id": row["scaikey_id"], "created_at": iso(row["created_at"])}


async def _tenant_in_reach(conn: AsyncConnection, principal: Principal, tenant_id: str) -> dict[str, Any]:
    row = (await conn.execute(select(*TENANT_COLUMNS).where(tenants.c.id == tenant_id))).mappings().first()
    if row is None or not principal.reaches(row["id"], row["partner_id"]):
        raise errors.not_found(f"no tenant {tenant_id!r}")
    return dict(row)


@requires("admin:access", scopes=(OPERATOR,), query=(*PAGE, "partner_id"))
async def list_tenants(request: web.Request) -> web.Response:
    """The tenants in the caller's reach (a tenant admin: its own)."""
    query = tenancy.visible_to(request[PRINCIPAL], select(*TENANT_COLUMNS), tenants.c.id, tenants.c.partner_id)
    return await listing(request, query, tenants.c.created_at, tenants.c.id, _tenant_json,
                         filters=(tenants.c.partner_id,))


@requires("admin:access", scopes=(OPERATOR,))
async def create_tenant(request: web.Request) -> web.Response:
    """A partner admin creates tenants of its partner; the platform names any partner."""
    principal = request[PRINCIPAL]
    if principal.reach == "tenant":
        raise errors.not_permitted("tenants are created with partner or platform reach")
    body = await Fields.of(request)
    slug = body.string("slug", required=True, max_length=tenancy.SLUG_MAX, pattern=tenancy.SLUG_PATTERN,
                       hint=SLUG_HINT)
    name = body.string("name", required=True)
    partner_id = body.string("partner_id", max_length=40) or principal.partner_id
    scaikey_id = body.string("scaikey_id", max_length=64)
    _require_id(body, "partner_id", partner_id, "partner")
    body.done()
    assert slug is not None and name is not None
    _require_platform_link(principal, scaikey_id)
    async with request.app[DB].begin() as conn:
        exists = await conn.scalar(select(partners.c.id).where(partners.c.id == partner_id))
        if exists is None or (principal.reach == "partner" and partner_id != principal.partner_id):
            raise errors.not_found(f"no partner {partner_id!r}")
        tenant_id = await tenancy.create_tenant(conn, partner_id=partner_id, slug=slug, name=name,
                                                scaikey_id=scaikey_id)
        row = await _tenant_in_reach(conn, principal, tenant_id)
    return ok(_tenant_json(row), status=201)


@requires("admin:access", scopes=(OPERATOR,))
async def get_tenant(request: web.Request) -> web.Response:
    async with request.app[DB].connect() as conn:
        row = await _tenant_in_reach(conn, request[PRINCIPAL], request.match_info["id"])
    return ok(_tenant_json(row))


@requires("admin:access", scopes=(OPERATOR,))
async def update_tenant(request: web.Request) -> web.Response:
    """Renames, suspends or reactivates a tenant; a suspension stops its keys and tokens on every process."""
    principal = request[PRINCIPAL]
    body = await Fields.of(request)
    name = body.string("name")
    status = body.string("status", choices=SETTABLE_STATUSES)
    body.done()
    async with request.app[DB].begin() as conn:
        row = await _tenant_in_reach(conn, principal, request.match_info["id"])
        tenancy.require_above(principal, "tenant")
        changes = {k: v for k, v in (("name", name), ("status", status)) if v is not None}
        if changes:
            await conn.execute(update(tenants).where(tenants.c.id == row["id"]).values(**changes))
    if status is not None and status != row["status"]:
        await announce(request.app[REDIS], TOPIC_IDENTITY)
        logger.info("tenant %s is now %s", row["id"], status, extra={"event": "tenant_status", "status": status})
    return ok(_tenant_json({**row, **changes}))


# --- users ---

USER_COLUMNS = (users.c.id, users.c.tenant_id, users.c.email, users.c.display_name, users.c.role, users.c.status,
                users.c.scaikey_id, users.c.created_at)


def _user_json(row: Any) -> dict[str, Any]:
    return {"id": row["id"], "tenant_id": row["tenant_id"], "email": row["email"],
            "display_name": row["display_name"], "role": row["role"], "status": row["status"],
            "scaikey_id": row["scaikey_id"], "created_at": iso(row["created_at"])}


@requires("users:manage", scopes=(OPERATOR,), query=(*PAGE, "tenant_id", "status"))
async def list_users(request: web.Request) -> web.Response:
    """The users of the tenants in reach; ?status= one of USER_STATUSES, by default all but the deleted."""
    status = request.query.get("status")
    if status is not None and status not in USER_STATUSES:
        raise errors.validation_error([FieldError("status", "one of: " + ", ".join(USER_STATUSES))],
                                      "invalid query parameters")
    query = tenancy.visible_to(
        request[PRINCIPAL], select(*USER_COLUMNS).join(tenants, tenants.c.id == users.c.tenant_id),
        users.c.tenant_id, tenants.c.partner_id)
    query = query.where(users.c.status != "deleted") if status is None else query
    return await listing(request, query, users.c.created_at, users.c.id, _user_json,
                         filters=(users.c.tenant_id, users.c.status))


@requires("users:manage", scopes=(OPERATOR,))
async def get_user(request: web.Request) -> web.Response:
    async with request.app[DB].connect() as conn:
        user = await _user_in_reach(conn, request[PRINCIPAL], request.match_info["id"])
    return ok(_user_json(user._mapping))


@requires("users:manage", scopes=(OPERATOR,))
async def create_user(request: web.Request) -> web.Response:
    """A local user (ScaiKey users arrive by webhook or on first sign-in); role at most the caller's."""
    principal = request[PRINCIPAL]
    body = await Fields.of(request)
    email = body.string("email", required=True, max_length=320, pattern=EMAIL, hint="an email address")
    role = body.string("role", choices=ROLES) or "tenant_user"
    display_name = body.string("display_name")
    tenant_id = body.string("tenant_id", max_length=40) or principal.tenant_id
    scaikey_id = body.string("scaikey_id", max_length=64)
    _require_id(body, "tenant_id", tenant_id, "tenant")
    body.done()
    assert email is not None
    _require_platform_link(principal, scaikey_id)
    tenancy.require_rank(principal, role, "the role given")
    async with request.app[DB].begin() as conn:
        await _tenant_in_reach(conn, principal, tenant_id)
        user_id = await tenancy.create_user(conn, tenant_id=tenant_id, email=email, role=role,
                                            display_name=display_name, scaikey_id=scaikey_id)
        row = (await conn.execute(select(*USER_COLUMNS).where(users.c.id == user_id))).mappings().one()
    return ok(_user_json(row), status=201)


@requires("users:manage", scopes=(OPERATOR,))
async def update_user(request: web.Request) -> web.Response:
    """Changes a user's role, status or name; takes effect on every process at once."""
    principal = request[PRINCIPAL]
    body = await Fields.of(request)
    role = body.string("role", choices=ROLES)
    status = body.string("status", choices=SETTABLE_STATUSES)
    display_name = body.string("display_name")
    body.done()
    user_id = request.match_info["id"]
    async with request.app[DB].begin() as conn:
        user = await _user_in_reach(conn, principal, user_id)
        tenancy.require_rank(principal, user.role)
        if role is not None:
            tenancy.require_rank(principal, role, "the role given")
        changes = {k: v for k, v in (("role", role), ("status", status), ("display_name", display_name))
                   if v is not None}
        if changes:
            await conn.execute(update(users).where(users.c.id == user_id).values(**changes))
    if role is not None or status is not None:
        await announce(request.app[REDIS], TOPIC_IDENTITY)
    return ok(_user_json({**user._mapping, **changes}))


@requires("users:manage", scopes=(OPERATOR,))
async def delete_user(request: web.Request) -> web.Response:
    """Soft: the user is kept, with the status deleted (usage records keep naming it), and every key of theirs is
    revoked at once on every process. Deleting again is harmless."""
    principal = request[PRINCIPAL]
    user_id = request.match_info["id"]
    async with request.app[DB].begin() as conn:
        user = await _user_in_reach(conn, principal, user_id)
        tenancy.require_rank(principal, user.role)
        await conn.execute(update(users).where(users.c.id == user_id).values(status="deleted"))
        revoked = (await conn.execute(update(api_keys).where(
            api_keys.c.user_id == user_id, api_keys.c.revoked_at.is_(None)).values(revoked_at=utc_now()))).rowcount
    await announce(request.app[REDIS], TOPIC_IDENTITY)  # forgets every cached key and user, so none of theirs works
    logger.info("user %s deleted, %d keys revoked", user_id, revoked,
                extra={"event": "user_deleted", "user_id": user_id, "keys_revoked": revoked})
    return ok(_user_json({**user._mapping, "status": "deleted"}))


ROUTES: list[web.RouteDef] = [
    web.get("/v1/me", me),
    web.get("/v1/auth/me", me),
    web.get("/v1/api-keys", list_api_keys),
    web.post("/v1/api-keys", create_api_key),
    web.delete("/v1/api-keys/{id}", revoke_api_key),
    web.get("/v1/partners", list_partners),
    web.post("/v1/partners", create_partner),
    web.get("/v1/tenants", list_tenants),
    web.post("/v1/tenants", create_tenant),
    web.get("/v1/tenants/{id}", get_tenant),
    web.patch("/v1/tenants/{id}", update_tenant),
    web.get("/v1/users", list_users),
    web.post("/v1/users", create_user),
    web.get("/v1/users/{id}", get_user),
    web.patch("/v1/users/{id}", update_user),
    web.delete("/v1/users/{id}", delete_user),
    web.post("/v1/webhooks/scaikey", scaikey_events.receive),
]
