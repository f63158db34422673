"""The catalogue's write path: one validation of backends, models and routes, shared by the /v1/ API and `admin apply`.

Parsing (`parse_*`) checks a body alone and reports every problem at once as VALIDATION_ERROR details; the
`upsert_*`/`delete_*` functions then check what needs the database (tenants, backends a route names, who may
see what) inside the caller's transaction, and write only what changed. `actor` is the API caller, or None for
the node's operator at the command line (who may do anything).
"""

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from decimal import Decimal
from typing import Any
from urllib.parse import urlsplit

from sqlalchemy import ColumnElement, Row, Select, delete, insert, or_, select, true, update
from sqlalchemy.ext.asyncio import AsyncConnection

from scaigrid import errors
from scaigrid.auth.bodies import decimal_text
from scaigrid.auth.principal import Principal
from scaigrid.crypto import UndecryptableCredential, decrypt, encrypt
from scaigrid.db.tables import backends, model_routes, models, new_id, tenants
from scaigrid.dispatch.schemas import parameter_problems
from scaigrid.errors import FieldError
from scaigrid.fields import Fields
from scaigrid.routing.catalogue import HYBRID, MANAGED, SCAIINFER
from scaigrid.rpc.nodes import NODE_ID
from scaigrid.settings import Settings
from scaigrid.urls import http_url_problem

BACKEND_ID = re.compile(r"[a-z0-9][a-z0-9._-]{0,63}")
_SEGMENT = r"[a-z0-9][a-z0-9._:-]*"
MODEL_SLUG = re.compile(rf"{_SEGMENT}(/{_SEGMENT})*")
ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,127}")
PROVIDERS = ("openai", "custom", SCAIINFER, HYBRID, MANAGED)
# A scaiinfer backend names its node and the node's model: "node-eu-01/llama-3.3" (the URI scaiinfer:<node>/<model>).
NODE_MODEL = re.compile(rf"(?:{NODE_ID.pattern})/[^\s/][^\s]{{0,190}}")
# A hybrid backend names a linked node (its id from enrolment) and a model slug of that node.
LINKED_NODE_MODEL = re.compile(rf"hn_[0-9a-f]{{32}}/(?:{MODEL_SLUG.pattern})")
# Why each provider has no base_url, api_key or api_key_env (each is refused).
_KEYLESS = {
    SCAIINFER: "its node announces its endpoint by heartbeat and is called with a service token",
    HYBRID: "it is reached through the node's link, with the client's own key",
    MANAGED: "it is reached at HYBRID_MANAGED_URL, with the client's own key",
}
BACKEND_STATUSES = ("active", "disabled")
MODALITIES = ("chat", "embedding", "image", "audio")
MODEL_STATUSES = ("active", "deprecated")
# A key is sent as `Authorization: Bearer <key>`: visible ASCII only, or every request to the backend would fail.
API_KEY = re.compile(r"[\x21-\x7e]+")

BACKEND_FIELDS = ("id", "provider", "base_url", "model", "api_key", "api_key_env", "cost_input_per_mtok",
                  "cost_output_per_mtok", "timeout_s", "tenant", "status")
MODEL_FIELDS = ("slug", "display_name", "modality", "context_window", "max_output_tokens", "price_input_per_mtok",
                "price_output_per_mtok", "default_params", "status", "tenant", "routes")
ROUTE_FIELDS = ("backend", "weight", "priority")

Actor = Principal | None


@dataclass(frozen=True)
class RouteSpec:
    backend: str
    weight: int
    priority: int  # lower is tried first


@dataclass(frozen=True)
class BackendSpec:
    id: str
    provider: str
    base_url: str
    model: str
    api_key: str | None = field(repr=False)  # plaintext, in memory only
    api_key_env: str | None
    cost_input_per_mtok: Decimal
    cost_output_per_mtok: Decimal
    timeout_s: float | None
    tenant: str | None  # slug; None = shared by every tenant
    status: str


@dataclass(frozen=True)
class ModelSpec:
    slug: str
    display_name: str | None
    modality: str
    context_window: int | None
    max_output_tokens: int | None
    price_input_per_mtok: Decimal
    price_output_per_mtok: Decimal
    default_params: dict[str, Any] | None
    status: str
    tenant: str | None
    routes: tuple[RouteSpec, ...] | None  # None = leave the model's routes as they are


