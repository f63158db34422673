"""The catalogue's write path: backends, models and routes, read by `routing.schema` and written here, for the /v1/
API and `admin apply` alike.

The `upsert_*`/`delete_*` functions check what needs the database (tenants, backends a route names, who may see
what) inside the caller's transaction, and write only what changed. `actor` is the API caller, or None for the
node's operator at the command line (who may do anything).

Names (a backend's id, a model's slug) are unique per owner: a tenant, or the platform. A name given in a path
resolves as a tenant sees it, its own object first, then the platform's: the caller's tenant, or the tenant named by
`?tenant=<slug>` (one the caller reaches). What the caller cannot see answers exactly as what does not exist.
"""

from collections.abc import Mapping, Sequence
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from sqlalchemy import ColumnElement, Row, Select, delete, insert, or_, select, true, update
from sqlalchemy.ext.asyncio import AsyncConnection

from scaigrid import errors, netguard
from scaigrid.auth.principal import Principal
from scaigrid.crypto import UndecryptableCredential, decrypt, encrypt
from scaigrid.db.tables import backends, hybrid_node_tenants, hybrid_nodes, model_routes, models, new_id, tenants
from scaigrid.errors import FieldError
from scaigrid.fields import decimal_text
from scaigrid.routing.catalogue import BACKEND_ID, HYBRID, backend_key, backend_name
from scaigrid.routing.schema import (
    PRICE_ALIASES,
    UNIT_PRICES,
    BackendSpec,
    ModelSpec,
    RouteSpec,
    parse_backend,
    parse_model,
    parse_routes,
)
from scaigrid.settings import Settings

Actor = Principal | None


async def _check_target(settings: Settings, spec: BackendSpec) -> None:
    """A tenant's backend must be on a global address (scaigrid.netguard) unless the operator allows otherwise."""
    if spec.tenant is None or not spec.base_url or settings.dispatch.allow_private_targets:
        return  # shared backends are the platform's own: an on-prem vLLM on 10.x is normal
    host = urlsplit(spec.base_url).hostname or ""
    problem = await netguard.host_refusal(host)
    if problem is not None:
        raise errors.validation_error([FieldError("base_url", (
            f"{problem}; a tenant's backend must be on a public address (the operator may allow private ones with "
            "BACKEND_ALLOW_PRIVATE_TARGETS=true, or make it a shared backend)"))])


# --- who may see and change what ---


def _reaches(actor: Actor, tenant_id: str | None, partner_id: str | None) -> bool:
    return actor is None or actor.reaches(tenant_id, partner_id)


def _may_read(actor: Actor, tenant_id: str | None, partner_id: str | None) -> bool:
    """Shared objects are visible to every caller allowed to look at all; tenant objects to those reaching it."""
    return tenant_id is None or _reaches(actor, tenant_id, partner_id)


def _visible_to(actor: Actor, tenant_column: ColumnElement[Any]) -> ColumnElement[bool]:
    """SQL form of `_may_read` for a query joined with tenants."""
    if actor is None or actor.reach == "platform":
        return true()
    if actor.reach == "partner":
        return or_(tenant_column.is_(None), tenants.c.partner_id == actor.partner_id)
    return or_(tenant_column.is_(None), tenant_column == actor.tenant_id)


def _owned_by(tenant_column: ColumnElement[Any], tenant_id: str | None) -> ColumnElement[bool]:
    return tenant_column.is_(None) if tenant_id is None else tenant_column == tenant_id


async def _viewer(conn: AsyncConnection, actor: Actor, tenant: str | None, missing: errors.ScaigridError
                  ) -> str | None:
    """The tenant whose view a name in a path resolves in: `tenant` (a slug the actor reaches), else the actor's."""
    if tenant is None:
        return (actor.tenant_id or None) if actor is not None else None
    row = (await conn.execute(select(tenants.c.id, tenants.c.partner_id).where(tenants.c.slug == tenant))).first()
    if row is None or not _reaches(actor, row.id, row.partner_id):
        raise missing
    return str(row.id)


