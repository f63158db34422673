"""bunker_proxy mode: only the ScaiBunker object routes, on BUNKER_PROXY_PORT; no database, no Redis."""

import asyncio
import dataclasses
from collections.abc import AsyncIterator

import uvloop
from aiohttp import web

from scaigrid.api.app import mount_module
from scaigrid.api.base import base_app, resource_ctx, serve
from scaigrid.appkeys import READY_CHECKS, S3, SETTINGS
from scaigrid.health import DEPENDENCY_UP, HEALTH_CHECK_INTERVAL_S, check_s3
from scaigrid.lifecycle import background
from scaigrid.modules import scaibunker
from scaigrid.modules.scaibunker import transfers
from scaigrid.resources import s3_ctx
from scaigrid.settings import Requirement, Settings

REQUIRES: tuple[Requirement, ...] = ("s3",)

async def _s3_ready(app: web.Application) -> str:
    return await check_s3(app[S3], app[SETTINGS].s3.bucket)


async def _watch_s3(app: web.Application) -> AsyncIterator[None]:
    """scaigrid_dependency_up{dependency="s3"}, checked every HEALTH_CHECK_INTERVAL_S: an S3 outage alerts as the
    database's does (ScaigridDependencyDown), whether or not objects are moving meanwhile."""
    async def watch() -> None:
        while True:
            DEPENDENCY_UP.labels("s3").set(await _s3_ready(app) == "ok")
            await asyncio.sleep(HEALTH_CHECK_INTERVAL_S)

    async with background(watch(), "s3-watch"):
        yield


def create_proxy_app(settings: Settings) -> web.Application:
    app = base_app(settings)
    app.cleanup_ctx.append(resource_ctx(S3, s3_ctx))
    app.cleanup_ctx.append(transfers.transfers_ctx)
    app[READY_CHECKS]["s3"] = _s3_ready
    app.cleanup_ctx.append(_watch_s3)
    # Object routes only: capabilities are minted (and recorded) by the http process.
    mount_module(app, dataclasses.replace(scaibunker.MODULE, routes=scaibunker.routes.ROUTES))
    return app


def run(settings: Settings) -> int:
    server = settings.server
    # uvloop: moving object bytes between two sockets is event-loop work, which uvloop does in C.
    return uvloop.run(
        serve(create_proxy_app(settings), server.bind_host, server.bunker_proxy_port, server.http_drain_grace_s))
