"""Prometheus exposition: the /metrics handler, and a small metrics listener for modes without HTTP."""

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

logger = logging.getLogger(__name__)


async def metrics_handler(request: web.Request) -> web.Response:
    response = web.Response(body=generate_latest(REGISTRY))
    response.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return response


@asynccontextmanager
async def metrics_site_ctx(host: str, port: int) -> AsyncIterator[None]:
    """Serves GET /metrics on host:port for as long as the context is open."""
    app = web.Application()
    app.router.add_get("/metrics", metrics_handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    logger.info("metrics on http://%s:%d/metrics", host, port, extra={"event": "listening", "port": port})
    try:
        yield
    finally:
        await runner.cleanup()