async def _tenant(conn: AsyncConnection, actor: Actor, slug: str | None) -> str | None:
    """The id of the tenant an object is written for; only the platform writes shared (tenant-less) objects."""
    if slug is None:
        if not _reaches(actor, None, None):
            raise errors.not_permitted(
                "shared objects (no tenant) are managed by a super_admin; name a tenant of your partner in `tenant`")
        return None
    row = (await conn.execute(select(tenants.c.id, tenants.c.partner_id).where(tenants.c.slug == slug))).first()
    if row is None or not _reaches(actor, row.id, row.partner_id):
        raise errors.validation_error([FieldError("tenant", f"no tenant {slug!r} that you manage")])
    return str(row.id)


# --- backends ---

def _backend_query() -> Select[Any]:
    return select(backends, tenants.c.slug.label("tenant_slug"), tenants.c.partner_id).select_from(
        backends.outerjoin(tenants, backends.c.tenant_id == tenants.c.id))


async def _backend(conn: AsyncConnection, actor: Actor, name: str, tenant: str | None = None) -> Row[Any]:
    """The backend `name` as the viewing tenant sees it (its own, else the platform's), if the actor may see it;
    else BACKEND_NOT_FOUND (whether it exists elsewhere is not told)."""
    missing = errors.backend_not_found(name)
    if not BACKEND_ID.fullmatch(name):  # a key ("name@tenant") is not a name
        raise missing
    viewer = await _viewer(conn, actor, tenant, missing)
    keys = [backend_key(name, viewer), name] if viewer else [name]
    found = {row.id: row for row in await conn.execute(_backend_query().where(backends.c.id.in_(keys)))}
    row = next((found[key] for key in keys if key in found), None)
    if row is None or not _may_read(actor, row.tenant_id, row.partner_id):
        raise missing
    return row


async def _writable_backend(conn: AsyncConnection, actor: Actor, name: str, tenant: str | None) -> Row[Any]:
    row = await _backend(conn, actor, name, tenant)
    if not _reaches(actor, row.tenant_id, row.partner_id):
        raise errors.not_permitted(f"backend {name!r} is shared; only a super_admin changes it")
    return row


async def backend_key_for(conn: AsyncConnection, actor: Actor, name: str, tenant: str | None) -> str:
    """The key of the backend a caller names in a path (see `_backend`)."""
    return str((await _backend(conn, actor, name, tenant)).id)


def _shown_url(row: Mapping[str, Any], actor: Actor) -> str | None:
    """A shared backend's URL is the platform's business (it names its network); any user:password@ stays hidden."""
    if not row["base_url"] or (row["tenant_id"] is None and not (actor is None or actor.reach == "platform")):
        return None
    parts = urlsplit(row["base_url"])
    if parts.username is None and parts.password is None:  # stored before credentials were refused
        return str(row["base_url"])
    return str(urlunsplit(parts._replace(netloc="***@" + parts.netloc.rpartition("@")[2])))


def backend_view(row: Mapping[str, Any], actor: Actor) -> dict[str, Any]:
    """A backend as the API shows it (a row of `visible_backends`): its name as `id`; never the API key, only
    whether there is one."""
    return {
        "id": backend_name(row["id"]), "provider": row["provider"], "base_url": _shown_url(row, actor),
        "model": row["model"], "has_api_key": row["api_key_encrypted"] is not None, "api_key_env": row["api_key_env"],
        "cost_input_per_mtok": decimal_text(row["cost_input_per_mtok"]),
        "cost_output_per_mtok": decimal_text(row["cost_output_per_mtok"]),
        "timeout_s": row["timeout_s"], "tenant": row["tenant_slug"], "status": row["status"],
        "deployment": row["deployment"], "api_version": row["api_version"],
    }


async def get_backend(conn: AsyncConnection, actor: Actor, name: str, tenant: str | None = None) -> dict[str, Any]:
    return backend_view(dict((await _backend(conn, actor, name, tenant))._mapping), actor)


async def _backend_view_of(conn: AsyncConnection, actor: Actor, key: str) -> dict[str, Any]:
    return backend_view(dict((await conn.execute(_backend_query().where(backends.c.id == key))).one()._mapping), actor)