# --- parsing: a body alone ---

_Fields = Fields  # the one body reader, under the name the parse_* functions use


def _base_url(fields: _Fields) -> str | None:
    url = fields.text("base_url", required=True, max_len=1024)
    if url is None:
        return None
    # A URL that would not load into the catalogue, or with a query or fragment the request paths cannot follow.
    if http_url_problem(url) is not None or urlsplit(url).query or urlsplit(url).fragment:
        fields.fail("base_url", "an http:// or https:// URL of the OpenAI API root, e.g. http://10.0.0.5:8000/v1")
        return None
    return url.rstrip("/")


def parse_backend(body: Any) -> BackendSpec:
    """A backend from a body (API) or a [[backends]] table (apply); VALIDATION_ERROR lists every problem."""
    f = _Fields(body, BACKEND_FIELDS)
    provider = f.text("provider", required=True, choices=PROVIDERS) or ""
    keyless = _KEYLESS.get(provider)
    spec = BackendSpec(
        id=f.text("id", required=True, max_len=64, pattern=BACKEND_ID) or "",
        provider=provider,
        base_url="" if keyless else _base_url(f) or "",
        model=f.text("model", required=True) or "",
        api_key=f.text("api_key", max_len=4096, pattern=API_KEY, hint="visible ASCII characters, no spaces"),
        api_key_env=f.text("api_key_env", max_len=128, pattern=ENV_NAME),
        cost_input_per_mtok=f.money("cost_input_per_mtok"),
        cost_output_per_mtok=f.money("cost_output_per_mtok"),
        timeout_s=f.seconds("timeout_s"),
        tenant=f.text("tenant", max_len=64),
        status=f.text("status", choices=BACKEND_STATUSES) or "active",
    )
    if spec.api_key is not None and spec.api_key_env is not None:
        f.fail("api_key_env", "give api_key or api_key_env, not both")
    if provider == SCAIINFER and spec.model and not NODE_MODEL.fullmatch(spec.model):
        f.fail("model", "for a scaiinfer backend: <node id>/<model the node serves>, e.g. node-eu-01/llama-3.3")
    if provider == HYBRID and spec.model and not LINKED_NODE_MODEL.fullmatch(spec.model):
        f.fail("model", "for a hybrid backend: <node id (hn_...)>/<model slug on the node>, e.g. "
                        "hn_0123456789abcdef0123456789abcdef/acme/llama-3.3")
    if provider == MANAGED and spec.model and not MODEL_SLUG.fullmatch(spec.model):
        f.fail("model", "for a managed backend: the slug of a model of the managed gateway")
    if keyless:
        for name in ("base_url", "api_key", "api_key_env"):
            if f.body.get(name):
                f.fail(name, f"a {provider} backend has none: {keyless}")
    f.done()
    return spec


def _routes(f: _Fields) -> tuple[RouteSpec, ...] | None:
    if "routes" not in f.body:
        return None
    raw = f.body["routes"]
    if not isinstance(raw, list):
        f.fail("routes", "a list of {backend, weight, priority}")
        return None
    routes: list[RouteSpec] = []
    for index, item in enumerate(raw):
        r = _Fields(item, ROUTE_FIELDS, prefix=f"{f.where}routes[{index}].")
        route = RouteSpec(
            backend=r.text("backend", required=True, max_len=64, pattern=BACKEND_ID) or "",
            weight=r.integer("weight", maximum=1000) or 1,
            priority=r.integer("priority", maximum=1000) or 1,
        )
        if route.backend and route.backend in {seen.backend for seen in routes}:
            r.fail("backend", f"{route.backend!r} is listed twice")
        f.problems.extend(r.problems)
        routes.append(route)
    return tuple(routes)


def parse_routes(body: Any) -> tuple[RouteSpec, ...]:
    """The body of PUT /v1/routing/{slug}: {"routes": [...]}."""
    f = _Fields(body, ("routes",))
    f.present("routes", True)
    routes = _routes(f)
    f.done()
    return routes or ()


