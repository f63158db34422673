"""The http mode's application: `create_app(settings)` composes routes and resources and does no I/O."""

from aiohttp import web

from scaigrid.api.base import DB, READY_CHECKS, REDIS, base_app, resource_ctx
from scaigrid.db import migrations
from scaigrid.health import check_database, check_redis
from scaigrid.modules import Module, load_modules
from scaigrid.resources import database_ctx, redis_ctx
from scaigrid.settings import Settings

MODULES = web.AppKey("modules", tuple[Module, ...])
SCHEMA_HEADS = web.AppKey("schema_heads", dict)  # stream name -> head revisions, read once at start


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


async def _schema_heads_ctx(app: web.Application):  # type: ignore[no-untyped-def]
    modules = app[MODULES]
    app[SCHEMA_HEADS] = {stream.name: stream.heads() for stream in migrations.streams(modules)}
    yield


def mount_module(app: web.Application, module: Module) -> None:
    for route in module.routes:
        web.RouteDef(route.method, module.route_prefix + route.path, route.handler, route.kwargs).register(app.router)


def create_app(settings: Settings) -> web.Application:
    app = base_app(settings)
    app[MODULES] = load_modules(settings.modules)
    app.cleanup_ctx.append(resource_ctx(DB, database_ctx))
    app.cleanup_ctx.append(resource_ctx(REDIS, redis_ctx))
    app.cleanup_ctx.append(_schema_heads_ctx)
    app[READY_CHECKS].update(database=_database_ready, redis=_redis_ready, modules=_modules_ready)
    for module in app[MODULES]:
        mount_module(app, module)
    return app