def visible_backends(actor: Actor) -> Select[Any]:
    """The backends the actor may see (shared ones and those of tenants in reach), for a paged listing."""
    return _backend_query().where(_visible_to(actor, backends.c.tenant_id))


def _stored_key(settings: Settings, existing: Row[Any] | None, api_key: str | None) -> str | None:
    """The Fernet token to store; the old token when the key is unchanged, so an unchanged item writes nothing."""
    if api_key is None:
        return None
    if existing is not None and existing.api_key_encrypted is not None:
        try:
            if decrypt(settings, existing.api_key_encrypted) == api_key:
                return str(existing.api_key_encrypted)
        except UndecryptableCredential:
            pass  # stored under an older key: the new one replaces it
    return encrypt(settings, api_key)


async def _routed_by(conn: AsyncConnection, key: str) -> list[str]:
    query = (select(models.c.slug).select_from(model_routes.join(models, model_routes.c.model_id == models.c.id))
             .where(model_routes.c.backend_id == key).order_by(models.c.slug))
    return list((await conn.scalars(query)).all())


async def _check_linked_node(conn: AsyncConnection, model: str, tenant_id: str | None) -> None:
    """An active hybrid backend names an enrolled node that serves its owner: a tenant's backend needs that tenant
    allowed on the node (PUT /v1/hybrid/nodes/{id}/tenants); a shared one is the platform's (`_tenant` checked)."""
    node_id = model.partition("/")[0]
    query = select(hybrid_nodes.c.id).where(hybrid_nodes.c.id == node_id, hybrid_nodes.c.revoked_at.is_(None))
    if tenant_id is not None:
        query = query.join(hybrid_node_tenants, hybrid_node_tenants.c.node_id == hybrid_nodes.c.id).where(
            hybrid_node_tenants.c.tenant_id == tenant_id)
    if await conn.scalar(query) is None:
        # One answer for "no such node" and "not yours": a tenant's admin learns nothing of other nodes.
        raise errors.validation_error([FieldError("model", f"no enrolled hybrid node {node_id!r} serves "
                                                           f"{'this tenant' if tenant_id else 'the platform'}")])


async def upsert_backend(conn: AsyncConnection, settings: Settings, actor: Actor, spec: BackendSpec) -> str:
    """Creates or updates the backend `spec.id` of `spec.tenant`; returns "created", "updated" or "unchanged"."""
    tenant_id = await _tenant(conn, actor, spec.tenant)
    if spec.provider == HYBRID and spec.status == "active":
        await _check_linked_node(conn, spec.model, tenant_id)
    await _check_target(settings, spec)
    key = backend_key(spec.id, tenant_id)
    existing = (await conn.execute(_backend_query().where(backends.c.id == key))).first()
    values = {
        "tenant_id": tenant_id, "provider": spec.provider, "base_url": spec.base_url, "model": spec.model,
        "api_key_encrypted": _stored_key(settings, existing, spec.api_key), "api_key_env": spec.api_key_env,
        "cost_input_per_mtok": spec.cost_input_per_mtok, "cost_output_per_mtok": spec.cost_output_per_mtok,
        "timeout_s": spec.timeout_s, "status": spec.status, "deployment": spec.deployment,
        "api_version": spec.api_version,
    }
    if existing is None:
        await conn.execute(insert(backends).values(id=key, **values))
        return "created"
    if all(getattr(existing, name) == value for name, value in values.items()):
        return "unchanged"
    await conn.execute(update(backends).where(backends.c.id == key).values(**values))
    return "updated"


async def create_backend(conn: AsyncConnection, settings: Settings, actor: Actor, body: Any) -> dict[str, Any]:
    """POST: a new backend; SLUG_CONFLICT if its tenant (or the platform) has one of that id."""
    spec = parse_backend(body)
    key = backend_key(spec.id, await _tenant(conn, actor, spec.tenant))
    if (await conn.execute(select(backends.c.id).where(backends.c.id == key))).first() is not None:
        raise errors.slug_conflict(f"backend id {spec.id!r} is taken")
    await upsert_backend(conn, settings, actor, spec)
    return await _backend_view_of(conn, actor, key)