def parse_model(body: Any) -> ModelSpec:
    """A frontend model from a body (API) or a [[models]] table (apply)."""
    f = _Fields(body, MODEL_FIELDS)
    spec = ModelSpec(
        slug=f.text("slug", required=True, max_len=191, pattern=MODEL_SLUG) or "",
        display_name=f.text("display_name"),
        modality=f.text("modality", required=True, choices=MODALITIES) or "",
        context_window=f.integer("context_window"),
        max_output_tokens=f.integer("max_output_tokens"),
        price_input_per_mtok=f.money("price_input_per_mtok"),
        price_output_per_mtok=f.money("price_output_per_mtok"),
        default_params=f.mapping("default_params"),
        status=f.text("status", choices=MODEL_STATUSES) or "active",
        tenant=f.text("tenant", max_len=64),
        routes=_routes(f),
    )
    if spec.context_window and spec.max_output_tokens and spec.max_output_tokens > spec.context_window:
        f.fail("max_output_tokens", f"at most context_window ({spec.context_window})")
    for problem in parameter_problems(spec.default_params or {}):  # merged under every request's parameters
        f.fail(f"default_params.{problem.field}", problem.message)
    f.done()
    return spec


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


async def _backend(conn: AsyncConnection, actor: Actor, backend_id: str) -> Row[Any]:
    """A backend the actor may see, else BACKEND_NOT_FOUND (whether it exists elsewhere is not told)."""
    row = (await conn.execute(_backend_query().where(backends.c.id == backend_id))).first()
    if row is None or not _may_read(actor, row.tenant_id, row.partner_id):
        raise errors.backend_not_found(backend_id)
    return row


async def _writable_backend(conn: AsyncConnection, actor: Actor, backend_id: str) -> Row[Any]:
    row = await _backend(conn, actor, backend_id)
    if not _reaches(actor, row.tenant_id, row.partner_id):
        raise errors.not_permitted(f"backend {backend_id!r} is shared; only a super_admin changes it")
    return row


def backend_view(row: Mapping[str, Any]) -> dict[str, Any]:
    """A backend as the API shows it (a row of `visible_backends`): never the key, only whether there is one."""
    return {
        "id": row["id"], "provider": row["provider"], "base_url": row["base_url"] or None, "model": row["model"],
        "has_api_key": row["api_key_encrypted"] is not None, "api_key_env": row["api_key_env"],
        "cost_input_per_mtok": decimal_text(row["cost_input_per_mtok"]),
        "cost_output_per_mtok": decimal_text(row["cost_output_per_mtok"]),
        "timeout_s": row["timeout_s"], "tenant": row["tenant_slug"], "status": row["status"],
    }


async def get_backend(conn: AsyncConnection, actor: Actor, backend_id: str) -> dict[str, Any]:
    return backend_view(dict((await _backend(conn, actor, backend_id))._mapping))


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


async def _routed_by(conn: AsyncConnection, backend_id: str) -> list[Row[Any]]:
    query = (select(models.c.slug, models.c.tenant_id)
             .select_from(model_routes.join(models, model_routes.c.model_id == models.c.id))
             .where(model_routes.c.backend_id == backend_id).order_by(models.c.slug))
    return list((await conn.execute(query)).all())


async def upsert_backend(conn: AsyncConnection, settings: Settings, actor: Actor, spec: BackendSpec) -> str:
    """Creates or updates one backend; returns "created", "updated" or "unchanged"."""
    tenant_id = await _tenant(conn, actor, spec.tenant)
    existing = (await conn.execute(_backend_query().where(backends.c.id == spec.id))).first()
    if existing is not None and not _reaches(actor, existing.tenant_id, existing.partner_id):
        raise errors.slug_conflict(f"backend id {spec.id!r} is taken")
    values = {
        "tenant_id": tenant_id, "provider": spec.provider, "base_url": spec.base_url, "model": spec.model,
        "api_key_encrypted": _stored_key(settings, existing, spec.api_key), "api_key_env": spec.api_key_env,
        "cost_input_per_mtok": spec.cost_input_per_mtok, "cost_output_per_mtok": spec.cost_output_per_mtok,
        "timeout_s": spec.timeout_s, "status": spec.status,
    }
    if existing is None:
        await conn.execute(insert(backends).values(id=spec.id, **values))
        return "created"
    if all(getattr(existing, name) == value for name, value in values.items()):
        return "unchanged"
    if tenant_id is not None and tenant_id != existing.tenant_id:
        blind = [row.slug for row in await _routed_by(conn, spec.id) if row.tenant_id != tenant_id]
        if blind:
            raise errors.validation_error([FieldError(
                "tenant", f"model(s) {', '.join(blind)} route to this backend and would no longer see it")])
    await conn.execute(update(backends).where(backends.c.id == spec.id).values(**values))
    return "updated"


