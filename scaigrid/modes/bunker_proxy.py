"""bunker_proxy mode: only the ScaiBunker storage routes, on BUNKER_PROXY_PORT; no database, no Redis."""

import asyncio

from aiohttp import web

from scaigrid.api.app import mount_module
from scaigrid.api.base import READY_CHECKS, S3, SETTINGS, base_app, resource_ctx, serve
from scaigrid.health import check_s3
from scaigrid.modules import scaibunker
from scaigrid.resources import s3_ctx
from scaigrid.settings import Settings

REQUIRES = ("s3",)

async def _s3_ready(app: web.Application) -> str:
    return await check_s3(app[S3], app[SETTINGS].s3.bucket)


def create_proxy_app(settings: Settings) -> web.Application:
    app = base_app(settings)
    app.cleanup_ctx.append(resource_ctx(S3, s3_ctx))
    app[READY_CHECKS]["s3"] = _s3_ready
    mount_module(app, scaibunker.MODULE)
    return app


def run(settings: Settings) -> int:
    server = settings.server
    return asyncio.run(
        serve(create_proxy_app(settings), server.bind_host, server.bunker_proxy_port, server.http_drain_grace_s))