def _same_owner(body: Mapping[str, Any], tenant_slug: str | None, kind: str) -> None:
    """An object's owner is part of its identity (its name is unique per owner only): it is never moved."""
    if body.get("tenant", tenant_slug) != tenant_slug:
        raise errors.validation_error([FieldError(
            "tenant", f"a {kind}'s tenant cannot change; create the {kind} in that tenant instead")])


async def update_backend(conn: AsyncConnection, settings: Settings, actor: Actor, name: str,
                         body: Mapping[str, Any], tenant: str | None = None) -> dict[str, Any]:
    """PUT: fields in the body replace the stored ones, absent fields keep theirs (the key included)."""
    existing = await _writable_backend(conn, actor, name, tenant)
    if body.get("id", name) != name:
        raise errors.validation_error([FieldError("id", "a backend's id cannot change; create a new backend")])
    _same_owner(body, existing.tenant_slug, "backend")
    current: dict[str, Any] = {column: getattr(existing, column) for column in (
        "provider", "base_url", "model", "api_key_env", "timeout_s", "status", "deployment", "api_version")}
    current.update(id=name, tenant=existing.tenant_slug, cost_input_per_mtok=str(existing.cost_input_per_mtok),
                   cost_output_per_mtok=str(existing.cost_output_per_mtok))
    if "api_key" not in body and "api_key_env" not in body and existing.api_key_encrypted is not None:
        try:
            current["api_key"] = decrypt(settings, existing.api_key_encrypted)
        except UndecryptableCredential as exc:
            raise errors.validation_error([FieldError("api_key", str(exc))]) from None
    if "api_key" in body or "api_key_env" in body:
        current.pop("api_key_env")  # a new credential replaces the old one, whichever form either takes
    await upsert_backend(conn, settings, actor, parse_backend({**current, **body}))
    return await _backend_view_of(conn, actor, existing.id)


async def delete_backend(conn: AsyncConnection, actor: Actor, name: str, tenant: str | None = None) -> None:
    """Refused while a model routes to it: its routes go first, so no model silently loses a backend."""
    existing = await _writable_backend(conn, actor, name, tenant)
    routed = await _routed_by(conn, existing.id)
    if routed:
        raise errors.backend_in_use(name, routed)
    await conn.execute(delete(backends).where(backends.c.id == existing.id))


# --- models and their routes ---

def _model_query() -> Select[Any]:
    return select(models, tenants.c.slug.label("tenant_slug"), tenants.c.partner_id).select_from(
        models.outerjoin(tenants, models.c.tenant_id == tenants.c.id))


async def _model(conn: AsyncConnection, actor: Actor, slug: str, tenant: str | None, *, write: bool) -> Row[Any]:
    """The model `slug` as the viewing tenant sees it: its own, else the platform's (which its own shadows)."""
    missing = errors.model_not_found(slug)
    viewer = await _viewer(conn, actor, tenant, missing)
    rows = (await conn.execute(_model_query().where(models.c.slug == slug, or_(
        models.c.tenant_id.is_(None), models.c.tenant_id == viewer) if viewer else models.c.tenant_id.is_(None)))
    ).all()
    row = min(rows, key=lambda candidate: candidate.tenant_id is None, default=None)
    if row is None or not _may_read(actor, row.tenant_id, row.partner_id):
        raise missing
    if write and not _reaches(actor, row.tenant_id, row.partner_id):
        raise errors.not_permitted(f"model {slug!r} is shared; only a super_admin changes it")
    return row


async def _routes_of(conn: AsyncConnection, model_id: str) -> list[RouteSpec]:
    """The stored routes, each naming its backend by key."""
    rows = await conn.execute(select(model_routes).where(model_routes.c.model_id == model_id)
                              .order_by(model_routes.c.priority, model_routes.c.backend_id))
    return [RouteSpec(row.backend_id, row.weight, row.priority) for row in rows]