async def create_backend(conn: AsyncConnection, settings: Settings, actor: Actor, body: Any) -> dict[str, Any]:
    """POST: a new backend; SLUG_CONFLICT if the id exists."""
    spec = parse_backend(body)
    if (await conn.execute(select(backends.c.id).where(backends.c.id == spec.id))).first() is not None:
        raise errors.slug_conflict(f"backend id {spec.id!r} is taken")
    await upsert_backend(conn, settings, actor, spec)
    return await get_backend(conn, actor, spec.id)


async def update_backend(conn: AsyncConnection, settings: Settings, actor: Actor, backend_id: str,
                         body: Mapping[str, Any]) -> dict[str, Any]:
    """PUT: fields in the body replace the stored ones, absent fields keep theirs (the key included)."""
    existing = await _writable_backend(conn, actor, backend_id)
    if body.get("id", backend_id) != backend_id:
        raise errors.validation_error([FieldError("id", "a backend's id cannot change; create a new backend")])
    current: dict[str, Any] = {name: getattr(existing, name) for name in (
        "id", "provider", "base_url", "model", "api_key_env", "timeout_s", "status")}
    current.update(tenant=existing.tenant_slug, cost_input_per_mtok=str(existing.cost_input_per_mtok),
                   cost_output_per_mtok=str(existing.cost_output_per_mtok))
    if "api_key" not in body and "api_key_env" not in body and existing.api_key_encrypted is not None:
        try:
            current["api_key"] = decrypt(settings, existing.api_key_encrypted)
        except UndecryptableCredential as exc:
            raise errors.validation_error([FieldError("api_key", str(exc))]) from None
    if "api_key" in body or "api_key_env" in body:
        current.pop("api_key_env")  # a new credential replaces the old one, whichever form either takes
    await upsert_backend(conn, settings, actor, parse_backend({**current, **body}))
    return await get_backend(conn, actor, backend_id)


async def delete_backend(conn: AsyncConnection, actor: Actor, backend_id: str) -> None:
    """Refused while a model routes to it: its routes go first, so no model silently loses a backend."""
    await _writable_backend(conn, actor, backend_id)
    routed = [row.slug for row in await _routed_by(conn, backend_id)]
    if routed:
        raise errors.backend_in_use(backend_id, routed)
    await conn.execute(delete(backends).where(backends.c.id == backend_id))


# --- models and their routes ---

def _model_query() -> Select[Any]:
    return select(models, tenants.c.slug.label("tenant_slug"), tenants.c.partner_id).select_from(
        models.outerjoin(tenants, models.c.tenant_id == tenants.c.id))


async def _model(conn: AsyncConnection, actor: Actor, slug: str, *, write: bool) -> Row[Any]:
    row = (await conn.execute(_model_query().where(models.c.slug == slug))).first()
    if row is None or not _may_read(actor, row.tenant_id, row.partner_id):
        raise errors.model_not_found(slug)
    if write and not _reaches(actor, row.tenant_id, row.partner_id):
        raise errors.not_permitted(f"model {slug!r} is shared; only a super_admin changes it")
    return row


async def _routes_of(conn: AsyncConnection, model_id: str) -> list[RouteSpec]:
    rows = await conn.execute(select(model_routes).where(model_routes.c.model_id == model_id)
                              .order_by(model_routes.c.priority, model_routes.c.backend_id))
    return [RouteSpec(row.backend_id, row.weight, row.priority) for row in rows]


def _route_views(routes: Sequence[RouteSpec]) -> list[dict[str, Any]]:
    return [{"backend": r.backend, "weight": r.weight, "priority": r.priority} for r in routes]


async def _check_routes(conn: AsyncConnection, tenant_id: str | None, routes: Sequence[RouteSpec]) -> None:
    """A model routes only to backends its tenant may use: shared ones, or its own tenant's."""
    problems = []
    for index, route in enumerate(routes):
        row = (await conn.execute(select(backends.c.tenant_id).where(backends.c.id == route.backend))).first()
        if row is None or row.tenant_id not in (None, tenant_id):
            problems.append(FieldError(f"routes[{index}].backend", f"no backend {route.backend!r} visible to the "
                                       "model's tenant (backends are shared or belong to the model's tenant)"))
    if problems:
        raise errors.validation_error(problems)


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


