"""bunker_proxy mode: only the ScaiBunker object routes, on BUNKER_PROXY_PORT; no database, no Redis."""

import dataclasses

import uvloop
from aiohttp import web

from scaigrid.api.app import mount_module
from scaigrid.api.base import base_app, resource_ctx, serve
from scaigrid.appkeys import READY_CHECKS, S3, SETTINGS
from scaigrid.health import check_s3
from scaigrid.modules import scaibunker
from scaigrid.modules.scaibunker import transfers
from scaigrid.resources import s3_ctx
from scaigrid.settings import Requirement, Settings

REQUIRES: tuple[Requirement, ...] = ("s3",)

async def _s3_ready(app: web.Application) -> str:
    return await check_s3(app[S3], app[SETTINGS].s3.bucket)


def create_proxy_app(settings: Settings) -> web.Application:
    app = base_app(settings)
    app.cleanup_ctx.append(resource_ctx(S3, s3_ctx))
    app.cleanup_ctx.append(transfers.transfers_ctx)
    app[READY_CHECKS]["s3"] = _s3_ready
    # Object routes only: capabilities are minted (and recorded) by the http process.
    mount_module(app, dataclasses.replace(scaibunker.MODULE, routes=scaibunker.routes.ROUTES))
    return app


def run(settings: Settings) -> int:
    server = settings.server
    # uvloop: moving object bytes between two sockets is event-loop work, which uvloop does in C.
    return uvloop.run(
        serve(create_proxy_app(settings), server.bind_host, server.bunker_proxy_port, server.http_drain_grace_s))