def _route_views(routes: Sequence[RouteSpec]) -> list[dict[str, Any]]:
    return [{"backend": backend_name(r.backend), "weight": r.weight, "priority": r.priority} for r in routes]


async def _resolve_routes(conn: AsyncConnection, tenant_id: str | None, routes: Sequence[RouteSpec]
                          ) -> list[RouteSpec]:
    """The routes with each backend named by key. A model routes only to backends its tenant may use: its own
    tenant's (first) or shared ones."""
    def candidates(name: str) -> list[str]:
        return [backend_key(name, tenant_id), name] if tenant_id else [name]

    wanted = [key for route in routes for key in candidates(route.backend)]
    found = set((await conn.scalars(select(backends.c.id).where(backends.c.id.in_(wanted)))).all()) if wanted else set()
    problems, resolved = [], []
    for index, route in enumerate(routes):
        key = next((key for key in candidates(route.backend) if key in found), None)
        if key is None:
            problems.append(FieldError(f"routes[{index}].backend", f"no backend {route.backend!r} visible to the "
                                       "model's tenant (backends are shared or belong to the model's tenant)"))
        else:
            resolved.append(RouteSpec(key, route.weight, route.priority))
    if problems:
        raise errors.validation_error(problems)
    return resolved


async def _replace_routes(conn: AsyncConnection, model_id: str, routes: Sequence[RouteSpec]) -> bool:
    """True when the routes changed (and were written)."""
    if sorted(await _routes_of(conn, model_id), key=repr) == sorted(routes, key=repr):
        return False
    await conn.execute(delete(model_routes).where(model_routes.c.model_id == model_id))
    if routes:
        await conn.execute(insert(model_routes), [
            {"model_id": model_id, "backend_id": r.backend, "weight": r.weight, "priority": r.priority}
            for r in routes])
    return True


def prices(price_input_per_mtok: Decimal, price_output_per_mtok: Decimal) -> dict[str, str]:
    """A model's prices under the documented names and the node's former ones (clients of the node read those)."""
    shown = {"input_price_per_mtok": decimal_text(price_input_per_mtok),
             "output_price_per_mtok": decimal_text(price_output_per_mtok)}
    return {**shown, **{PRICE_ALIASES[name]: value for name, value in shown.items()}}


def model_view(row: Row[Any], routes: Sequence[RouteSpec]) -> dict[str, Any]:
    return {
        "id": row.id, "slug": row.slug, "display_name": row.display_name, "description": row.description,
        "modality": row.modality, "context_window": row.context_window, "max_output_tokens": row.max_output_tokens,
        **prices(row.price_input_per_mtok, row.price_output_per_mtok),
        **{name: decimal_text(getattr(row, name)) for name in UNIT_PRICES},
        "default_params": row.default_params, "status": row.status, "tenant": row.tenant_slug,
        "routes": _route_views(routes),
    }


async def _model_view_of(conn: AsyncConnection, model_id: str) -> dict[str, Any]:
    row = (await conn.execute(_model_query().where(models.c.id == model_id))).one()
    return model_view(row, await _routes_of(conn, model_id))


async def _model_id(conn: AsyncConnection, tenant_id: str | None, slug: str) -> str | None:
    """The id of the model `slug` of that owner (a tenant, or None: the platform)."""
    return await conn.scalar(select(models.c.id).where(models.c.slug == slug, _owned_by(models.c.tenant_id,
                                                                                          tenant_id)))