def model_view(row: Row[Any], routes: Sequence[RouteSpec]) -> dict[str, Any]:
    return {
        "slug": row.slug, "display_name": row.display_name, "modality": row.modality,
        "context_window": row.context_window, "max_output_tokens": row.max_output_tokens,
        "price_input_per_mtok": decimal_text(row.price_input_per_mtok),
        "price_output_per_mtok": decimal_text(row.price_output_per_mtok),
        "default_params": row.default_params, "status": row.status, "tenant": row.tenant_slug,
        "routes": _route_views(routes),
    }


async def get_model(conn: AsyncConnection, actor: Actor, slug: str) -> dict[str, Any]:
    row = await _model(conn, actor, slug, write=False)
    return model_view(row, await _routes_of(conn, row.id))


async def upsert_model(conn: AsyncConnection, actor: Actor, spec: ModelSpec) -> str:
    """Creates or updates one model and, when the spec has routes, replaces its routes."""
    tenant_id = await _tenant(conn, actor, spec.tenant)
    existing = (await conn.execute(_model_query().where(models.c.slug == spec.slug))).first()
    if existing is not None and not _reaches(actor, existing.tenant_id, existing.partner_id):
        raise errors.slug_conflict(f"model slug {spec.slug!r} is taken")
    values = {
        "tenant_id": tenant_id, "display_name": spec.display_name, "modality": spec.modality,
        "context_window": spec.context_window, "max_output_tokens": spec.max_output_tokens,
        "price_input_per_mtok": spec.price_input_per_mtok, "price_output_per_mtok": spec.price_output_per_mtok,
        "default_params": spec.default_params, "status": spec.status,
    }
    model_id = existing.id if existing is not None else new_id("mdl")
    routes = spec.routes if spec.routes is not None else (await _routes_of(conn, model_id) if existing else [])
    await _check_routes(conn, tenant_id, routes)
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
    """POST: a new model; SLUG_CONFLICT if the slug exists."""
    spec = parse_model(body)
    if (await conn.execute(select(models.c.id).where(models.c.slug == spec.slug))).first() is not None:
        raise errors.slug_conflict(f"model slug {spec.slug!r} is taken")
    await upsert_model(conn, actor, spec)
    return await get_model(conn, actor, spec.slug)


async def update_model(conn: AsyncConnection, actor: Actor, slug: str, body: Mapping[str, Any]) -> dict[str, Any]:
    """PUT: fields in the body replace the stored ones; absent fields (routes included) keep theirs."""
    existing = await _model(conn, actor, slug, write=True)
    if body.get("slug", slug) != slug:
        raise errors.validation_error([FieldError("slug", "a model's slug cannot change; create a new model")])
    current = {name: getattr(existing, name) for name in MODEL_FIELDS if name not in ("tenant", "routes")}
    current.update(tenant=existing.tenant_slug, price_input_per_mtok=str(existing.price_input_per_mtok),
                   price_output_per_mtok=str(existing.price_output_per_mtok))
    await upsert_model(conn, actor, parse_model({**current, **body}))
    return await get_model(conn, actor, slug)


async def delete_model(conn: AsyncConnection, actor: Actor, slug: str) -> None:
    row = await _model(conn, actor, slug, write=True)
    await conn.execute(delete(model_routes).where(model_routes.c.model_id == row.id))
    await conn.execute(delete(models).where(models.c.id == row.id))


async def get_routes(conn: AsyncConnection, actor: Actor, slug: str) -> list[dict[str, Any]]:
    row = await _model(conn, actor, slug, write=False)
    return _route_views(await _routes_of(conn, row.id))


async def set_routes(conn: AsyncConnection, actor: Actor, slug: str, body: Any) -> list[dict[str, Any]]:
    """PUT /v1/routing/{slug}: the model's whole routing policy."""
    row = await _model(conn, actor, slug, write=True)
    routes = parse_routes(body)
    await _check_routes(conn, row.tenant_id, routes)
    await _replace_routes(conn, row.id, routes)
    return _route_views(await _routes_of(conn, row.id))

