"""Catalogue administration under /v1/: backends, models, routing policies, backend health."""

import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from aiohttp import web
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

from scaigrid import errors
from scaigrid.access import requires
from scaigrid.appkeys import DB, PRINCIPAL, REDIS, SETTINGS
from scaigrid.auth.service_tokens import OPERATOR
from scaigrid.cache import announce
from scaigrid.db.tables import backends
from scaigrid.envelope import PAGE, listing, ok
from scaigrid.fields import json_object
from scaigrid.routing import store
from scaigrid.routing.catalogue import TOPIC_CATALOGUE

logger = logging.getLogger(__name__)

T = TypeVar("T")


def _tenant(request: web.Request) -> str | None:
    """`?tenant=<slug>`: resolve the path's name as that tenant sees it, not as the caller's own tenant does."""
    return request.query.get("tenant")


async def _change(request: web.Request, work: Callable[[AsyncConnection], Awaitable[T]]) -> T:
    """Runs one change in a transaction, then tells every http process to reload the catalogue."""
    async with request.app[DB].begin() as conn:
        result = await work(conn)
    await announce(request.app[REDIS], TOPIC_CATALOGUE)
    return result


# --- backends ---

@requires("routing:view", scopes=(OPERATOR,), query=PAGE)
async def list_backends(request: web.Request) -> web.Response:
    """Shared backends and those of the tenants the caller reaches, newest first."""
    actor = request[PRINCIPAL]
    return await listing(request, store.visible_backends(actor), backends.c.created_at, backends.c.id,
                         lambda row: store.backend_view(row, actor))


@requires("routing:manage", scopes=(OPERATOR,))
async def create_backend(request: web.Request) -> web.Response:
    body = await json_object(request)
    try:
        backend = await _change(request, lambda conn: store.create_backend(
            conn, request.app[SETTINGS], request[PRINCIPAL], body))
    except IntegrityError:  # created concurrently between our check and our insert
        raise errors.slug_conflict(f"backend id {body.get('id')!r} is taken") from None
    return ok(backend, status=201)


@requires("routing:view", scopes=(OPERATOR,), query=("tenant",))
async def get_backend(request: web.Request) -> web.Response:
    async with request.app[DB].connect() as conn:
        return ok(await store.get_backend(conn, request[PRINCIPAL], request.match_info["id"], _tenant(request)))


@requires("routing:manage", scopes=(OPERATOR,), query=("tenant",))
async def update_backend(request: web.Request) -> web.Response:
    body = await json_object(request)
    return ok(await _change(request, lambda conn: store.update_backend(
        conn, request.app[SETTINGS], request[PRINCIPAL], request.match_info["id"], body, _tenant(request))))


@requires("routing:manage", scopes=(OPERATOR,), query=("tenant",))
async def delete_backend(request: web.Request) -> web.Response:
    backend_id = request.match_info["id"]
    await _change(request, lambda conn: store.delete_backend(conn, request[PRINCIPAL], backend_id, _tenant(request)))
    return ok({"id": backend_id, "deleted": True})


# --- models (GET /v1/models and /v1/models/{slug} are the inference surface's) ---

@requires("models:manage", scopes=(OPERATOR,))
async def create_model(request: web.Request) -> web.Response:
    body = await json_object(request)
    try:
        model = await _change(request, lambda conn: store.create_model(conn, request[PRINCIPAL], body))
    except IntegrityError:
        raise errors.slug_conflict(f"model slug {body.get('slug')!r} is taken") from None
    return ok(model, status=201)


@requires("models:manage", scopes=(OPERATOR,), query=("tenant",))
async def update_model(request: web.Request) -> web.Response:
    body = await json_object(request)
    return ok(await _change(request, lambda conn: store.update_model(
        conn, request[PRINCIPAL], request.match_info["slug"], body, _tenant(request))))


@requires("models:manage", scopes=(OPERATOR,), query=("tenant",))
async def delete_model(request: web.Request) -> web.Response:
    slug = request.match_info["slug"]
    await _change(request, lambda conn: store.delete_model(conn, request[PRINCIPAL], slug, _tenant(request)))
    return ok({"slug": slug, "deleted": True})


# --- routing policies: /v1/routing/{slug}, since slugs contain "/" and would swallow a /routes suffix ---

@requires("routing:view", scopes=(OPERATOR,), query=("tenant",))
async def get_routes(request: web.Request) -> web.Response:
    slug = request.match_info["slug"]
    async with request.app[DB].connect() as conn:
        routes = await store.get_routes(conn, request[PRINCIPAL], slug, _tenant(request))
    return ok({"model": slug, "routes": routes})


@requires("routing:manage", scopes=(OPERATOR,), query=("tenant",))
async def set_routes(request: web.Request) -> web.Response:
    slug = request.match_info["slug"]
    body = await json_object(request)
    routes = await _change(request, lambda conn: store.set_routes(
        conn, request[PRINCIPAL], slug, body, _tenant(request)))
    return ok({"model": slug, "routes": routes})


ROUTES: list[web.RouteDef] = [
    web.get("/v1/backends", list_backends),
    web.post("/v1/backends", create_backend),
    web.get("/v1/backends/{id}", get_backend),
    web.put("/v1/backends/{id}", update_backend),
    web.delete("/v1/backends/{id}", delete_backend),
    web.post("/v1/models", create_model),
    web.put("/v1/models/{slug:.+}", update_model),
    web.delete("/v1/models/{slug:.+}", delete_model),
    web.get("/v1/routing/{slug:.+}", get_routes),
    web.put("/v1/routing/{slug:.+}", set_routes),
]
