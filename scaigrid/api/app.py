"""The http mode's application: `create_app(settings)` composes routes and resources and does no I/O."""

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator, Awaitable
from typing import Any

from aiohttp import web

from scaigrid.access import access_of, requires
from scaigrid.accounting import routes as accounting_routes
from scaigrid.accounting.service import Accounting
from scaigrid.api.base import base_app, resource_ctx
from scaigrid.api.gateway import add_rate_limit_headers, gateway_middleware
from scaigrid.appkeys import (
    ACCOUNTING,
    AUTHENTICATOR,
    BUS,
    DB,
    MODULE_GATE,
    MODULE_ROUTES,
    MODULES,
    READY_CHECKS,
    REDIS,
    S3,
    SCHEMA_HEADS,
    SETTINGS,
)
from scaigrid.audit import audit_middleware
from scaigrid.audit import routes as audit_routes
from scaigrid.auth import routes as auth_routes
from scaigrid.auth.authenticator import Authenticator
from scaigrid.auth.roles import PERMISSIONS
from scaigrid.auth.service_tokens import OPERATOR
from scaigrid.cache import InvalidationBus, bus_ctx
from scaigrid.clock import iso
from scaigrid.db import migrations
from scaigrid.dispatch import routes as dispatch_routes
from scaigrid.dispatch.pipeline import dispatch_ctx
from scaigrid.health import CHECK_TIMEOUT_S, check_database, check_redis
from scaigrid.hybrid import protocol, registry
from scaigrid.hybrid import routes as hybrid_routes
from scaigrid.modules import Module, load_modules
from scaigrid.modules import routes as module_routes
from scaigrid.modules.gate import ModuleGate
from scaigrid.modules.scaibunker import transfers
from scaigrid.nodes import routes as node_routes
from scaigrid.nodes.registry import list_nodes
from scaigrid.resources import database_ctx, redis_ctx, s3_ctx
from scaigrid.routing import routes as routing_routes
from scaigrid.settings import ConfigError, Settings
from scaigrid.webhooks import routes as webhook_routes
from scaigrid.worker.heartbeat import fresh_heartbeats


async def _database_ready(app: web.Application) -> str:
    return await check_database(app[DB])


async def _redis_ready(app: web.Application) -> str:
    return await check_redis(app[REDIS])


async def _modules_ready(app: web.Application) -> str:
    """Every enabled module (and the core) has its schema at head: a half-migrated module is not serving."""
    try:
        modules = app[MODULES]
        return await migrations.schema_status(app[DB], modules, app[SCHEMA_HEADS])
    except Exception as exc:  # the database check reports the outage itself; keep this one short
        return f"error: {type(exc).__name__}"


async def _timed(check: Awaitable[str]) -> dict[str, Any]:
    started = time.perf_counter()
    status = await check
    return {"status": status, "latency_ms": round((time.perf_counter() - started) * 1000, 2)}


async def _module_states(app: web.Application) -> list[dict[str, Any]]:
    """The core and each enabled module: the schema revision the database is at, and the one the code wants."""
    heads, modules = app[SCHEMA_HEADS], app[MODULES]
    names = ("core", *(m.id for m in modules))
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            revisions = await migrations.stream_revisions(app[DB], modules)
    except Exception:  # the database entry says why; here it only means "not known"
        return [{"id": name, "status": "unknown"} for name in names]

    def state(name: str) -> dict[str, Any]:
        if name not in revisions:  # a module without migrations
            return {"id": name, "revision": None, "head": None, "status": "ok"}
        revision = revisions[name]
        return {"id": name, "revision": revision, "head": ",".join(heads[name]),
                "status": "ok" if (revision,) == heads[name] else "behind"}

    return [state(name) for name in names]


async def _worker_states(app: web.Application) -> list[dict[str, Any]] | None:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            ages = await fresh_heartbeats(app[REDIS])
    except Exception:  # the redis entry says why
        return None
    return [{"id": worker_id, "heartbeat_age_s": round(age_s, 1)} for worker_id, age_s in sorted(ages.items())]


async def _node_states(app: web.Application) -> list[dict[str, Any]] | None:
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            nodes = await list_nodes(app[DB], app[SETTINGS].nodes)
    except Exception:  # the database entry says why
        return None
    return [{"id": node["id"], "health": node["health"], "last_heartbeat_at": iso(node["last_heartbeat_at"]),
             "heartbeat_age_s": node["heartbeat_age_s"]} for node in nodes]


async def _link_state(app: web.Application) -> dict[str, Any]:
    """The hybrid link: on a node, what its link program last published; on the managed side, the links held."""
    role = app[SETTINGS].hybrid.role
    if role == "off":
        return {"status": "off"}
    try:
        async with asyncio.timeout(CHECK_TIMEOUT_S):
            if role == "node":
                raw = await app[REDIS].get(protocol.NODE_STATE_KEY)
                if raw is None:  # it publishes every 2 s with a 10 s TTL
                    return {"status": "link program not running"}
                state = json.loads(raw)
                return {**state, "status": "connected" if state.get("connected") else "disconnected"}
            links = await registry.holders(app[REDIS])
    except Exception:  # the redis entry says why
        return {"status": "unknown"}
    now_s = time.time()
    return {"status": "ok", "links": [
        {**{name: value for name, value in dataclasses.asdict(link).items() if name != "session"},
         "heartbeat_age_s": round(max(0.0, now_s - link.last_heartbeat_unix), 1)}
        for _, link in sorted(links.items())]}