async def upsert_model(conn: AsyncConnection, actor: Actor, spec: ModelSpec) -> str:
    """Creates or updates the model `spec.slug` of `spec.tenant` and, when the spec has routes, replaces them."""
    tenant_id = await _tenant(conn, actor, spec.tenant)
    existing = (await conn.execute(_model_query().where(
        models.c.slug == spec.slug, _owned_by(models.c.tenant_id, tenant_id)))).first()
    values = {
        "tenant_id": tenant_id, "display_name": spec.display_name, "description": spec.description,
        "modality": spec.modality, "context_window": spec.context_window, "max_output_tokens": spec.max_output_tokens,
        "price_input_per_mtok": spec.price_input_per_mtok, "price_output_per_mtok": spec.price_output_per_mtok,
        **{name: getattr(spec, name) for name in UNIT_PRICES},
        "default_params": spec.default_params, "status": spec.status,
    }
    model_id = existing.id if existing is not None else new_id("mdl")
    if spec.routes is not None:
        routes = await _resolve_routes(conn, tenant_id, spec.routes)
    else:
        routes = await _routes_of(conn, model_id) if existing else []
    if existing is None:
        await conn.execute(insert(models).values(id=model_id, slug=spec.slug, **values))
        await _replace_routes(conn, model_id, routes)
        return "created"
    changed = not all(getattr(existing, name) == value for name, value in values.items())
    if changed:
        await conn.execute(update(models).where(models.c.id == model_id).values(**values))
    routes_changed = await _replace_routes(conn, model_id, routes)
    return "updated" if changed or routes_changed else "unchanged"


async def create_model(conn: AsyncConnection, actor: Actor, body: Any) -> dict[str, Any]:
    """POST: a new model; SLUG_CONFLICT if its tenant (or the platform) has one of that slug."""
    spec = parse_model(body)
    tenant_id = await _tenant(conn, actor, spec.tenant)
    if await _model_id(conn, tenant_id, spec.slug) is not None:
        raise errors.slug_conflict(f"model slug {spec.slug!r} is taken")
    await upsert_model(conn, actor, spec)
    return await _model_view_of(conn, str(await _model_id(conn, tenant_id, spec.slug)))


async def update_model(conn: AsyncConnection, actor: Actor, slug: str, body: Mapping[str, Any],
                       tenant: str | None = None) -> dict[str, Any]:
    """PUT: fields in the body replace the stored ones; absent fields (routes included) keep theirs."""
    existing = await _model(conn, actor, slug, tenant, write=True)
    if body.get("slug", slug) != slug:
        raise errors.validation_error([FieldError("slug", "a model's slug cannot change; create a new model")])
    _same_owner(body, existing.tenant_slug, "model")
    current = {name: getattr(existing, name) for name in (
        "slug", "display_name", "description", "modality", "context_window", "max_output_tokens", "default_params",
        "status")}
    current.update(tenant=existing.tenant_slug, input_price_per_mtok=str(existing.price_input_per_mtok),
                   output_price_per_mtok=str(existing.price_output_per_mtok),
                   **{name: str(getattr(existing, name)) for name in UNIT_PRICES})
    for name, alias in PRICE_ALIASES.items():
        if alias in body:  # a price given by its former name replaces the stored one too
            current.pop(name)
    await upsert_model(conn, actor, parse_model({**current, **body}))
    return await _model_view_of(conn, existing.id)


async def delete_model(conn: AsyncConnection, actor: Actor, slug: str, tenant: str | None = None) -> None:
    """Refused while the model routes to backends (as documented): `PUT /v1/routing/{slug}` `{"routes": []}` first,
    so that no mapping goes by accident."""
    row = await _model(conn, actor, slug, tenant, write=True)
    routes = await _routes_of(conn, row.id)
    if routes:
        raise errors.model_has_backends(slug, [backend_name(route.backend) for route in routes])
    await conn.execute(delete(models).where(models.c.id == row.id))


async def get_routes(conn: AsyncConnection, actor: Actor, slug: str, tenant: str | None = None
                     ) -> list[dict[str, Any]]:
    row = await _model(conn, actor, slug, tenant, write=False)
    return _route_views(await _routes_of(conn, row.id))


async def set_routes(conn: AsyncConnection, actor: Actor, slug: str, body: Any, tenant: str | None = None
                     ) -> list[dict[str, Any]]:
    """PUT /v1/routing/{slug}: the model's whole routing policy."""
    row = await _model(conn, actor, slug, tenant, write=True)
    routes = await _resolve_routes(conn, row.tenant_id, parse_routes(body))
    await _replace_routes(conn, row.id, routes)
    return _route_views(await _routes_of(conn, row.id))