@requires("admin:access", reach="platform", scopes=(OPERATOR,))
async def detailed_health(request: web.Request) -> web.Response:
    """For operators: dependencies with ping latency, schema state per module, worker and ScaiInfer node heartbeats,
    and the hybrid link.

    `degraded` when a dependency fails, a schema is behind, or no worker is alive (usage is then not flushed). The
    link is reported beside that and never degrades it: a node without its link still serves its own models.
    """
    app = request.app
    database, redis, modules, workers, nodes, link = await asyncio.gather(
        _timed(check_database(app[DB])), _timed(check_redis(app[REDIS])), _module_states(app), _worker_states(app),
        _node_states(app), _link_state(app))
    healthy = (database["status"] == redis["status"] == "ok" and all(m["status"] == "ok" for m in modules)
               and bool(workers))
    return web.json_response({"status": "ok" if healthy else "degraded",
                              "dependencies": {"database": database, "redis": redis},
                              "modules": modules, "workers": workers, "nodes": nodes, "link": link})


async def _schema_heads_ctx(app: web.Application):  # type: ignore[no-untyped-def]
    modules = app[MODULES]
    app[SCHEMA_HEADS] = {stream.name: stream.heads() for stream in migrations.streams(modules)}
    yield


async def _gateway_ctx(app: web.Application) -> AsyncIterator[None]:
    """The request path's in-process services, built once the database and Redis are open."""
    settings = app[SETTINGS]
    app[AUTHENTICATOR] = Authenticator(settings, app[DB], app[BUS])
    app[ACCOUNTING] = Accounting(settings, app[DB], app[REDIS], app[BUS])
    app[MODULE_GATE] = ModuleGate(app[DB], app[BUS])
    yield


def mount_module(app: web.Application, module: Module) -> None:
    """Registers the module's routes under its prefix; a route needing a permission that is neither the core's nor
    declared by the module is refused at start (roles hold module permissions by declaration, auth/roles.py), and so
    is one that would shadow the modules admin routes. Each route is noted with its module for the gateway's
    MODULE_NOT_ENABLED check."""
    for route in module.routes:
        if route.path in module_routes.RESERVED_PATHS:
            raise ConfigError(f"module {module.id}: the route {route.path or '/'} is the modules admin API's")
        access = access_of(route.handler)
        if access and access.permission and access.permission not in (*PERMISSIONS, *module.permission_keys):
            raise ConfigError(f"module {module.id}: route {route.path} needs {access.permission!r}, "
                              "which the module does not declare in Module.permissions")
        registered = web.RouteDef(route.method, module.route_prefix + route.path, route.handler,
                                  route.kwargs).register(app.router)
        app.setdefault(MODULE_ROUTES, {}).update(dict.fromkeys(registered, module.id))


def create_app(settings: Settings) -> web.Application:
    app = base_app(settings)
    app.middlewares.append(audit_middleware)  # outside the gateway: it sees refusals (403, 422) as well as answers
    app.middlewares.append(gateway_middleware)
    app.on_response_prepare.append(add_rate_limit_headers)
    app[MODULES] = load_modules(settings.modules)
    app[BUS] = InvalidationBus()
    app.cleanup_ctx.append(resource_ctx(DB, database_ctx))
    app.cleanup_ctx.append(resource_ctx(REDIS, redis_ctx))
    if settings.s3.endpoint_url is not None:  # for the storage routes; without it they answer STORAGE_NOT_CONFIGURED
        app.cleanup_ctx.append(resource_ctx(S3, s3_ctx))
        app.cleanup_ctx.append(transfers.transfers_ctx)  # their own threads, apart from the DNS resolver's
    app.cleanup_ctx.append(bus_ctx(REDIS))
    app.cleanup_ctx.append(_gateway_ctx)
    app.cleanup_ctx.append(dispatch_ctx)  # catalogue, breakers, upstream session: after the gateway's services
    app.cleanup_ctx.append(_schema_heads_ctx)
    for table in (auth_routes.ROUTES, routing_routes.ROUTES, dispatch_routes.ROUTES, accounting_routes.ROUTES,
                  webhook_routes.ROUTES, node_routes.ROUTES, hybrid_routes.ROUTES, module_routes.ROUTES,
                  audit_routes.ROUTES):
        app.router.add_routes(table)
    app[READY_CHECKS].update(database=_database_ready, redis=_redis_ready, modules=_modules_ready)
    app[MODULE_ROUTES] = {}
    app.router.add_get("/health/detailed", detailed_health)
    for module in app[MODULES]:
        mount_module(app, module)
    return app
